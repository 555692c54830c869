"""Quality benchmark: validation loss of each quantization method, measured in one run.

Methods, all with the run config's rotation sites:
    rtn               round-to-nearest, no rotation
    hadamard          fixed Hadamard rotations, post-training (QuaRot-style)
    klt_hadamard      KLT-enhanced rotations, post-training (MambaQuant-style)
    learned           rotations trained under QAT, no LoRA (SpinQuant-style)
    learned_lora      rotations and LoRA trained under QAT (mambaspin)
each optionally followed by GPTQ instead of round-to-nearest weights.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from mambaspin.evaluate import evaluate_text
from mambaspin.export import load_quantized
from mambaspin.io import write_json_atomic, write_text_atomic

from .ablate import ptq_loss
from .checkpoints import checkpoint_root
from .config import QuantSection, RunConfig
from .inputs import load_inputs, load_or_run_calibration
from .loop import train
from .merge import merge
from .report import write_csv

logger = logging.getLogger(__name__)

METHODS = ("rtn", "hadamard", "klt_hadamard", "learned", "learned_lora")


def _trained_losses(config: RunConfig, method: str, out_dir: Path, gptq: bool) -> dict:
    """Train one QAT run (with or without LoRA), then evaluate its merged checkpoints."""
    lora = dataclasses.replace(config.lora, rank=0) if method == "learned" else config.lora
    run_config = dataclasses.replace(config, lora=lora, output_dir=str(out_dir / f"{method}_{config.quant.preset}"))

    # The benchmark owns OUT/METHOD_PRESET: a rerun starts over instead of resuming an old run.
    stale = checkpoint_root(run_config.output_dir)
    if stale.is_dir():
        logger.info("removing %s, left by an earlier benchmark run", stale)
        shutil.rmtree(stale)
    results = train(run_config, progress=False)
    losses = {"rtn_weights": results["trained"]}
    if gptq:
        merged = merge(run_config.output_dir, Path(run_config.output_dir) / "merged_gptq", gptq=True, overwrite=True)
        model = load_quantized(merged["out"])
        inputs = load_inputs(run_config)
        losses["gptq_weights"] = evaluate_text(model, inputs.tokenizer, inputs.validation_text,
                                               run_config.data.block_size, progress=False).loss_per_token
    losses["steps"], losses["tokens"] = results["steps"], results["tokens"]
    return losses


def quality_benchmark(config: RunConfig, presets, methods=METHODS, gptq: bool = True, out_dir=None) -> dict:
    """Run every method at every preset; write quality.csv, quality.json, quality.md and a chart."""
    out_dir = Path(out_dir or Path(config.output_dir) / "bench_quality")
    inputs = load_inputs(config)
    calibration = load_or_run_calibration(config, inputs, config.rotation.needs_statistics() or ("R1",), progress=False)
    float_loss = ptq_loss(config, inputs, None, None, (), "none")
    sites = config.rotation.applied
    rows = []
    for preset in presets:
        preset_config = dataclasses.replace(config, quant=dataclasses.replace(config.quant, preset=preset))
        scheme = preset_config.quant.scheme()
        for method in methods:
            if method in ("learned", "learned_lora"):
                losses = _trained_losses(preset_config, method, out_dir, gptq)
                steps, tokens = losses.pop("steps"), losses.pop("tokens")
            else:
                method_sites = () if method == "rtn" else sites
                losses = {"rtn_weights": ptq_loss(preset_config, inputs, calibration, scheme, method_sites, method)}
                if gptq:
                    losses["gptq_weights"] = ptq_loss(preset_config, inputs, calibration, scheme, method_sites, method, gptq=True)
                steps, tokens = 0, 0
            for weights, loss in losses.items():
                rows.append({"preset": preset, "method": method, "weights": weights.replace("_weights", ""),
                             "sites": "+".join(sites) if method != "rtn" else "none", "train_steps": steps,
                             "train_tokens": tokens, "loss": loss, "gap": loss - float_loss})
                logger.info("%s %s %s: loss %.4f (gap %+.4f)", preset, method, weights, loss, loss - float_loss)
    return _write_quality(out_dir, rows, float_loss)


def _write_quality(out_dir: Path, rows: list[dict], float_loss: float) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "quality.csv", rows)
    table = quality_table(rows, float_loss)
    write_text_atomic(out_dir / "quality.md", table)
    chart = plot_gaps(rows, out_dir / "quality.png")
    report = {"float_loss": float_loss, "rows": rows, "table": table, "chart": str(chart), "out": str(out_dir)}
    write_json_atomic(out_dir / "quality.json", report)
    return report


def quality_table(rows: list[dict], float_loss: float) -> str:
    lines = [f"float model: {float_loss:.4f} nats/token", "",
             "| preset | method | weights | sites | train steps | train tokens | loss | gap to float |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['preset']} | {row['method']} | {row['weights']} | {row['sites']} | {row['train_steps']} | "
                     f"{row['train_tokens']} | {row['loss']:.4f} | {row['gap']:+.4f} |")
    return "\n".join(lines) + "\n"


def plot_gaps(rows: list[dict], path: Path) -> Path:
    """Bar chart of the loss gap to the float model, one group of bars per preset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(row["preset"] for row in rows))
    variants = list(dict.fromkeys((row["method"], row["weights"]) for row in rows))
    lookup = {(row["preset"], row["method"], row["weights"]): row["gap"] for row in rows}
    figure, axis = plt.subplots(figsize=(max(6, 1.6 * len(presets) * len(variants) / 4), 4))
    width = 0.8 / len(variants)
    for index, (method, weights) in enumerate(variants):
        gaps = [lookup.get((preset, method, weights), 0.0) for preset in presets]
        positions = [p + index * width for p in range(len(presets))]
        axis.bar(positions, gaps, width, label=f"{method} ({weights})")
    axis.set_xticks([p + 0.4 - width / 2 for p in range(len(presets))], presets)
    axis.set_ylabel("validation loss gap to float (nats/token)")
    axis.set_yscale("symlog", linthresh=0.01)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
