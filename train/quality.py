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

from mambaspin.errors import UserError
from mambaspin.evaluate import evaluate_text
from mambaspin.export import load_quantized
from mambaspin.io import check_output_path, write_json_atomic, write_text_atomic
from mambaspin.quant_model import preset
from rotations.klt import hadamard_sites

from .ablate import ptq_loss
from .checkpoints import checkpoint_root
from .config import QuantSection, RunConfig
from .inputs import load_inputs, load_or_run_calibration
from .loop import check_run_fits_model, train
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


def check_benchmark(config: RunConfig, presets, methods, model) -> None:
    """Raise UserError for an unknown preset or method, or a trained method that cannot be built, before any work."""
    for name in presets:
        preset(name)
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        raise UserError(f"--methods {','.join(unknown)} is invalid: expected names from {','.join(METHODS)}")
    if "learned" in methods:
        check_run_fits_model(dataclasses.replace(config, lora=dataclasses.replace(config.lora, rank=0)), model)
    if "learned_lora" in methods:
        check_run_fits_model(config, model)


def method_sites(method: str, sites, model_config) -> tuple[str, ...]:
    """Sites a PTQ method rotates: none for rtn; for Hadamard-based methods, the sites with a Hadamard size."""
    if method == "rtn":
        return ()
    if method in ("hadamard", "klt_hadamard"):
        with_hadamard, missing = hadamard_sites(sites, model_config)
        if missing:
            logger.warning("%s: no Hadamard matrix for the size of %s; that row rotates %s only",
                           method, ", ".join(missing), "+".join(with_hadamard) or "nothing")
        return with_hadamard
    return tuple(sites)


def sites_label(sites, applied, method: str) -> str:
    """Sites of a row, naming the config sites a Hadamard-based method left out."""
    label = "+".join(sites) or "none"
    skipped = [site for site in applied if site not in sites] if method in ("hadamard", "klt_hadamard") else []
    return label + (f" ({'+'.join(skipped)} skipped: no Hadamard matrix of its size)" if skipped else "")


def quality_benchmark(config: RunConfig, presets, methods=METHODS, gptq: bool = True, out_dir=None) -> dict:
    """Run every method at every preset; write quality.csv, quality.json, quality.md and a chart.

    The files are rewritten after every method, so an interrupted benchmark keeps the rows it has.
    """
    out_dir = Path(out_dir or Path(config.output_dir) / "bench_quality")
    check_output_path(out_dir, "--out", directory=True)
    presets, methods = tuple(dict.fromkeys(presets)), tuple(dict.fromkeys(methods))
    inputs = load_inputs(config)
    check_benchmark(config, presets, methods, inputs.model)
    calibration = load_or_run_calibration(config, inputs, config.rotation.needs_statistics() or ("R1",), progress=False)
    float_loss = ptq_loss(config, inputs, None, None, (), "none")
    settings = {"model": config.model.path, "text": config.data.text, "max_eval_tokens": config.data.max_eval_tokens,
                "sites": list(config.rotation.applied), "max_steps": config.max_steps,
                "tokens_per_step": config.train.batch_size * config.train.grad_accum * config.data.block_size}
    rows = []
    for preset_name in presets:
        preset_config = dataclasses.replace(config, quant=dataclasses.replace(config.quant, preset=preset_name))
        scheme = preset_config.quant.scheme()
        for method in methods:
            sites = method_sites(method, config.rotation.applied, inputs.model.config)
            if method in ("learned", "learned_lora"):
                losses = _trained_losses(preset_config, method, out_dir, gptq)
                steps, tokens = losses.pop("steps"), losses.pop("tokens")
            else:
                losses = {"rtn_weights": ptq_loss(preset_config, inputs, calibration, scheme, sites, method)}
                if gptq:
                    losses["gptq_weights"] = ptq_loss(preset_config, inputs, calibration, scheme, sites, method,
                                                      gptq=True)
                steps, tokens = 0, 0
            for weights, loss in losses.items():
                rows.append({"preset": preset_name, "method": method, "weights": weights.replace("_weights", ""),
                             "sites": sites_label(sites, config.rotation.applied, method), "train_steps": steps,
                             "train_tokens": tokens, "loss": loss, "gap": loss - float_loss})
                logger.info("%s %s %s: loss %.4f (gap %+.4f)", preset_name, method, weights, loss, loss - float_loss)
            _write_quality(out_dir, rows, float_loss, settings, chart=False)
    return _write_quality(out_dir, rows, float_loss, settings)


def _write_quality(out_dir: Path, rows: list[dict], float_loss: float, settings: dict, chart: bool = True) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "quality.csv", rows)
    table = quality_table(rows, float_loss)
    write_text_atomic(out_dir / "quality.md", table)
    report = {"float_loss": float_loss, "settings": settings, "rows": rows, "table": table, "out": str(out_dir)}
    if chart:
        report["chart"] = str(plot_gaps(rows, out_dir / "quality.png"))
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
