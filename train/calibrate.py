"""Recipe `mambaspin calibrate`: collect KLT statistics and report how well K·H equalizes channels."""

from __future__ import annotations

import logging
from pathlib import Path

from mambaspin.errors import UserError
from mambaspin.io import check_output_path
from rotations.config import SITES, site_size
from rotations.hadamard import hadamard_matrix, is_hadamard_size
from rotations.klt import channel_spread, klt

from .config import RunConfig
from .inputs import load_inputs, run_calibration

logger = logging.getLogger(__name__)


def spread_report(calibration, model_config, sites) -> list[dict]:
    """Per site and layer: max/mean channel second moment before rotation and after K·H, for the
    uncentred and the centred KLT (the second moment is what a symmetric quantizer sees)."""
    rows = []
    for site in sites:
        size = site_size(site, model_config)
        hadamard = hadamard_matrix(size) if is_hadamard_size(size) else None
        for layer in [None] if site == "R1" else range(model_config.n_layer):
            accumulator = calibration.accumulator(site, layer)
            second_moment = accumulator.covariance(centered=False)
            row = {"site": site, "layer": layer, "tokens": accumulator.count,
                   "spread_before": channel_spread(second_moment)}
            if hadamard is not None:
                for centered in (False, True):
                    _, K = klt(accumulator.covariance(centered))
                    label = "centered" if centered else "uncentered"
                    row[f"spread_after_{label}"] = channel_spread(second_moment, K @ hadamard)
            rows.append(row)
    return rows


def calibrate(config: RunConfig, out_dir: str | Path | None = None, sites=None, progress: bool = True) -> dict:
    """Collect statistics for `sites` (default: all six) and save them into `out_dir`."""
    sites = tuple(dict.fromkeys(sites or SITES))
    unknown = sorted(set(sites) - set(SITES))
    if unknown:
        raise UserError(f"unknown site(s) {unknown}: expected names from {', '.join(SITES)}")
    directory = Path(out_dir) if out_dir else config.calibration_dir
    check_output_path(directory, "--out" if out_dir else "calibration.dir", directory=True)
    inputs = load_inputs(config)
    calibration = run_calibration(config, inputs, sites, progress)
    calibration.save(directory)
    rows = spread_report(calibration, inputs.model.config, sites)
    logger.info("saved calibration of sites %s (%d tokens) to %s", ",".join(sites), calibration.key["tokens"], directory)
    return {"out": str(directory), "key": calibration.key, "spread": rows}
