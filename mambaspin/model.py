"""Mamba-1 causal language model whose every step is a visible module call.

Glossary of axis names used in shape comments:
    b: batch size            l: sequence length        v: vocabulary size
    d_model: residual width  d_inner: expand * d_model (mixer channels)
    n: d_state, the SSM state size per channel         r: dt_rank, the low-rank dt width
    k: d_conv, the causal conv1d kernel size

Parameter names match Hugging Face `MambaForCausalLM` (`backbone.embeddings`, `backbone.layers.i.
mixer.in_proj`, ..., `lm_head`), so its state dict loads and saves without renaming.

Named points. Each activation that a later stage rotates or quantizes passes through an entry of a
`points` ModuleDict, an `nn.Identity` by default. Replacing an entry attaches a transform there
(`model.set_point("x_proj_input", layer, module)`). Mixer points, in forward order:
    in_proj_input   (b, l, d_model)     normed block input, before in_proj
    x_proj_input    (b, l, d_inner)     conv1d + SiLU output, before x_proj
    dt_proj_input   (b, l, r)           dt rows of x_proj's output, before dt_proj
    ssm_u           (b, l, d_inner)     scan input u (the tensor that enters x_proj_input)
    ssm_delta       (b, l, d_inner)     softplus(dt_proj(dt)), the scan step size
    ssm_B, ssm_C    (b, l, n)           input-dependent B and C
    ssm_state       (b, l, d_inner, n)  all states h, before the h·C product (forces the torch scan)
    ssm_y           (b, l, d_inner)     the h·C product, before the D skip (forces the torch scan)
    out_proj_input  (b, l, d_inner)     gated scan output, before out_proj
Model points:
    embedding_output (b, l, d_model)    embedding lookup, before the first block
    lm_head_input   (b, l, d_model)     output of norm_f, before lm_head
The gate y * SiLU(z) is the `gate` submodule of each mixer, so it can be replaced too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MambaConfig
from .scan import selective_scan

MIXER_POINTS = (
    "in_proj_input",
    "x_proj_input",
    "dt_proj_input",
    "ssm_u",
    "ssm_delta",
    "ssm_B",
    "ssm_C",
    "ssm_state",
    "ssm_y",
    "out_proj_input",
)
MODEL_POINTS = ("embedding_output", "lm_head_input")


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 (Zhang and Sennrich, 2019)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_float = x.float()
        x_float = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x_float.to(x.dtype)


class SiLUGate(nn.Module):
    """Gate of the Mamba block: y * SiLU(z). y, z: (b, l, d_inner)."""

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return y * F.silu(z)


class MambaMixer(nn.Module):
    """The selective SSM of one Mamba-1 block: in_proj, conv1d, SiLU, x_proj, dt_proj, scan,
    gate, out_proj."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.config = config
        d_inner, n, r = config.d_inner, config.d_state, config.dt_rank
        self.in_proj = nn.Linear(config.d_model, 2 * d_inner, bias=config.bias)
        self.conv1d = nn.Conv1d(
            d_inner, d_inner, config.d_conv, groups=d_inner, padding=config.d_conv - 1, bias=config.conv_bias
        )
        self.x_proj = nn.Linear(d_inner, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.gate = SiLUGate()
        self.out_proj = nn.Linear(d_inner, config.d_model, bias=config.bias)
        self.points = nn.ModuleDict({name: nn.Identity() for name in MIXER_POINTS})

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (b, l, d_model), already normed. Returns (b, l, d_model)."""
        cfg, points = self.config, self.points
        length = hidden.shape[1]

        # Input projection into the scan branch x and the gate branch z.
        hidden = points["in_proj_input"](hidden)  # (b, l, d_model)
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (b, l, d_inner) each

        # Causal depthwise convolution: pad k-1 on both sides, keep the first l outputs.
        x = self.conv1d(x.transpose(1, 2))[..., :length].transpose(1, 2)  # (b, l, d_inner)
        x = F.silu(x)

        # Input-dependent dt, B, C. The scan itself reads x as it was before this point.
        x_proj_in = points["x_proj_input"](x)  # (b, l, d_inner)
        dt, B, C = self.x_proj(x_proj_in).split([cfg.dt_rank, cfg.d_state, cfg.d_state], dim=-1)
        dt = points["dt_proj_input"](dt)  # (b, l, r)
        delta = F.softplus(self.dt_proj(dt).float())  # (b, l, d_inner)

        # Selective scan with the D skip connection.
        A = -torch.exp(self.A_log.float())  # (d_inner, n)
        state_point, y_point = points["ssm_state"], points["ssm_y"]
        y = selective_scan(
            points["ssm_u"](x),
            points["ssm_delta"](delta),
            A,
            points["ssm_B"](B),
            points["ssm_C"](C),
            self.D.float(),
            state_transform=None if isinstance(state_point, nn.Identity) else state_point,
            output_transform=None if isinstance(y_point, nn.Identity) else y_point,
        )  # (b, l, d_inner)

        # Gate and output projection.
        y = self.gate(y.to(hidden.dtype), z)  # (b, l, d_inner)
        y = points["out_proj_input"](y)
        return self.out_proj(y)  # (b, l, d_model)


class MambaBlock(nn.Module):
    """Pre-norm residual block: h + mixer(norm(h))."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = MambaMixer(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        residual = hidden.float() if self.residual_in_fp32 else hidden  # (b, l, d_model)
        out = self.mixer(self.norm(hidden.to(self.norm.weight.dtype)))  # (b, l, d_model)
        return residual + out


class MambaBackbone(nn.Module):
    """Embedding, the stack of blocks and the final norm."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList([MambaBlock(config) for _ in range(config.n_layer)])
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)

    def forward(self, input_ids: torch.Tensor, embedding_point: nn.Module) -> torch.Tensor:
        hidden = embedding_point(self.embeddings(input_ids))  # (b, l, d_model)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.norm_f(hidden)  # (b, l, d_model)


class MambaLM(nn.Module):
    """Mamba-1 causal LM: backbone and lm_head (tied to the embedding when config.tie_embeddings is set)."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.config = config
        self.backbone = MambaBackbone(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight
        self.points = nn.ModuleDict({name: nn.Identity() for name in MODEL_POINTS})

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: (b, l) int64. Returns logits (b, l, v)."""
        hidden = self.backbone(input_ids, self.points["embedding_output"])  # (b, l, d_model)
        hidden = self.points["lm_head_input"](hidden)
        return self.lm_head(hidden.to(self.backbone.embeddings.weight.dtype))  # (b, l, v)

    @property
    def mixers(self) -> list[MambaMixer]:
        return [layer.mixer for layer in self.backbone.layers]

    def set_point(self, name: str, layer: int | None, module: nn.Module) -> None:
        """Attach `module` at a named point: a mixer point of block `layer`, or a model point
        (`layer=None`). `nn.Identity()` detaches."""
        if name in MODEL_POINTS:
            self.points[name] = module
            return
        if name not in MIXER_POINTS:
            raise ValueError(f"unknown point {name!r}: expected one of {MIXER_POINTS + MODEL_POINTS}")
        if layer is None or not 0 <= layer < self.config.n_layer:
            raise ValueError(f"point {name!r} needs a layer index from 0 to {self.config.n_layer - 1}, got {layer}")
        self.mixers[layer].points[name] = module

    def get_point(self, name: str, layer: int | None) -> nn.Module:
        return self.points[name] if layer is None else self.mixers[layer].points[name]

    def append_point(self, name: str, layer: int | None, module: nn.Module) -> None:
        """Attach `module` after whatever already sits at a point (chained in an nn.Sequential)."""
        current = self.get_point(name, layer)
        if isinstance(current, nn.Identity):
            chained = module
        elif isinstance(current, nn.Sequential):
            chained = nn.Sequential(*current, module)
        else:
            chained = nn.Sequential(current, module)
        self.set_point(name, layer, chained)

    def attached_points(self) -> list[str]:
        """Names of the points that carry a transform (anything but nn.Identity)."""
        names = [name for name, module in self.points.items() if not isinstance(module, nn.Identity)]
        for layer, mixer in enumerate(self.mixers):
            for name, module in mixer.points.items():
                if not isinstance(module, nn.Identity):
                    names.append(f"layers.{layer}.{name}")
        return names

    def is_tied(self) -> bool:
        return self.lm_head.weight is self.backbone.embeddings.weight
