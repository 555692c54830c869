"""Tables, CSV files and plots of recipe results."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from mambaspin.errors import UserError
from mambaspin.io import read_json_object, write_text_atomic


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
    return read_json_object(path)


def _guarded_section(paths: list[Path], build):
    """Call `build()`; a missing or malformed field of a benchmark output becomes a UserError naming the files."""
    try:
        return build()
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as error:
        if isinstance(error, UserError):
            raise
        names = ", ".join(str(path) for path in paths if path.is_file()) or ", ".join(str(path) for path in paths)
        raise UserError(f"{names}: a field is missing or malformed ({type(error).__name__}: {error}); rerun the "
                        "command that writes it, or delete it") from error


def check_runs_dir(runs: Path) -> None:
    """Reject a runs directory that does not exist or contains none of the benchmark outputs."""
    if not runs.is_dir():
        raise UserError(f"runs directory {runs} does not exist; pass --runs with the directory the benchmarks wrote to")
    outputs = [runs / "default" / "results.json", runs / "w4a8" / "results.json", runs / "bench_speed.json",
               runs / "bench" / "bench_quality" / "quality.json", runs / "default" / "ablation" / "ablation.md"]
    speed = _read_json(runs / "bench_speed.json") or {}
    measured = [path for path in outputs if path.is_file() and path.name != "bench_speed.json"]
    if not measured and not set(speed) & {"scan", "qat_step", "calibration_memory", "cayley", "inference"}:
        raise UserError(f"{runs} contains none of the benchmark outputs ({', '.join(str(p) for p in outputs)}); "
                        "run the benchmarks first (see scripts/make_report.py --help)")


def trained_model_name(runs: Path) -> str:
    """Name the model the training runs used, from their results.json (older files do not record it)."""
    names = {(_read_json(runs / folder / "results.json") or {}).get("model") for folder in ("default", "w4a8")}
    names.discard(None)
    return ", ".join(sorted(names)) or "the model of configs/default.yaml"


def _eval_tokens_text(runs: Path) -> str:
    """Say which validation tokens the training runs were evaluated on, from their results.json."""
    caps = {(_read_json(runs / folder / "results.json") or {}).get("max_eval_tokens", "unknown")
            for folder in ("default", "w4a8") if (runs / folder / "results.json").is_file()}
    if caps == {0}:
        return "the whole validation split"
    if len(caps) == 1 and isinstance(next(iter(caps)), int):
        return f"the first {next(iter(caps)):,} validation tokens"
    return "the validation split (data.max_eval_tokens is not recorded the same in every run)"


def _training_section(runs: Path) -> list[str]:
    lines = [f"## Quantization-aware training on {trained_model_name(runs)}", "",
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
    lines += ["", f"Validation loss in nats per token on {_eval_tokens_text(runs)}. Commands: "
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
        lines += [f"QAT step / plain LoRA step ({step['tokens_per_step']} tokens per step): "
                  f"{step['qat_over_plain']:.2f} with cross-entropy only, {step['qat_distill_over_plain']:.2f} with "
                  "distillation (one extra teacher forward).", ""]
    if "calibration_memory" in speed:
        lines += ["Calibration memory (sites R1, R2, R5, R6), peak resident memory added by calibration over the "
                  "loaded model and data: " + ", ".join(
                      f"{row['tokens']:,} tokens +{row['growth_mb']:.0f} MB ({row['ratio_to_smallest']:.2f}x)"
                      for row in speed["calibration_memory"]) + ".", ""]
    if "cayley" in speed:
        lines += ["Cayley step of geoopt's RiemannianSGD against one d x d matmul: " + ", ".join(
            f"d={row['d']}: {row['cayley_step_seconds']:.3f} s ({row['ratio_to_matmul']:.1f}x)"
            for row in speed["cayley"]) + ".", ""]
    if "inference" in speed:
        row = speed["inference"]
        source = row.get("checkpoint", "the exported checkpoint")
        lines += [f"Inference of the quantized checkpoint ({source}, loaded by `load_quantized`) against the float "
                  f"model: {row['quantized_over_float']:.2f}x the float tokens per second (simulated quantization: "
                  "no integer kernels, so this measures the overhead of online rotations and quantizers).", ""]
    return lines


def build_results_page(runs: Path, out: Path) -> Path:
    """Write OUT/results.md from the benchmark outputs under RUNS, copying the plots into OUT."""
    import datetime
    import platform

    import torch

    lines = ["# Results", "", f"Generated by `python scripts/make_report.py` on {datetime.date.today()} "
             f"({platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, CPU only).", ""]
    check_runs_dir(runs)
    lines += _guarded_section([runs / "default" / "results.json", runs / "w4a8" / "results.json",
                               runs / "ortho1000" / "results.json"], lambda: _training_section(runs))
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
        summary = _read_json(quality / "quality.json") or {}
        lines += ["`python scripts/bench_quality.py`. " + quality_settings_text(summary), "",
                  (quality / "quality.md").read_text(), ""]
        chart = _copy(quality / "quality.png", out)
        if chart:
            lines += [f"![loss gap to float per method]({chart})", ""]
    else:
        lines += ["not run (`python scripts/bench_quality.py`)", ""]
    lines += _guarded_section([runs / "bench_speed.json"], lambda: _speed_section(runs))
    page = out / "results.md"
    write_text_atomic(page, "\n".join(lines))
    return page


# ---------------------------------------------------------------------------------------------
# The README's results section

README_START = "<!-- results:start: generated by `python scripts/make_report.py` from the benchmark outputs -->"
README_END = "<!-- results:end -->"
TARGETS = {"W4A4": 0.05, "W4A8": 0.005}  # goals for the trained gap to float, nats/token
MINUTES_TARGET, QAT_STEP_TARGET, SCAN_TARGET, ORTHO_TARGET = 15.0, 1.6, 1 / 20, 1e-5


def machine_line() -> str:
    """Date, CPU and software of the machine that builds the report."""
    import datetime
    import os
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{datetime.date.today()}, {cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def _training_rows(runs: Path) -> tuple[list[str], list[str]]:
    """README table of the two training runs, and the targets they miss."""
    lines = ["| preset | float | round-to-nearest | KLT-enhanced PTQ | trained rotations + LoRA | target | minutes |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    misses = []
    for preset, folder in (("W4A4", "default"), ("W4A8", "w4a8")):
        result = _read_json(runs / folder / "results.json")
        if result is None:
            lines.append(f"| {preset} | not run | | | | | |")
            continue
        gap = result["trained"] - result["float"]
        minutes = result.get("minutes")
        lines.append(f"| {preset} | {result['float']:.4f} | {result['rtn'] - result['float']:+.4f} | "
                     f"{result['klt_ptq'] - result['float']:+.4f} | {gap:+.4f} | ≤ {TARGETS[preset]} | "
                     f"{'-' if minutes is None else f'{minutes:.1f}'} |")
        if gap > TARGETS[preset]:
            misses.append(f"{preset}: trained gap {gap:+.4f} nats/token, above the target {TARGETS[preset]}")
        if preset == "W4A4" and minutes is not None and minutes > MINUTES_TARGET:
            misses.append(f"the default run took {minutes:.1f} minutes, above the target of {MINUTES_TARGET:.0f}")
    return lines, misses


def quality_settings_text(quality: dict) -> str:
    """Describe in one sentence what a quality benchmark ran: model, text, evaluation tokens, sites, budget."""
    settings = quality.get("settings")
    if not settings:
        return "Its settings were not recorded in quality.json; each row gives its sites, steps and tokens."
    tokens = f"{settings['max_eval_tokens']:,}" if settings["max_eval_tokens"] else "all"
    return (f"Model {settings['model']}, text {settings['text']}, loss on {tokens} validation tokens; sites "
            f"{'+'.join(settings['sites']) or 'none'} (Hadamard-based rows drop the sites whose size has no Hadamard "
            f"matrix); trained rows run {settings['max_steps']} steps of {settings['tokens_per_step']:,} tokens.")


def _quality_pivot(quality: dict) -> list[str]:
    """Methods compared: one row per method and weight quantizer, one gap column per preset."""
    rows = quality["rows"]
    presets = list(dict.fromkeys(row["preset"] for row in rows))
    variants = list(dict.fromkeys((row["method"], row["weights"]) for row in rows))
    gaps = {(row["preset"], row["method"], row["weights"]): row["gap"] for row in rows}
    steps = {row["method"]: (row["train_steps"], row["train_tokens"]) for row in rows}
    lines = ["| method | weights | train steps (tokens) | " + " | ".join(f"{p} gap" for p in presets) + " |",
             "|---|---|---:|" + "---:|" * len(presets)]
    for method, weights in variants:
        trained = steps[method][0]
        cells = [f"{gaps[(p, method, weights)]:+.4f}" if (p, method, weights) in gaps else "-" for p in presets]
        budget = f"{trained} ({steps[method][1]:,})" if trained else "0"
        lines.append(f"| {method} | {weights} | {budget} | " + " | ".join(cells) + " |")
    return lines


def _speed_lines(speed: dict) -> tuple[list[str], list[str]]:
    """README bullets of the speed benchmark, and the targets it misses."""
    lines, misses = [], []
    if "scan" in speed:
        worst = max(row["ratio_to_transformers"] for row in speed["scan"])
        lines.append(f"- selective scan forward + backward: at most {worst:.3f}x the time of transformers' CPU path "
                     f"(d_inner {', '.join(str(row['d_inner']) for row in speed['scan'])})")
        if worst > SCAN_TARGET:
            misses.append(f"the scan takes {worst:.3f}x transformers' time, above the target 1/20")
    if "qat_step" in speed:
        step = speed["qat_step"]
        lines.append(f"- one QAT step: {step['qat_over_plain']:.2f}x a plain LoRA step with cross-entropy, "
                     f"{step['qat_distill_over_plain']:.2f}x with distillation (one more teacher forward)")
        if step["qat_over_plain"] > QAT_STEP_TARGET:
            misses.append(f"a QAT step costs {step['qat_over_plain']:.2f}x a plain LoRA step, above {QAT_STEP_TARGET}x")
    if "calibration_memory" in speed:
        rows = speed["calibration_memory"]
        lines.append(f"- memory added by calibration: +{rows[0]['growth_mb']:.0f} MB at {rows[0]['tokens']:,} tokens, "
                     f"+{rows[-1]['growth_mb']:.0f} MB at {rows[-1]['tokens']:,} tokens "
                     f"({rows[-1]['ratio_to_smallest']:.2f}x)")
        if rows[-1]["ratio_to_smallest"] > 1.5:
            misses.append(f"calibration memory grows with the number of tokens ({rows[-1]['ratio_to_smallest']:.2f}x "
                          f"from {rows[0]['tokens']:,} to {rows[-1]['tokens']:,})")
    if "cayley" in speed:
        lines.append("- Cayley step against one d x d matmul: " + ", ".join(
            f"{row['ratio_to_matmul']:.1f}x at d={row['d']}" for row in speed["cayley"]))
    if "inference" in speed:
        ratio = speed["inference"]["quantized_over_float"]
        lines.append(f"- inference of the merged W4A4 checkpoint: {ratio:.2f}x the float model's tokens per second")
        if ratio < 1:
            misses.append(f"the quantized checkpoint runs at {ratio:.2f}x the float model's speed: quantization is "
                          "simulated (weights dequantized at load, activations fake-quantized) and there are no integer "
                          "kernels yet")
    return lines, misses


KNOWN_LIMITS = [
    "the packed checkpoint loads with mambaspin (`mambaspin.export.load_quantized`, `mambaspin eval`), not with "
    "transformers' AutoModelForCausalLM, which stops on its quantization_config; `mambaspin merge --format hf` "
    "writes a float checkpoint that transformers loads when only R1 and R5 are used",
    "mamba_ssm's CUDA scan and bf16 autocast are wired in but were not run for these figures (no GPU)",
    "the shipped model is tiny (1.9M parameters): the gaps are measured on it, not on the public Mamba checkpoints",
]


def checkpoint_megabytes(path: Path) -> dict[str, float]:
    """Bytes of a safetensors file by kind, in MB: packed linears (codes, scales, zero points),
    online rotation matrices, and float tensors (embedding, lm_head, norms, conv1d, A_log, D, ...)."""
    from safetensors import safe_open

    sizes = {"packed linears": 0, "online rotations": 0, "float tensors": 0}
    with safe_open(str(path), framework="pt") as handle:
        for name in handle.keys():
            tensor = handle.get_slice(name)
            count = 1
            for dim in tensor.get_shape():
                count *= dim
            nbytes = count * {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "I32": 4, "I64": 8}[tensor.get_dtype()]
            kind = ("online rotations" if ".online." in name else
                    "packed linears" if name.rsplit(".", 1)[-1] in ("qweight", "scale", "zero") else "float tensors")
            sizes[kind] += nbytes
    return {kind: value / 1e6 for kind, value in sizes.items()}


def _size_miss(runs: Path) -> list[str]:
    """Report the size of the merged W4A4 checkpoint against the float model, when it is larger."""
    from .config import DEFAULT_MODEL

    merged, float_file = runs / "default" / "quantized" / "model.safetensors", DEFAULT_MODEL / "model.safetensors"
    if not merged.is_file() or not float_file.is_file():
        return []
    sizes, float_mb = checkpoint_megabytes(merged), sum(checkpoint_megabytes(float_file).values())
    total = sum(sizes.values())
    if total <= float_mb:
        return []
    return [f"the merged W4A4 checkpoint is {total:.1f} MB against {float_mb:.1f} MB for the float model. Its "
            f"online rotations (R2 and R6, dense float32 d_inner x d_inner per layer) take "
            f"{sizes['online rotations']:.1f} MB. Its float tensors (embedding, untied lm_head, ...) take "
            f"{sizes['float tensors']:.1f} MB, and its packed linears {sizes['packed linears']:.1f} MB. A compact "
            "form of the online rotations is not supported yet; on larger models they grow as d_inner²"]


def _readme_quality(runs: Path, docs: Path) -> list[str]:
    path = runs / "bench" / "bench_quality" / "quality.json"
    quality = _read_json(path)
    if quality is None:
        return ["Methods compared: not run (`python scripts/bench_quality.py`).", ""]
    lines = _guarded_section([path], lambda: [
        f"Methods compared in one run (`scripts/bench_quality.py`, float {quality['float_loss']:.4f} on its evaluation "
        f"tokens). {quality_settings_text(quality)}", "", *_quality_pivot(quality), ""])
    if (docs / "quality.png").is_file():
        lines += ["![validation loss gap to float per method and preset](docs/quality.png)", ""]
    return lines


def _readme_speed(runs: Path) -> tuple[list[str], list[str]]:
    speed = _read_json(runs / "bench_speed.json")
    if speed is None:
        return ["Speed and memory: not run (`python scripts/bench_speed.py --json runs/bench_speed.json`).", ""], []
    speed_lines, misses = _guarded_section([runs / "bench_speed.json"], lambda: _speed_lines(speed))
    return ["Speed and memory (`scripts/bench_speed.py`, ratios against a baseline of the same run, median of "
            "repeats):", "", *speed_lines, ""], misses


def _ortho_miss(runs: Path) -> list[str]:
    path = runs / "ortho1000" / "results.json"
    ortho = _read_json(path)
    if ortho is None:
        return []
    return _guarded_section([path], lambda: [
        f"max |RᵀR − I| after {ortho['steps']} steps is {ortho['orthogonality_error']:.1e}"
    ] if ortho["orthogonality_error"] > ORTHO_TARGET else [])


def readme_results_section(runs: Path, docs: Path) -> str:
    """Build the README's results section: machine, training table, methods compared, chart, speed, limits."""
    check_runs_dir(runs)
    training, misses = _guarded_section([runs / "default" / "results.json", runs / "w4a8" / "results.json"],
                                        lambda: _training_rows(runs))
    lines = [README_START, "", f"Measured on {machine_line()}. Validation loss gap to the float model in nats per "
             "token; rebuild this section and [docs/results.md](docs/results.md) with `python scripts/make_report.py`.",
             "", f"Quantization-aware training on {trained_model_name(runs)} (`mambaspin train`, `mambaspin train "
             f"--config configs/w4a8.yaml`), loss on {_eval_tokens_text(runs)}:", "", *training, ""]

    # Methods compared, then speed and memory
    lines += _readme_quality(runs, docs)
    speed_lines, speed_misses = _readme_speed(runs)
    lines += speed_lines

    # What misses its goal: measured above, then the limits that hold whatever the numbers
    misses += speed_misses + _size_miss(runs) + _ortho_miss(runs)
    lines += ["What is not yet as good as the goal:", "", *[f"- {item};" for item in misses + KNOWN_LIMITS[:-1]],
              f"- {KNOWN_LIMITS[-1]}.", "", README_END]
    return "\n".join(lines)


def update_readme(readme: Path, section: str) -> Path:
    """Replace the text between the results markers of `readme` with `section` (markers included)."""
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"{readme} has no results markers: put {README_START!r} and {README_END!r} "
                         "around the section to regenerate")
    return write_text_atomic(readme, text[:start] + section + text[end + len(README_END):])
