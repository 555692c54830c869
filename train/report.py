"""Tables, CSV files and plots of recipe results."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from mambaspin.io import write_text_atomic


def write_csv(path: Path, rows: list[dict]) -> Path:
    """Write rows (dicts with the same keys) as CSV, atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return write_text_atomic(path, buffer.getvalue())


def markdown_table(rows: list[dict], float_loss: float) -> str:
    """Ablation rows as a markdown table: one row per (sites, init), one column pair per preset."""
    presets = list(dict.fromkeys(row["preset"] for row in rows))
    keys = list(dict.fromkeys((row["sites"], row["init"]) for row in rows))
    lookup = {(row["preset"], row["sites"], row["init"]): row for row in rows}
    header = "| sites | init | " + " | ".join(f"{p} loss | {p} Δ" for p in presets) + " |"
    lines = [f"float model: {float_loss:.4f} nats/token", "", header, "|" + "---|" * (2 + 2 * len(presets))]
    for sites, init in keys:
        cells = []
        for name in presets:
            row = lookup.get((name, sites, init))
            cells += [f"{row['loss']:.4f}", f"{row['delta']:+.4f}"] if row else ["", ""]
        lines.append(f"| {sites} | {init} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_channel_ranges(panels, out_dir: Path, layer: int) -> list[Path]:
    """Save one PNG per site and one with all sites: per-channel max |x| before and after rotation.

    panels: list of (site, before (d,), after (d,)).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    figure, axes = plt.subplots(2, 3, figsize=(15, 7))
    for axis, (site, before, after) in zip(axes.flat, panels):
        _draw(axis, site, before, after, layer)
        single, single_axis = plt.subplots(figsize=(6, 3.5))
        _draw(single_axis, site, before, after, layer)
        single.tight_layout()
        path = out_dir / f"channel_ranges_{site}.png"
        single.savefig(path, dpi=100)
        plt.close(single)
        paths.append(path)
    figure.tight_layout()
    path = out_dir / "channel_ranges.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return [path] + paths


def _draw(axis, site, before, after, layer) -> None:
    where = "residual stream" if site == "R1" else f"layer {layer}"
    axis.plot(before.numpy(), label="before", linewidth=0.8)
    axis.plot(after.numpy(), label="after K·H", linewidth=0.8)
    axis.set_title(f"{site} ({where}): per-channel max |x|")
    axis.set_xlabel("channel")
    axis.legend()
