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


def _read_json(path: Path):
    import json

    return json.loads(path.read_text()) if path.is_file() else None


def _training_section(runs: Path) -> list[str]:
    lines = ["## Quantization-aware training on the shipped model", "",
             "| preset | float | round-to-nearest | rotations at init | trained | gap | steps | tokens | minutes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for preset, folder in (("W4A4", "default"), ("W4A8", "w4a8")):
        result = _read_json(runs / folder / "results.json")
        if result is None:
            lines.append(f"| {preset} | not run | | | | | | | |")
            continue
        minutes = result.get("minutes")
        minutes = "-" if minutes is None else f"{minutes:.1f}"
        lines.append(f"| {preset} | {result['float']:.4f} | {result['rtn']:.4f} | {result['klt_ptq']:.4f} | "
                     f"{result['trained']:.4f} | {result['trained'] - result['float']:+.4f} | {result['steps']} | "
                     f"{result['tokens']:,} | {minutes} |")
    lines += ["", "Validation loss in nats per token on the validation split (43,558 tokens). Commands: "
              "`mambaspin train` and `mambaspin train --config configs/w4a8.yaml`.", ""]
    ortho = _read_json(runs / "ortho1000" / "results.json")
    if ortho is not None:
        lines += [f"After {ortho['steps']} steps (batch 1 x 32 tokens), max |RᵀR − I| over all rotations: "
                  f"{ortho['orthogonality_error']:.2e} (float32 rotations, re-projected every 10 steps).", ""]
    return lines


def _copy(source: Path, out: Path) -> str | None:
    import shutil

    if not source.is_file():
        return None
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, out / source.name)
    return source.name


def _speed_section(runs: Path) -> list[str]:
    speed = _read_json(runs / "bench_speed.json")
    if speed is None:
        return ["## Speed and memory", "", "not run (`python scripts/bench_speed.py --json runs/bench_speed.json`)", ""]
    lines = ["## Speed and memory", "", "`python scripts/bench_speed.py --json runs/bench_speed.json`; every figure is a "
             "ratio against a baseline measured in the same run (median of repeats).", ""]
    if "scan" in speed:
        lines += ["Selective scan, forward + backward, batch 16 x 128 tokens, d_state 16 (time ratio, below 1 is faster):",
                  "", "| d_inner | ours (s) | transformers (s) | ours / transformers | ours / sequential loop |",
                  "|---:|---:|---:|---:|---:|"]
        for row in speed["scan"]:
            lines.append(f"| {row['d_inner']} | {row['torch_s']:.3f} | {row['transformers_s']:.3f} | "
                         f"{row['ratio_to_transformers']:.4f} | {row['ratio_to_reference']:.2f} |")
        lines.append("")
    if "qat_step" in speed:
        step = speed["qat_step"]
        lines += [f"QAT step / plain LoRA step on the shipped model ({step['tokens_per_step']} tokens): "
                  f"{step['qat_over_plain']:.2f} with cross-entropy only, {step['qat_distill_over_plain']:.2f} with "
                  "distillation (one extra teacher forward).", ""]
    if "calibration_memory" in speed:
        lines += ["Calibration peak memory (sites R1, R2, R5, R6): " + ", ".join(
            f"{row['tokens']:,} tokens {row['max_rss_mb']:.0f} MB ({row['ratio_to_smallest']:.2f}x)"
            for row in speed["calibration_memory"]) + ".", ""]
    if "cayley" in speed:
        lines += ["Cayley step of geoopt's RiemannianSGD against one d x d matmul: " + ", ".join(
            f"d={row['d']}: {row['cayley_step_seconds']:.3f} s ({row['ratio_to_matmul']:.1f}x)"
            for row in speed["cayley"]) + ".", ""]
    if "inference" in speed:
        row = speed["inference"]
        lines += [f"Inference, rotated W4A4 model with fake-quantized activations against the float model: "
                  f"{row['quantized_over_float']:.2f}x the float tokens per second (simulated quantization: "
                  "no integer kernels, so this measures the overhead of online rotations and quantizers).", ""]
    return lines


def build_results_page(runs: Path, out: Path) -> Path:
    """Write OUT/results.md from the benchmark outputs under RUNS, copying the plots into OUT."""
    import datetime
    import platform

    import torch

    lines = ["# Results", "", f"Generated by `python scripts/make_report.py` on {datetime.date.today()} "
             f"({platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, CPU only).", ""]
    lines += _training_section(runs)
    ablation = runs / "default" / "ablation"
    lines += ["## Post-training ablation per site and init", ""]
    if (ablation / "ablation.md").is_file():
        lines += ["`mambaspin ablate data.max_eval_tokens=10000`: round-to-nearest weights, calibrated activation "
                  "scales, no training; loss on the first 10,000 validation tokens.", "",
                  (ablation / "ablation.md").read_text(), ""]
        plot = _copy(ablation / "channel_ranges.png", out)
        if plot:
            lines += [f"![per-channel activation ranges before and after K·H]({plot})", ""]
    else:
        lines += ["not run (`mambaspin ablate`)", ""]
    quality = runs / "bench" / "bench_quality"
    lines += ["## Methods compared", ""]
    if (quality / "quality.md").is_file():
        lines += ["`python scripts/bench_quality.py output_dir=runs/bench max_steps=100 data.max_eval_tokens=10000`: loss on the first 10,000 validation tokens, trained rows with 100 steps of 8 x 256 tokens.", "",
                  (quality / "quality.md").read_text(), ""]
        chart = _copy(quality / "quality.png", out)
        if chart:
            lines += [f"![loss gap to float per method]({chart})", ""]
    else:
        lines += ["not run (`python scripts/bench_quality.py`)", ""]
    lines += _speed_section(runs)
    page = out / "results.md"
    write_text_atomic(page, "\n".join(lines))
    return page
