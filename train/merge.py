"""Recipe `mambaspin merge`: fold a trained run into a quantized (or plain Hugging Face) checkpoint.

The QAT model is rebuilt from the run's config and loaded from the checkpoint, then every linear
is written as the codes of exactly the weight it computed with in training: Q(T(W + s·B·A)), from
the same float32 arithmetic, so the loaded checkpoint reproduces the training-time logits.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from mambaspin import configtools
from mambaspin.data import resolve_path
from mambaspin.io import check_output_path
from mambaspin.errors import NotSupportedError, UserError
from mambaspin.gptq import collect_hessians, gptq_quantize
from mambaspin.export import ONLINE_SITES, pack_codes, quantization_config, write_quantized
from mambaspin.loading import load_model, resolve_model_dir, save_model
from mambaspin.model import MambaLM
from mambaspin.quant import ActFakeQuantizer, quantize_weight
from mambaspin.quant_model import LINEAR_INPUT_POINTS, LINEARS, SSM_POINTS
from mambaspin.tokenizer import load_tokenizer
from rotations.calibration import model_fingerprint
from rotations.config import site_size
from rotations.klt import RotationSet

from .checkpoints import read_metadata, resolve_checkpoint
from .config import DTYPES, RunConfig
from .loop import identity_mismatch
from .inputs import load_calibration_blocks
from .qat_model import build_qat_model, make_act_scales_learnable, qat_linears

logger = logging.getLogger(__name__)

MERGE_TITLE = "# Merged mambaspin checkpoint"  # first line of the README.md every merge writes


def placeholder_rotations(config: RunConfig, model_config) -> RotationSet:
    """Identity matrices (and unit smoothing scales) of the run's shapes, overwritten by the checkpoint."""
    rotations = RotationSet(layer_matrices=[{} for _ in range(model_config.n_layer)])
    for site in config.rotation.applied:
        eye = torch.eye(site_size(site, model_config), dtype=torch.float64)
        if site == "R1":
            rotations.global_matrices["R1"] = eye
        else:
            for matrices in rotations.layer_matrices:
                matrices[site] = eye.clone()
    if config.rotation.smooth.apply:
        rotations.smooth_scales = [torch.ones(model_config.d_inner, dtype=torch.float64)] * model_config.n_layer
    return rotations


def load_trained(run_dir: str | Path, checkpoint: str = "latest"):
    """Rebuild the QAT model of a run at a checkpoint. Returns (config, model, tokenizer, path)."""
    path = resolve_checkpoint(run_dir, checkpoint, hint="pass the output_dir of a training run to --run")
    metadata = read_metadata(path)
    config = configtools.build(RunConfig, metadata["config"])
    model_dir = resolve_model_dir(config.model.path)
    model = load_model(model_dir, dtype=DTYPES[config.model.dtype])
    differs = identity_mismatch(metadata, config, model_fingerprint(model))
    if differs:
        raise UserError(f"checkpoint {path} does not match {config.model.path} and its run config ({differs} "
                        "differ): point model.path at the model the run started from, with the mambaspin version "
                        "that trained it")
    build_qat_model(model, placeholder_rotations(config, model.config), config.rotation, config.quant.scheme(),
                    config.lora.settings())
    if config.train.learnable_act_scales:
        for quantizer in model.modules():
            if isinstance(quantizer, ActFakeQuantizer) and quantizer.cfg.static:
                quantizer.frozen = True
        make_act_scales_learnable(model)
    try:
        state = load_file(str(path / "model.safetensors"))
    except Exception as error:  # safetensors raises its own error type on truncated files
        raise UserError(f"cannot read {path / 'model.safetensors'}: {error}") from error
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:  # missing, unexpected or misshapen tensors
        raise UserError(f"checkpoint {path} does not match the model its run config builds: "
                        f"{' '.join(str(error).split())}") from error
    tokenizer = load_tokenizer(config.model.tokenizer or model_dir)
    return config, model.eval(), tokenizer, path


def _point_quantizer(module) -> ActFakeQuantizer | None:
    chain = list(module) if isinstance(module, torch.nn.Sequential) else [module]
    return next((m for m in chain if isinstance(m, ActFakeQuantizer)), None)


@torch.no_grad()
def quantized_tensors(model, scheme, hessians: dict | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the quantized checkpoint, from a QAT model (see mambaspin.export).

    hessians: {QATLinear module: HessianAccumulator} to quantize those weights with GPTQ
    instead of round-to-nearest.
    """
    params, tensors = model.rotations, {}
    embedding = model.backbone.embeddings.weight.float()
    r1 = params.get("R1", None)
    tensors["backbone.embeddings.weight"] = embedding if r1 is None else embedding @ r1.float()
    for layer, block in enumerate(model.backbone.layers):
        prefix, mixer = f"backbone.layers.{layer}", block.mixer
        tensors[f"{prefix}.norm.weight"] = block.norm.weight.float()
        tensors[f"{prefix}.mixer.conv1d.weight"] = mixer.conv1d.weight.float()
        if mixer.conv1d.bias is not None:
            tensors[f"{prefix}.mixer.conv1d.bias"] = mixer.conv1d.bias.float()
        tensors[f"{prefix}.mixer.A_log"] = mixer.A_log.float()
        tensors[f"{prefix}.mixer.D"] = mixer.D.float()
        for name in LINEARS:
            linear = getattr(mixer, name)
            tensors.update(_linear_tensors(linear, f"{prefix}.mixer.{name}", (hessians or {}).get(linear)))
        for site in ONLINE_SITES:
            value = params.smooth(layer) if site == "smooth" else params.get(site, layer)
            if value is not None:
                tensors[f"{prefix}.mixer.online.{site}"] = value.float()
        points = list(LINEAR_INPUT_POINTS.values()) + (list(SSM_POINTS) if scheme.ssm_inputs else [])
        for point in points:
            tensors.update(_act_tensors(_point_quantizer(mixer.points[point]), f"{prefix}.mixer.act.{point}"))
    tensors["backbone.norm_f.weight"] = model.backbone.norm_f.weight.float()
    tensors.update(_linear_tensors(model.lm_head, "lm_head", (hessians or {}).get(model.lm_head)))
    if scheme.lm_head:
        tensors.update(_act_tensors(_point_quantizer(model.points["lm_head_input"]), "act.lm_head_input"))
    return tensors


def _linear_tensors(linear, prefix: str, hessian=None) -> dict:
    weight, bias = linear.effective_weight()
    out = {} if bias is None else {f"{prefix}.bias": bias.float()}
    if not linear.use_quant:
        return out | {f"{prefix}.weight": weight.float()}
    quantizer = linear.quantizer
    if hessian is None:
        codes, scale, zero = quantize_weight(weight.float(), quantizer.cfg, quantizer.effective_clip())
    else:
        codes, scale, zero = gptq_quantize(weight.float(), hessian.hessian(), quantizer.cfg, quantizer.effective_clip())
        scale = scale.float()
    out |= {f"{prefix}.qweight": pack_codes(codes, quantizer.cfg.bits), f"{prefix}.scale": scale}
    return out if zero is None else out | {f"{prefix}.zero": zero}


def _act_tensors(quantizer, prefix: str) -> dict:
    if quantizer is None or not quantizer.cfg.static:
        return {}
    return {f"{prefix}.scale": quantizer.scale.detach().float().reshape(()),
            f"{prefix}.zero": quantizer.zero.detach().float().reshape(())}


def online_sites(config: RunConfig) -> list[str]:
    sites = [site for site in config.rotation.applied if site in ONLINE_SITES]
    return sites + (["smooth"] if config.rotation.smooth.apply else [])


@torch.no_grad()
def float_export_model(model) -> MambaLM:
    """A plain float MambaLM with the offline sites (R1, R5), LoRA and norms folded in."""
    float_model = MambaLM(dataclasses.replace(model.config, tie_embeddings=False))
    tensors = quantized_tensors_float(model)
    float_model.load_state_dict(tensors, strict=True)
    return float_model


def quantized_tensors_float(model) -> dict:
    """State dict of the folded float model (no quantization), in MambaLM names."""
    saved = [(m, m.use_quant) for m in model.modules() if hasattr(m, "use_quant") and hasattr(m, "effective_weight")]
    for module, _ in saved:
        module.use_quant = False
    try:
        tensors = quantized_tensors(model, dataclasses.replace(_no_quant_scheme(), ssm_inputs=False))
    finally:
        for module, flag in saved:
            module.use_quant = flag
    return {k: v for k, v in tensors.items() if ".online." not in k and ".act." not in k}


def _no_quant_scheme():
    from mambaspin.quant_model import QuantScheme

    return QuantScheme()


def merge_readme(config: RunConfig, checkpoint: Path, fmt: str) -> str:
    scheme = config.quant.scheme()
    return (f"{MERGE_TITLE}\n\nMade by `mambaspin merge --format {fmt}` from `{checkpoint}`.\n\n"
            f"- base model: `{config.model.path}`\n- quantization: {scheme.name} "
            f"(weights: {scheme.weight}, activations: {scheme.act})\n"
            f"- rotation sites: {', '.join(config.rotation.applied) or 'none'}; smoothing: {config.rotation.smooth.apply}\n"
            f"- LoRA: rank {config.lora.rank}, alpha {config.lora.alpha}, folded into the weights\n\n"
            "Load with `mambaspin.export.load_quantized(DIR)` or evaluate with `mambaspin eval --model DIR`.\n")


MERGE_OUTPUT = re.compile(r"^(config\.json|model\.safetensors|README\.md|generation_config\.json|"
                          r"(tokenizer|special_tokens_map|vocab|merges|added_tokens|chat_template)[\w.-]*)$")


def check_replaceable(out_dir: str | Path) -> None:
    """Reject --overwrite of a directory that is not an earlier merge output.

    An earlier merge output contains config.json, the README.md a merge writes, and otherwise only
    files a merge writes (model.safetensors, tokenizer files), no subdirectories.
    """
    out = Path(out_dir)
    if not out.is_dir():
        return
    foreign = [path.name + ("/" if path.is_dir() else "") for path in sorted(out.iterdir())
               if path.is_dir() or not MERGE_OUTPUT.match(path.name)]
    readme = out / "README.md"
    written_by_merge = readme.is_file() and readme.read_text(encoding="utf-8", errors="replace").startswith(MERGE_TITLE)
    if not foreign and (out / "config.json").is_file() and written_by_merge:
        return
    listed = "no README.md from mambaspin merge"
    if not (out / "config.json").is_file():
        listed = "no config.json"
    if foreign:
        listed = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
    raise UserError(f"--out {out_dir} exists and is not a merged checkpoint (it contains {listed}); --overwrite "
                    "only replaces an earlier merge output. Remove it yourself or choose another --out")


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_out_dir(out_dir: str | Path, run_dirs: list[Path], config: RunConfig) -> None:
    """Reject an --out whose replacement would delete what the merge reads or the run keeps.

    --out must not be a run directory, the calibration, the base model or the current directory, nor
    a folder above one of them. It must not lie inside a run's checkpoints or calibration or the base model.
    """
    if not str(out_dir).strip():
        raise UserError("--out is empty; pass the directory to write, e.g. runs/default/quantized")
    out = Path(out_dir).resolve()
    example = Path(run_dirs[0]) / "quantized"
    model_dir = Path(resolve_path(config.model.path))  # resolved as the loader resolves it
    models = [(model_dir.resolve(), f"the base model {config.model.path}")] if model_dir.is_dir() else []

    # Folders that --out must not be, nor contain
    never_replaced = [(Path(run).resolve(), f"the run directory {run}") for run in run_dirs]
    never_replaced += [(Path.cwd().resolve(), "the current directory"),
             (config.calibration_dir.resolve(), f"the run's calibration {config.calibration_dir}"), *models]
    for path, description in never_replaced:
        if _within(path, out):
            raise UserError(f"--out {out_dir} would replace {description}; choose another --out, e.g. {example}")

    # Folders that --out must not be inside of
    never_entered = [(run.resolve() / name, f"{run / name}") for run in map(Path, run_dirs)
              for name in ("checkpoints", "calibration")] + models
    for path, description in never_entered:
        if _within(out, path):
            raise UserError(f"--out {out_dir} is inside {description}; choose another --out, e.g. {example}")


def merge(run_dir: str | Path, out_dir: str | Path, checkpoint: str = "latest", fmt: str = "mambaspin",
          overwrite: bool = False, gptq: bool = False) -> dict:
    """Write the merged checkpoint of `run_dir` into `out_dir`; returns a summary.

    With `gptq`, weights are quantized by GPTQ on the run's calibration blocks (Hessians of every
    linear's inputs collected in one pass of the trained model) instead of round-to-nearest with
    the trained clipping, so the result no longer reproduces the training-time logits exactly.
    """
    if fmt not in ("mambaspin", "hf"):
        raise UserError(f"--format {fmt!r} is invalid: expected mambaspin or hf")
    check_output_path(out_dir, "--out", directory=True)
    path = resolve_checkpoint(run_dir, checkpoint, hint="pass the output_dir of a training run to --run")
    run_config = configtools.build(RunConfig, read_metadata(path)["config"])
    check_out_dir(out_dir, [Path(run_dir), path.parent.parent], run_config)
    if Path(out_dir).exists():
        if not overwrite:
            raise UserError(f"output directory {out_dir} exists; pass --overwrite to replace it or choose another --out")
        check_replaceable(out_dir)
    config, model, tokenizer, path = load_trained(run_dir, checkpoint)
    if fmt == "hf":
        online = online_sites(config)
        if online:
            raise NotSupportedError(f"--format hf with online sites {', '.join(online)}: the Hugging Face Mamba format "
                                    "has no place for online rotations; use --format mambaspin, or train with only R1 and R5")
        if Path(out_dir).exists() and not overwrite:
            raise UserError(f"output directory {out_dir} exists; pass --overwrite to replace it or choose another --out")
        try:
            save_model(float_export_model(model), out_dir, tokenizer, {"README.md": merge_readme(config, path, fmt)})
        except OSError as error:
            raise UserError(f"cannot write {out_dir}: {error.strerror}. Choose a writable --out.") from error
    else:
        scheme = config.quant.scheme()
        online = {site: site in config.rotation.applied for site in ("R2", "R3", "R4", "R6")}
        qconfig = quantization_config(scheme, online, config.rotation.smooth.apply) | {"gptq": gptq}
        hessians = None
        if gptq and scheme.weight is not None:
            linears = {module: module for module in qat_linears(model) if module.use_quant}
            blocks = load_calibration_blocks(config, tokenizer)
            collected = collect_hessians(model, {str(i): m for i, m in enumerate(linears)}, blocks)
            hessians = {module: collected[str(i)] for i, module in enumerate(linears)}
        write_quantized(out_dir, model.config, quantized_tensors(model, scheme, hessians), qconfig, tokenizer,
                        merge_readme(config, path, fmt), overwrite)
    logger.info("merged %s into %s (%s format)", path, out_dir, fmt)
    return {"checkpoint": str(path), "out": str(out_dir), "format": fmt}
