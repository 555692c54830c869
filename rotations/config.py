"""Which rotation sites are applied and how each one is initialized.

Site names follow MambaQuant (Xu et al., 2025, "MambaQuant: Quantizing the Mamba Family with
Variance Aligned Rotation Methods"), for Mamba-1:

    site  size      where                                      applied
    R1    d_model   residual stream                            offline (weights only)
    R2    d_inner   out_proj input, after the gate             online + out_proj columns
    R3    d_inner   SSM state h along d, in the h·C product    online (rotate h, unrotate h·C)
    R4    d_state   state axis of h and C                      online h + C rows of x_proj
    R5    dt_rank   low-rank dt path                           offline (x_proj dt rows, dt_proj)
    R6    d_inner   x_proj input (conv + SiLU output)          online + x_proj columns
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mambaspin import configtools
from mambaspin.errors import UserError

SITES = ("R1", "R2", "R3", "R4", "R5", "R6")
INITS = ("identity", "hadamard", "klt", "klt_hadamard", "random")
KLT_INITS = ("klt", "klt_hadamard")


def site_size(site: str, model_config) -> int:
    """Size of the square rotation at `site` for a `MambaConfig`."""
    sizes = {
        "R1": model_config.d_model,
        "R2": model_config.d_inner,
        "R3": model_config.d_inner,
        "R4": model_config.d_state,
        "R5": model_config.dt_rank,
        "R6": model_config.d_inner,
    }
    return sizes[site]


@dataclass(frozen=True)
class SiteConfig:
    """Options of one rotation site.

    apply: fold or attach this site. init: identity, hadamard (optionally with seeded random
    signs), klt (eigenvectors of the calibration covariance), klt_hadamard (K·H, MambaQuant's
    KLT-enhanced rotation) or random (seeded Haar-random orthogonal). train: learn it in QAT.
    """

    apply: bool = False
    init: str = "klt_hadamard"
    random_signs: bool = False
    seed: int = 0
    train: bool = True

    def __post_init__(self):
        if self.init not in INITS:
            raise UserError(f"rotation init {self.init!r} is invalid: expected one of {', '.join(INITS)}")


@dataclass(frozen=True)
class SmoothConfig:
    """MambaQuant's smooth-fused option at the out_proj input.

    A per-channel scale s_j = max|y_j|^alpha / max|W_out[:, j]|^(1 - alpha) (SmoothQuant, Xiao et
    al., 2023) is divided out of the gate output, as SiLU(z·s)/s with in_proj's z rows divided by
    s, and multiplied into out_proj's columns.
    """

    apply: bool = False
    alpha: float = 0.5

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"smooth.alpha={self.alpha} is invalid: expected a number from 0 to 1")


@dataclass(frozen=True)
class RotationConfig:
    """All rotation sites, the smoothing option and the covariance convention of the KLT.

    centered: build the KLT from the centred covariance E[(x-m)(x-m)ᵀ] instead of the second
    moment E[x xᵀ]. The default is uncentred because symmetric quantizers see the second moment.
    """

    sites: dict = field(default_factory=lambda: {site: SiteConfig() for site in SITES}, metadata={"value_type": SiteConfig})
    smooth: SmoothConfig = SmoothConfig()
    centered: bool = False

    def __post_init__(self):
        unknown = sorted(set(self.sites) - set(SITES))
        if unknown:
            raise UserError(f"unknown rotation site(s) {unknown}: expected names from {', '.join(SITES)}")
        full = {site: self.sites.get(site, SiteConfig()) for site in SITES}
        object.__setattr__(self, "sites", full)

    @property
    def applied(self) -> tuple[str, ...]:
        return tuple(site for site in SITES if self.sites[site].apply)

    def needs_statistics(self) -> tuple[str, ...]:
        """Sites whose init needs calibration statistics (KLT), plus R2 when smoothing is on."""
        needed = [site for site in self.applied if self.sites[site].init in KLT_INITS]
        if self.smooth.apply and "R2" not in needed:
            needed.append("R2")
        return tuple(sorted(needed))

    def with_sites(self, applied: tuple[str, ...], init: str | None = None) -> "RotationConfig":
        """Return a copy that applies exactly `applied`, optionally with one init for all sites."""
        sites = {}
        for site, options in self.sites.items():
            changes = {"apply": site in applied}
            if init is not None:
                changes["init"] = init
            sites[site] = dataclasses.replace(options, **changes)
        return dataclasses.replace(self, sites=sites)

    @classmethod
    def from_dict(cls, raw: dict) -> "RotationConfig":
        """Build from a YAML mapping: {sites: {R1: {apply: true, init: ...}}, smooth: {...}, centered: bool}."""
        return configtools.build(cls, raw, "rotation")
