"""Load and save Mamba-1 checkpoints without importing mamba_ssm.

Reads Hugging Face `MambaForCausalLM` directories and original `mamba_ssm` directories (config.json
with d_model/n_layer/ssm_cfg, weights named `backbone.embedding.*`), from a local directory or a
Hugging Face hub id. Weights load only through safe formats: safetensors, or
`torch.load(weights_only=True)` for pytorch_model.bin.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import MambaConfig, config_from_dict
from .data import resolve_path
from .errors import UserError
from .io import staged_directory
from .model import MambaLM

logger = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "pytorch_model*.bin", "*.txt", "*.model"]


def resolve_device(name: str | torch.device, key: str = "--device") -> torch.device:
    """Parse a device name ('cpu', 'cuda', 'cuda:1'), raising UserError for a bad name or a missing GPU.

    key: how the user set it (an option or a config key), named in the error.
    """
    if isinstance(name, torch.device):
        device = name
    else:
        try:
            device = torch.device(str(name))
        except (RuntimeError, ValueError) as error:
            raise UserError(f"{key} {name!r} is not a device: expected cpu, cuda or cuda:N") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{key} {name!r} needs a CUDA GPU, and torch sees none here "
                            f"(torch {torch.__version__}); use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{key} {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"numbered from 0; pick one of them")
    elif device.type != "cpu":
        raise UserError(f"not supported yet: {key} {name!r}; mambaspin runs on cpu or cuda")
    return device


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """Return a local directory for a path or a hub id (downloaded into the hub cache)."""
    path = Path(resolve_path(name_or_path))
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"model path {path} is a file; expected a directory with config.json and weights")
    if not HUB_ID.match(str(name_or_path)):
        raise UserError(f"model directory not found: {name_or_path}. Pass a checkpoint directory or a hub id (org/name).")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=WEIGHT_PATTERNS))
    except Exception as error:  # network, auth and offline-mode errors differ between hub versions
        raise UserError(
            f"model {name_or_path!r} is not a local directory and could not be fetched from the hub "
            f"({type(error).__name__}: {error}). Download it first and pass the directory."
        ) from error


def read_config(directory: Path) -> MambaConfig:
    """Read config.json of a Mamba-1 checkpoint in either format."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        hint = ""
        if (Path(directory) / "checkpoints").is_dir():
            hint = (f"; it looks like a training run: merge it first with `mambaspin merge --run {directory} "
                    f"--out {Path(directory) / 'quantized'}` and load that")
        elif (Path(directory) / "checkpoint.json").is_file():
            run = Path(directory).parent.parent
            hint = (f"; it looks like a training checkpoint: merge it first with `mambaspin merge --run {run} "
                    f"--checkpoint {Path(directory).name} --out {run / 'quantized'}` and load that")
        raise UserError(f"{directory} has no config.json; expected a Mamba-1 checkpoint directory{hint}")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{config_file} is not valid JSON: {error}") from error
    return config_from_dict(raw, str(config_file))


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own error type for truncated or foreign files
        raise UserError(f"cannot read {path}: {' '.join(str(error).split())}. The file may be truncated; "
                        "copy or download it again") from error


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Read all weights of a checkpoint directory with safe loaders only."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(_load_safetensors(directory / shard))
        return state
    single = directory / "model.safetensors"
    if single.is_file():
        return _load_safetensors(single)
    binary = directory / "pytorch_model.bin"
    if binary.is_file():
        try:
            return torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as error:  # truncated or pickled-object files fail in many ways
            raise UserError(f"could not read {binary} as plain tensors: {error}") from error
    raise UserError(f"{directory} holds no weights: expected model.safetensors or pytorch_model.bin")


def load_model(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu") -> MambaLM:
    """Load a Mamba-1 checkpoint (Hugging Face, original mamba_ssm, or a mambaspin quantized
    checkpoint, which keeps its own dtype) as a `MambaLM`."""
    device = resolve_device(device)
    directory = resolve_model_dir(name_or_path)
    from .export import is_quantized_dir, load_quantized

    if is_quantized_dir(directory):
        return load_quantized(directory, device=device)
    config = read_config(directory)
    state = {_hf_name(name): tensor for name, tensor in read_state_dict(directory).items()}
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    elif "lm_head.weight" not in state:
        raise UserError(f"{directory}: config says tie_word_embeddings=false but lm_head.weight is missing")

    model = MambaLM(config)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if config.tie_embeddings else set())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise UserError(
            f"weights in {directory} do not match its config.json: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}. Is this a Mamba-1 checkpoint with its own config?"
        )
    _check_shapes(model, state, directory)
    model.load_state_dict(state, strict=False)
    return model.to(device=device, dtype=dtype).eval()


def _hf_name(name: str) -> str:
    """Map original mamba_ssm weight names onto Hugging Face names."""
    return name.replace("backbone.embedding.", "backbone.embeddings.")


def _check_shapes(model: MambaLM, state: dict, directory: Path) -> None:
    own = model.state_dict()
    for name, tensor in state.items():
        if own[name].shape != tensor.shape:
            raise UserError(
                f"{directory}: weight {name} has shape {tuple(tensor.shape)} but config.json implies "
                f"{tuple(own[name].shape)}"
            )


def save_model(model: MambaLM, directory: str | os.PathLike, tokenizer=None, extra_files: dict | None = None) -> Path:
    """Write a Hugging Face `MambaForCausalLM` directory: config.json, model.safetensors, tokenizer.

    The directory is written under a temporary name beside it and renamed at the end, so a crash
    never leaves a half-written checkpoint. An existing directory is replaced. `extra_files` maps
    file names to text (a model card, say).
    """
    directory = Path(directory)
    with staged_directory(directory) as staging:
        config = model.config.to_hf_dict() | {"tie_word_embeddings": model.is_tied(), "torch_dtype": "float32"}
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        if model.is_tied():
            state.pop("lm_head.weight")
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(staging)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
    return directory
