"""Shape and options of a Mamba-1 language model, read from either checkpoint format.

Two formats exist for Mamba-1 checkpoints:
- Hugging Face (`MambaForCausalLM`): config.json with `model_type: mamba`, `hidden_size`,
  `num_hidden_layers`, `state_size`, `expand`, `conv_kernel`, `time_step_rank`, ...
- original `mamba_ssm`: config.json with `d_model`, `n_layer`, `vocab_size`, `ssm_cfg` and
  `pad_vocab_size_multiple`; weights named `backbone.embedding.*`.
Both are mapped to one `MambaConfig`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .errors import NotSupportedError, UserError


@dataclass(frozen=True)
class MambaConfig:
    """Sizes and options of a Mamba-1 causal LM.

    d_model: residual stream width. d_inner: expanded width (expand * d_model). d_state: SSM state
    size per channel. d_conv: causal conv1d kernel size. dt_rank: rank of the dt projection.
    """

    vocab_size: int
    d_model: int
    n_layer: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0
    bias: bool = False
    conv_bias: bool = True
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True

    def __post_init__(self):
        if self.dt_rank <= 0:
            object.__setattr__(self, "dt_rank", math.ceil(self.d_model / 16))
        for name in ("vocab_size", "d_model", "n_layer", "d_state", "d_conv", "expand"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UserError(f"invalid model config: {name}={value!r}, expected a positive integer")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf_dict(cls, raw: dict) -> "MambaConfig":
        """Build from a Hugging Face `MambaConfig` dict (config.json with model_type 'mamba')."""
        hidden_act = raw.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise NotSupportedError(f"hidden_act={hidden_act!r} (only 'silu', as in every Mamba-1 release)")
        d_model = int(raw["hidden_size"])
        expand = int(raw.get("expand", 2))
        intermediate = raw.get("intermediate_size")
        if intermediate is not None and int(intermediate) != expand * d_model:
            raise NotSupportedError(
                f"intermediate_size={intermediate} that is not expand*hidden_size={expand * d_model}"
            )
        dt_rank = raw.get("time_step_rank", "auto")
        return cls(
            vocab_size=int(raw["vocab_size"]),
            d_model=d_model,
            n_layer=int(raw["num_hidden_layers"]),
            d_state=int(raw.get("state_size", 16)),
            d_conv=int(raw.get("conv_kernel", 4)),
            expand=expand,
            dt_rank=0 if dt_rank == "auto" else int(dt_rank),
            bias=bool(raw.get("use_bias", False)),
            conv_bias=bool(raw.get("use_conv_bias", True)),
            norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
            residual_in_fp32=bool(raw.get("residual_in_fp32", True)),
            tie_embeddings=bool(raw.get("tie_word_embeddings", True)),
        )

    @classmethod
    def from_original_dict(cls, raw: dict) -> "MambaConfig":
        """Build from an original `mamba_ssm` config.json (d_model, n_layer, ssm_cfg, ...)."""
        ssm_cfg = dict(raw.get("ssm_cfg") or {})
        layer = ssm_cfg.pop("layer", "Mamba1")
        if layer != "Mamba1":
            raise NotSupportedError(f"ssm_cfg.layer={layer!r} (only Mamba1 models are supported)")
        if raw.get("attn_layer_idx"):
            raise NotSupportedError("hybrid models with attention layers (attn_layer_idx is set)")
        if raw.get("rms_norm", True) is False:
            raise NotSupportedError("rms_norm=false (LayerNorm blocks)")
        vocab_size = int(raw["vocab_size"])
        multiple = int(raw.get("pad_vocab_size_multiple", 1))
        if vocab_size % multiple:
            vocab_size += multiple - vocab_size % multiple
        dt_rank = ssm_cfg.get("dt_rank", "auto")
        return cls(
            vocab_size=vocab_size,
            d_model=int(raw["d_model"]),
            n_layer=int(raw["n_layer"]),
            d_state=int(ssm_cfg.get("d_state", 16)),
            d_conv=int(ssm_cfg.get("d_conv", 4)),
            expand=int(ssm_cfg.get("expand", 2)),
            dt_rank=0 if dt_rank == "auto" else int(dt_rank),
            bias=bool(ssm_cfg.get("bias", False)),
            conv_bias=bool(ssm_cfg.get("conv_bias", True)),
            norm_eps=float(raw.get("norm_epsilon", 1e-5)),
            residual_in_fp32=bool(raw.get("residual_in_fp32", True)),
            tie_embeddings=bool(raw.get("tie_embeddings", True)),
        )

    def to_hf_dict(self) -> dict:
        """Return a config.json dict that `transformers.MambaConfig` reads."""
        return {
            "architectures": ["MambaForCausalLM"],
            "model_type": "mamba",
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layer,
            "state_size": self.d_state,
            "conv_kernel": self.d_conv,
            "expand": self.expand,
            "intermediate_size": self.d_inner,
            "time_step_rank": self.dt_rank,
            "use_bias": self.bias,
            "use_conv_bias": self.conv_bias,
            "layer_norm_epsilon": self.norm_eps,
            "residual_in_fp32": self.residual_in_fp32,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "bos_token_id": 0,
            "eos_token_id": 0,
            "pad_token_id": 0,
        }


def config_from_dict(raw: dict, source: str) -> MambaConfig:
    """Detect the checkpoint format of a config.json dict and build a `MambaConfig`.

    `source` names the file in error messages.
    """
    if "d_model" in raw and "n_layer" in raw:
        return MambaConfig.from_original_dict(raw)
    model_type = raw.get("model_type")
    if model_type == "mamba":
        return MambaConfig.from_hf_dict(raw)
    if model_type == "mamba2":
        raise NotSupportedError(f"Mamba-2 models ({source} has model_type 'mamba2'); only Mamba-1 is supported")
    raise UserError(
        f"{source} does not describe a Mamba-1 model: model_type={model_type!r}, expected 'mamba' "
        "(Hugging Face MambaForCausalLM) or an original mamba_ssm config with d_model and n_layer. "
        "Point --model at a Mamba-1 checkpoint directory."
    )
