"""KLT and KLT-enhanced rotations, and the set of rotation matrices of a model.

KLT (Karhunen-Loève transform): the eigenvectors K of the activation covariance Σ, sorted by
descending eigenvalue, so x·K has the diagonal covariance Λ = Kᵀ Σ K.
KLT-enhanced rotation (MambaQuant, Xu et al., 2025): R = K·H with H an orthonormal Hadamard
matrix. The covariance of x·R is Hᵀ Λ H, whose diagonal entries all equal trace(Λ)/n because
every entry of H is ±1/sqrt(n): every channel gets the same variance.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mambaspin.errors import UserError

from .config import KLT_INITS, SITES, RotationConfig, site_size
from .hadamard import hadamard_matrix, is_hadamard_size, nearest_hadamard_sizes, random_hadamard, random_orthogonal

logger = logging.getLogger(__name__)

LAYER_SITES = ("R2", "R3", "R4", "R5", "R6")


def klt(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decompose a symmetric covariance (d, d).

    Returns (eigenvalues (d,) descending, K (d, d) with eigenvectors as columns). Each column's
    sign is fixed so its largest-magnitude entry is positive, which makes K deterministic.
    """
    values, vectors = torch.linalg.eigh(covariance.double())  # ascending
    values, vectors = values.flip(0), vectors.flip(1)
    pivot = vectors.abs().argmax(0)  # (d,)
    signs = torch.sign(vectors[pivot, torch.arange(vectors.shape[1])])
    return values, vectors * torch.where(signs == 0, 1.0, signs)


def init_matrix(init: str, size: int, seed: int, random_signs: bool, covariance: torch.Tensor | None) -> torch.Tensor:
    """Build one (size, size) float64 rotation from its init name (see `SiteConfig`)."""
    if init == "identity":
        return torch.eye(size, dtype=torch.float64)
    if init == "random":
        return random_orthogonal(size, seed)
    hadamard = None
    if init in ("hadamard", "klt_hadamard"):
        hadamard = random_hadamard(size, seed) if random_signs else hadamard_matrix(size)
    if init == "hadamard":
        return hadamard
    if covariance is None:
        raise UserError(f"init {init!r} needs calibration statistics; run `mambaspin calibrate` first")
    _, K = klt(covariance)
    return K if init == "klt" else K @ hadamard


@dataclass
class RotationSet:
    """Rotation matrices of one model: R1 (d_model, d_model) shared by all layers, and per layer
    R2..R6. Only applied sites are present. Matrices are float64."""

    global_matrices: dict = field(default_factory=dict)
    layer_matrices: list = field(default_factory=list)
    smooth_scales: list = field(default_factory=list)

    def get(self, site: str, layer: int) -> torch.Tensor | None:
        if site == "R1":
            return self.global_matrices.get("R1")
        return self.layer_matrices[layer].get(site)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor mapping ("R1", "layers.i.R2", "layers.i.smooth")."""
        flat = dict(self.global_matrices)
        for layer, matrices in enumerate(self.layer_matrices):
            flat.update({f"layers.{layer}.{site}": matrix for site, matrix in matrices.items()})
        for layer, scale in enumerate(self.smooth_scales):
            flat[f"layers.{layer}.smooth"] = scale
        return flat

    def save(self, path: str | Path) -> None:
        path = Path(path)
        staging = path.with_name(f".{path.name}.tmp")
        save_file({k: v.contiguous() for k, v in self.tensors().items()}, str(staging))
        staging.replace(path)

    @classmethod
    def load(cls, path: str | Path, n_layer: int) -> "RotationSet":
        tensors = load_file(str(path))
        rotations = cls({k: v for k, v in tensors.items() if not k.startswith("layers.")}, [{} for _ in range(n_layer)])
        for name, tensor in tensors.items():
            if name.startswith("layers."):
                _, layer, site = name.split(".")
                if site == "smooth":
                    rotations.smooth_scales.append(tensor)
                else:
                    rotations.layer_matrices[int(layer)][site] = tensor
        return rotations


def smooth_scales(model, calibration, alpha: float) -> list[torch.Tensor]:
    """Per-layer smoothing scales at the out_proj input (d_inner,), float64.

    s_j = max|y_j|^alpha / max_i |W_out[i, j]|^(1 - alpha) (SmoothQuant, Xiao et al., 2023).
    """
    scales = []
    for layer, mixer in enumerate(model.mixers):
        act_max = calibration.accumulator("R2", layer).absmax.clamp(min=1e-5)  # (d_inner,)
        weight_max = mixer.out_proj.weight.detach().double().abs().amax(0).clamp(min=1e-5).cpu()  # (d_inner,)
        scales.append(act_max.pow(alpha) / weight_max.pow(1 - alpha))
    return scales


def _site_covariance(site, layer, config, calibration, scales):
    """Covariance the site's KLT diagonalizes: smoothed at R2 when smoothing is on."""
    covariance = calibration.accumulator(site, layer).covariance(config.centered)
    if site == "R2" and scales:
        inverse = 1.0 / scales[layer]
        covariance = covariance * inverse[:, None] * inverse[None, :]
    return covariance


SIZE_NAMES = {"R1": "d_model", "R2": "d_inner", "R3": "d_inner", "R4": "d_state", "R5": "dt_rank", "R6": "d_inner"}


def check_site_sizes(config: RotationConfig, model_config) -> None:
    """Raise UserError, naming the config key, when a Hadamard-based init cannot be built at a site's size.

    Cheap, so recipes call it before loading data or calibrating.
    """
    for site in config.applied:
        init, size = config.sites[site].init, site_size(site, model_config)
        if init in ("hadamard", "klt_hadamard") and not is_hadamard_size(size):
            below, above = nearest_hadamard_sizes(size)
            nearest = ", ".join(str(n) for n in (below, above) if n is not None)
            raise UserError(f"rotation.sites.{site}.init={init} needs a Hadamard matrix of size {size} "
                            f"({SIZE_NAMES[site]} of this model), and none is known for that size (nearest supported "
                            f"sizes: {nearest}). Set rotation.sites.{site}.init=random or klt, or "
                            f"rotation.sites.{site}.apply=false.")


def hadamard_sites(sites, model_config) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split `sites` into those whose size has a Hadamard matrix and those whose size has none."""
    with_hadamard = tuple(site for site in sites if is_hadamard_size(site_size(site, model_config)))
    return with_hadamard, tuple(site for site in sites if site not in with_hadamard)


def build_rotations(config: RotationConfig, model, calibration=None) -> RotationSet:
    """Build every applied site's matrix; each layer's KLT comes from that layer's own statistics."""
    model_config = model.config
    check_site_sizes(config, model_config)
    rotations = RotationSet(layer_matrices=[{} for _ in range(model_config.n_layer)])
    if config.needs_statistics() and calibration is None:
        raise UserError(f"sites {config.needs_statistics()} need a calibration; run `mambaspin calibrate` first")
    if config.smooth.apply:
        rotations.smooth_scales = smooth_scales(model, calibration, config.smooth.alpha)
    rank_deficient = []
    for site in config.applied:
        options = config.sites[site]
        size = site_size(site, model_config)
        for layer in [None] if site == "R1" else range(model_config.n_layer):
            covariance = None
            if options.init in KLT_INITS:
                covariance = _site_covariance(site, layer, config, calibration, rotations.smooth_scales)
                accumulator = calibration.accumulator(site, layer)
                if accumulator.count < accumulator.dim:
                    where = site if layer is None else f"{site} layer {layer}"
                    rank_deficient.append(f"{where} ({accumulator.count} samples, dim {accumulator.dim})")
            seed = options.seed if layer is None else options.seed * 1000 + layer
            try:
                matrix = init_matrix(options.init, size, seed, options.random_signs, covariance)
            except ValueError as error:  # hadamard_matrix raises a plain ValueError for sizes it cannot build
                raise UserError(f"rotation {site} (size {size}): {error}") from error
            if layer is None:
                rotations.global_matrices[site] = matrix
            else:
                rotations.layer_matrices[layer][site] = matrix
    if rank_deficient:
        listed = ", ".join(rank_deficient[:8])
        if len(rank_deficient) > 8:
            listed += f" and {len(rank_deficient) - 8} more"
        logger.warning("calibration has fewer samples than channels at %s. These covariances are rank-deficient, so "
                       "their KLT directions in the null space are not fitted to the data. Raise calibration.n_blocks "
                       "or data.block_size.", listed)
    return rotations


def channel_spread(covariance: torch.Tensor, rotation: torch.Tensor | None = None) -> float:
    """max / mean of the per-channel second moments of x (or of x·R): 1.0 means all equal."""
    if rotation is not None:
        covariance = rotation.T @ covariance @ rotation
    diagonal = torch.diagonal(covariance)
    return float(diagonal.max() / diagonal.mean())


def orthogonality_error(matrix: torch.Tensor) -> float:
    """max |RᵀR − I| of a square matrix."""
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    return float((matrix.T @ matrix - eye).abs().max())


def check_orthogonal(rotations: RotationSet, tolerance: float = 1e-6) -> None:
    """Raise when any matrix of `rotations` is not orthogonal, with the measured error."""
    for name, matrix in rotations.tensors().items():
        if name.endswith("smooth"):
            continue
        error = orthogonality_error(matrix.double())
        if error > tolerance:
            raise UserError(f"rotation {name} is not orthogonal: max |RᵀR − I| = {error:.3e} > {tolerance:.0e}")


__all__ = ["SITES", "RotationSet", "build_rotations", "klt", "init_matrix", "channel_spread", "check_orthogonal"]
