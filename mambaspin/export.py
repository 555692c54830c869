"""The mambaspin quantized checkpoint: writer and loader.

A directory with config.json (the Hugging Face Mamba config plus `quantization_config`),
model.safetensors, the tokenizer and a README. Tensors, for each block i
(prefix `backbone.layers.i.mixer.`):

    {linear}.qweight  int8 codes (out, in), or uint8 with two 4-bit codes per byte (out, in / 2)
    {linear}.scale    float32 (out, 1) per channel or (out, in / group_size, 1) per group
    {linear}.zero     codes' zero point, asymmetric quantizers only
    {linear}.bias     float32, when the linear has a bias
    online.R2 / online.R6 / online.R3 / online.R4 / online.smooth   online rotations (float32)
    act.{point}.scale / act.{point}.zero   static activation scales, per_tensor static only
Float tensors: embedding (R1 folded in), conv1d, A_log, D, dt_proj.bias, RMSNorm weights (ones
after folding), lm_head unless `lm_head` is quantized.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import MambaConfig
from .errors import UserError
from .io import staged_directory
from .model import MambaLM
from .quant import ActQuantConfig, WeightQuantConfig, dequantize_weight, pack_int4, unpack_int4
from .quant_model import LINEARS, QuantScheme, attach_act_quantizers

logger = logging.getLogger(__name__)

FORMAT = "mambaspin"
FORMAT_VERSION = 1
ONLINE_SITES = ("R2", "R3", "R4", "R6", "smooth")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes (out, in) two per byte when bits <= 4, else return the int8/uint8 codes unchanged.

    An odd `in` (dt_proj's input is dt_rank wide, which may be odd) gets one zero code appended
    before packing; `unpack_codes` cuts it off again.
    """
    if bits > 4:
        return codes
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return pack_int4(codes)


def unpack_codes(stored: torch.Tensor, bits: int, symmetric: bool, width: int) -> torch.Tensor:
    """Reverse `pack_codes` for a weight whose last dimension is `width`."""
    return unpack_int4(stored, signed=symmetric)[..., :width] if bits <= 4 else stored


def quantization_config(scheme: QuantScheme, online: dict, smooth: bool) -> dict:
    """The `quantization_config` entry of config.json."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "weight": None if scheme.weight is None else asdict(scheme.weight),
        "act": None if scheme.act is None else asdict(scheme.act),
        "lm_head": scheme.lm_head,
        "ssm_inputs": scheme.ssm_inputs,
        "conv1d": scheme.conv1d,
        "online_sites": online,
        "smooth": smooth,
        "float_tensors": ["embedding (R1 folded)", "conv1d (values on the quantization grid when conv1d is set)",
                          "A_log", "D", "dt_proj.bias", "norms"]
        + ([] if scheme.lm_head else ["lm_head"]),
    }


def write_quantized(directory: str | Path, config: MambaConfig, tensors: dict, qconfig: dict,
                    tokenizer=None, readme: str = "", overwrite: bool = False) -> Path:
    """Write a quantized checkpoint directory atomically (temporary directory, then rename)."""
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise UserError(f"output directory {directory} exists; pass --overwrite to replace it or choose another --out")
    with staged_directory(directory) as staging:
        hf = config.to_hf_dict() | {"tie_word_embeddings": False, "quantization_config": qconfig}
        (staging / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(staging / "model.safetensors"),
                  metadata={"format": FORMAT})
        if tokenizer is not None:
            tokenizer.save(staging)
        (staging / "README.md").write_text(readme)
    return directory


def is_quantized_dir(directory: Path) -> bool:
    config_file = Path(directory) / "config.json"
    if not config_file.is_file():
        return False
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False  # read_config reports the broken file
    if not isinstance(raw, dict):
        return False
    return (raw.get("quantization_config") or {}).get("format") == FORMAT


def _scheme_from(qconfig: dict) -> QuantScheme:
    weight = qconfig.get("weight")
    act = qconfig.get("act")
    return QuantScheme(
        weight=None if weight is None else WeightQuantConfig(**weight),
        act=None if act is None else ActQuantConfig(**act),
        lm_head=bool(qconfig.get("lm_head")),
        ssm_inputs=bool(qconfig.get("ssm_inputs")),
        conv1d=bool(qconfig.get("conv1d")),
    )


def _take(tensors: dict, name: str, directory: Path) -> torch.Tensor:
    if name not in tensors:
        raise UserError(f"quantized checkpoint {directory} is incomplete: tensor {name} is missing. "
                        "Merge the run again with `mambaspin merge`.")
    return tensors.pop(name)


def _load_linear(linear: nn.Linear, prefix: str, tensors: dict, scheme: QuantScheme, directory: Path, quantized: bool):
    """Fill `linear` from stored codes (dequantized once, exactly as the fake quantizer does) or floats."""
    with torch.no_grad():
        if quantized:
            cfg = scheme.weight
            codes = unpack_codes(_take(tensors, f"{prefix}.qweight", directory), cfg.bits, cfg.symmetric,
                                 linear.in_features)
            scale = _take(tensors, f"{prefix}.scale", directory)
            zero = tensors.pop(f"{prefix}.zero", None)
            linear.weight.copy_(dequantize_weight(codes, scale, zero, cfg))
        else:
            linear.weight.copy_(_take(tensors, f"{prefix}.weight", directory))
        if linear.bias is not None:
            linear.bias.copy_(_take(tensors, f"{prefix}.bias", directory))


def _attach_online(model: MambaLM, tensors: dict, qconfig: dict, directory: Path) -> None:
    """Attach the stored online rotations, after checking each is orthogonal."""
    from rotations.fold import OnlineRotation, SmoothSiLUGate, StateRotation
    from rotations.klt import orthogonality_error

    for layer, mixer in enumerate(model.mixers):
        prefix = f"backbone.layers.{layer}.mixer.online"
        matrices = {site: tensors.pop(f"{prefix}.{site}", None) for site in ONLINE_SITES}
        for site, matrix in matrices.items():
            if matrix is not None and site != "smooth":
                error = orthogonality_error(matrix.double())
                if error > 1e-4:
                    raise UserError(f"{directory}: rotation {prefix}.{site} is not orthogonal: max |RᵀR − I| = "
                                    f"{error:.3e} (expected below 1e-4). The checkpoint is damaged; merge the run again.")
        if matrices["smooth"] is not None:
            mixer.gate = SmoothSiLUGate(matrices["smooth"])
        if matrices["R2"] is not None:
            model.append_point("out_proj_input", layer, OnlineRotation(matrices["R2"]))
        if matrices["R6"] is not None:
            model.append_point("x_proj_input", layer, OnlineRotation(matrices["R6"]))
        if matrices["R3"] is not None or matrices["R4"] is not None:
            model.append_point("ssm_state", layer, StateRotation(matrices["R3"], matrices["R4"]))
        if matrices["R3"] is not None:
            model.append_point("ssm_y", layer, OnlineRotation(matrices["R3"].T))


def _act_point_names(model: MambaLM, scheme: QuantScheme) -> list[str]:
    """Tensor prefixes of the activation quantizers, in the order attach_act_quantizers adds them."""
    from .quant_model import LINEAR_INPUT_POINTS, SSM_POINTS

    points = list(LINEAR_INPUT_POINTS.values()) + (list(SSM_POINTS) if scheme.ssm_inputs else [])
    names = [f"backbone.layers.{layer}.mixer.act.{point}" for layer in range(model.config.n_layer) for point in points]
    return names + (["act.lm_head_input"] if scheme.lm_head else [])


def _read_quantized_config(directory: Path) -> dict:
    """Read config.json of a quantized checkpoint, raising UserError unless it has a quantization_config."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise UserError(f"{directory} is not a quantized checkpoint: config.json is missing. "
                        "Pass a directory written by `mambaspin merge`.")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{config_file} is not valid JSON: {error}. Merge the run again.") from error
    if not isinstance(raw, dict) or not isinstance(raw.get("quantization_config"), dict):
        raise UserError(f"{directory} is not a quantized checkpoint: config.json has no quantization_config. "
                        "Load a float checkpoint with mambaspin.loading.load_model.")
    return raw


def load_quantized(directory: str | Path, device="cpu") -> MambaLM:
    """Load a mambaspin quantized checkpoint as a runnable `MambaLM` (CPU or CUDA).

    Weights are dequantized once at load, with the same arithmetic as the training-time fake
    quantizer, and activations are fake-quantized as in training.
    """
    directory = Path(directory)
    raw = _read_quantized_config(directory)
    qconfig = raw["quantization_config"]
    if qconfig.get("version") != FORMAT_VERSION:
        raise UserError(f"{directory}: quantized format version {qconfig.get('version')} is not supported "
                        f"(expected {FORMAT_VERSION}); merge the run again with this mambaspin version")
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"quantized checkpoint {directory} is incomplete: model.safetensors is missing")
    try:
        tensors = load_file(str(weights))
    except Exception as error:  # safetensors raises its own error type for truncated files
        raise UserError(f"cannot read {weights}: {error}. The file is damaged; merge the run again.") from error
    config = MambaConfig.from_hf_dict(raw)
    model = MambaLM(config)
    scheme = _scheme_from(qconfig)
    _fill_model(model, tensors, scheme, directory)
    _attach_online(model, tensors, qconfig, directory)
    _load_act_quantizers(model, tensors, scheme, directory)
    if tensors:
        raise UserError(f"{directory}: unexpected tensors {sorted(tensors)[:5]}; is this a mambaspin checkpoint "
                        f"of format version {FORMAT_VERSION}?")
    return model.to(device).eval()


def _fill_model(model: MambaLM, tensors: dict, scheme: QuantScheme, directory: Path) -> None:
    linear_prefixes = set()
    for layer, mixer in enumerate(model.mixers):
        for name in LINEARS:
            prefix = f"backbone.layers.{layer}.mixer.{name}"
            linear_prefixes.add(prefix)
            _load_linear(getattr(mixer, name), prefix, tensors, scheme, directory, scheme.weight is not None)
    _load_linear(model.lm_head, "lm_head", tensors, scheme, directory, scheme.lm_head and scheme.weight is not None)
    linear_prefixes.add("lm_head")
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if name.rsplit(".", 1)[0] not in linear_prefixes:
                value.copy_(_take(tensors, name, directory))


def _load_act_quantizers(model: MambaLM, tensors: dict, scheme: QuantScheme, directory: Path) -> None:
    quantizers = attach_act_quantizers(model, scheme)
    for quantizer, prefix in zip(quantizers, _act_point_names(model, scheme)):
        if not quantizer.cfg.static:
            continue
        with torch.no_grad():
            quantizer.scale.copy_(_take(tensors, f"{prefix}.scale", directory))
            quantizer.zero.copy_(_take(tensors, f"{prefix}.zero", directory))
        quantizer.frozen = True
