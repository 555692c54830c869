"""Recipe `mambaspin ablate`: post-training quantization loss per rotation site and init.

For each quantization preset (round-to-nearest weights, calibrated activation scales, no
training), the validation loss with no rotation, with each site alone and with all sites, for
each init. Every row starts from a fresh copy of the float model.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mambaspin.errors import UserError
from mambaspin.evaluate import evaluate_text
from mambaspin.io import check_output_path, write_text_atomic
from mambaspin.quant_model import QuantScheme, preset, quantize_model_ptq
from rotations.calibration import SampleRecorder, collect_statistics, stat_key
from rotations.config import INITS, SITES
from rotations.fold import apply_rotations
from rotations.klt import build_rotations, hadamard_sites

from .config import RunConfig
from .inputs import RunInputs, load_inputs, load_or_run_calibration
from .report import plot_channel_ranges, write_csv, markdown_table

logger = logging.getLogger(__name__)

PRESETS = ("W8A8", "W4A8", "W4A4")
ABLATION_INITS = ("hadamard", "klt", "klt_hadamard")


def ptq_loss(config: RunConfig, inputs: RunInputs, calibration, scheme: QuantScheme | None, sites, init,
             gptq: bool = False) -> float:
    """Validation loss per token of the float model rotated at `sites` and quantized by `scheme`
    (round-to-nearest weights, or GPTQ with `gptq`)."""
    model = copy.deepcopy(inputs.model)
    if sites:
        rotation = config.rotation.with_sites(tuple(sites), init)
        apply_rotations(model, build_rotations(rotation, model, calibration))
    if scheme is not None:
        act_blocks = inputs.calibration_blocks[: max(1, min(16, inputs.calibration_blocks.shape[0]))]
        quantize_model_ptq(model, scheme, act_blocks, progress=False, gptq=gptq)
    result = evaluate_text(model, inputs.tokenizer, inputs.validation_text, config.data.block_size, progress=False)
    return result.loss_per_token


def ablation_variants(inits, presets, model_config=None):
    """(preset, sites, init) of every row: none, each site alone and all sites, per init.

    With `model_config`, Hadamard-based inits skip the sites whose size has no Hadamard matrix
    (an odd dt_rank, say); their "all" row then rotates the other sites.
    """
    skipped = set()
    variants = []
    for name in presets:
        variants.append((name, (), "none"))
        for init in inits:
            sites = SITES
            if model_config is not None and init in ("hadamard", "klt_hadamard"):
                sites, missing = hadamard_sites(SITES, model_config)
                skipped.update((site, init) for site in missing)
            variants += [(name, (site,), init) for site in sites]
            variants.append((name, sites, init))
    if skipped:
        logger.warning("no Hadamard matrix for the size of %s: those rows are left out and the 'all' rows hold the "
                       "other sites", ", ".join(f"{site} with init {init}" for site, init in sorted(skipped)))
    return variants


def site_label(sites) -> str:
    """Row label: none, the one site, all, or the sites joined by +."""
    if not sites:
        return "none"
    return "all" if len(sites) == len(SITES) else "+".join(sites)


def ablate(config: RunConfig, out_dir=None, presets=PRESETS, inits=ABLATION_INITS, progress: bool = True) -> dict:
    """Run the ablation and write ablation.csv, ablation.md and channel-range plots into `out_dir`."""
    out_dir = Path(out_dir or Path(config.output_dir) / "ablation")
    check_output_path(out_dir, "--out", directory=True)
    presets, inits = tuple(dict.fromkeys(presets)), tuple(dict.fromkeys(inits))
    for name in presets:
        preset(name)  # raises UserError naming the valid presets
    unknown = [init for init in inits if init not in INITS]
    if unknown:
        raise UserError(f"--inits {','.join(unknown)} is invalid: expected names from {', '.join(INITS)}")
    inputs = load_inputs(config)
    calibration = load_or_run_calibration(config, inputs, SITES, progress)
    float_loss = ptq_loss(config, inputs, None, None, (), "none")
    rows = []
    for name, sites, init in tqdm(ablation_variants(inits, presets, inputs.model.config), desc="ablate",
                                  disable=not progress):
        scheme = preset(name)
        scheme = QuantScheme(scheme.weight, scheme.act, config.quant.lm_head, config.quant.ssm_inputs)
        loss = ptq_loss(config, inputs, calibration, scheme, sites, init)
        label = site_label(sites)
        rows.append({"preset": name, "sites": label, "init": init, "loss": loss, "delta": loss - float_loss})
        logger.info("%s %s %s: loss %.4f (%+.4f)", name, label, init, loss, loss - float_loss)
    write_csv(out_dir / "ablation.csv", rows)
    table = markdown_table(rows, float_loss)
    write_text_atomic(out_dir / "ablation.md", table)
    plots = plot_site_ranges(config, inputs, calibration, out_dir)
    return {"float_loss": float_loss, "rows": rows, "table": table, "plots": plots, "out": str(out_dir)}


@torch.no_grad()
def plot_site_ranges(config: RunConfig, inputs: RunInputs, calibration, out_dir: Path, layer: int = 0) -> list[str]:
    """Per-channel max |x| before and after the KLT-enhanced rotation at each site with a Hadamard size (layer 0)."""
    blocks = inputs.calibration_blocks[:4]
    recorders = collect_statistics(inputs.model, blocks, SITES, progress=False, make=SampleRecorder)
    sites, _ = hadamard_sites(SITES, inputs.model.config)
    rotation = build_rotations(config.rotation.with_sites(sites, "klt_hadamard"), inputs.model, calibration)
    panels = []
    for site in sites:
        samples = recorders[stat_key(site, None if site == "R1" else layer)].samples()  # (n, d)
        matrix = rotation.get(site, layer)
        panels.append((site, samples.abs().amax(0), (samples @ matrix).abs().amax(0)))
    return [str(p) for p in plot_channel_ranges(panels, out_dir, layer)]
