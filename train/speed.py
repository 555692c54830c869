"""Speed and memory benchmarks that need the run config or the training stack.

Every figure comes with the baseline it is divided by, measured in the same process:
- Cayley step: one geoopt RiemannianSGD step on a d x d Stiefel parameter, against one d x d
  matrix product (the cost unit of a rotation applied to a weight);
- calibration memory: peak resident memory of a calibration subprocess per number of calibration
  tokens, against the smallest count (flat means O(d²) memory);
- inference: tokens per second of an exported quantized checkpoint, loaded by `load_quantized`
  (online rotations and fake quantizers), against the float model.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import geoopt
import torch

from mambaspin.errors import NotSupportedError
from mambaspin.io import read_json_object

from rotations.klt import build_rotations

from .bench import median_step_seconds
from .config import RunConfig
from .inputs import load_inputs, load_or_run_calibration


def cayley_benchmark(sizes=(768, 1536, 2560), repeats: int = 3) -> list[dict]:
    """Seconds of one Cayley SGD step against one d x d float32 matrix product, per size d."""
    rows = []
    for size in sizes:
        generator = torch.Generator().manual_seed(size)
        start = torch.linalg.qr(torch.randn(size, size, generator=generator))[0]
        parameter = geoopt.ManifoldParameter(start, manifold=geoopt.Stiefel(canonical=True))
        optimizer = geoopt.optim.RiemannianSGD([parameter], lr=1e-3, momentum=0.9)
        gradient = torch.randn(size, size, generator=generator)

        def step():
            parameter.grad = gradient.clone()
            optimizer.step()

        other = torch.randn(size, size, generator=generator)
        step_seconds = median_step_seconds(step, repeats)
        matmul_seconds = median_step_seconds(lambda: start @ other, repeats)
        rows.append({"d": size, "cayley_step_seconds": step_seconds, "matmul_seconds": matmul_seconds,
                     "ratio_to_matmul": step_seconds / matmul_seconds})
    return rows


CALIBRATION_PROBE = """
import json, os, resource, sys, threading, time
from train.config import load_run_config
from train.inputs import load_inputs, run_calibration


def resident_mb():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


config = load_run_config(sys.argv[1], sys.argv[2:])
inputs = load_inputs(config)
before = peak = resident_mb()
done = threading.Event()


def poll():
    global peak
    while not done.is_set():
        peak = max(peak, resident_mb())
        time.sleep(0.002)


watcher = threading.Thread(target=poll)
watcher.start()
calibration = run_calibration(config, inputs, ("R1", "R2", "R5", "R6"), progress=False)
done.set()
watcher.join()
peak = max(peak, resident_mb())
print(json.dumps({"tokens": calibration.key["tokens"], "rss_before_mb": before, "calibration_peak_mb": peak,
                  "growth_mb": peak - before, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def calibration_memory_benchmark(config_path: str, overrides: list[str], block_counts=(8, 32, 128)) -> list[dict]:
    """Resident memory added by calibration (sites R1, R2, R5, R6) per calibration size, each in a fresh process.

    The probe samples the resident set every 2 ms during calibration and reports its peak minus the
    resident set just before (growth_mb), so the model and the tokenized text, loaded first, do not
    hide it. Linux only (/proc/self/statm).
    """
    if not Path("/proc/self/statm").is_file():
        raise NotSupportedError("calibration memory benchmark off Linux: it reads /proc/self/statm")
    rows = []
    for blocks in block_counts:
        command = [sys.executable, "-c", CALIBRATION_PROBE, config_path, *overrides, f"calibration.n_blocks={blocks}"]
        completed = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(completed.stdout.strip().splitlines()[-1]))
    base = max(rows[0]["growth_mb"], 1.0)
    for row in rows:
        row["ratio_to_smallest"] = max(row["growth_mb"], 1.0) / base
    return rows


def read_earlier_results(path) -> dict:
    """Return the results an earlier bench_speed run wrote to `path` (a JSON object), or {} when there are none."""
    return (read_json_object(path) if path is not None else None) or {}


def export_ptq_model(config: RunConfig, inputs, calibration, directory: Path) -> Path:
    """Write the run's rotated, round-to-nearest quantized model (no training) as a packed checkpoint."""
    from mambaspin.export import quantization_config, write_quantized
    from mambaspin.quant_model import calibrate_act_quantizers

    from .merge import quantized_tensors
    from .qat_model import act_quantizers, build_qat_model

    scheme = config.quant.scheme()
    model = copy.deepcopy(inputs.model)
    build_qat_model(model, build_rotations(config.rotation, model, calibration), config.rotation, scheme, None)
    calibrate_act_quantizers(model, act_quantizers(model), inputs.calibration_blocks[:16], progress=False)
    online = {site: site in config.rotation.applied for site in ("R2", "R3", "R4", "R6")}
    qconfig = quantization_config(scheme, online, config.rotation.smooth.apply)
    with torch.no_grad():
        tensors = quantized_tensors(model.eval(), scheme)
    return write_quantized(directory, model.config, tensors, qconfig, overwrite=True)


@torch.no_grad()
def inference_benchmark(config: RunConfig, batch_size: int = 8, repeats: int = 3, merged_dir=None) -> dict:
    """Measure tokens per second of an exported quantized checkpoint (as `load_quantized` builds it: dequantized
    weights, online rotations, fake-quantized activations) against the float model, forward only.

    merged_dir: a `mambaspin merge` output; without it, the run's rotations are exported untrained
    into a temporary directory.
    """
    from mambaspin.export import load_quantized

    inputs = load_inputs(config)
    with tempfile.TemporaryDirectory() as scratch:
        if merged_dir is None:
            calibration = load_or_run_calibration(config, inputs, config.rotation.needs_statistics(), progress=False)
            merged_dir = export_ptq_model(config, inputs, calibration, Path(scratch) / "quantized")
        quantized = load_quantized(merged_dir)
    batch = inputs.train_blocks[:batch_size, :-1]
    float_seconds = median_step_seconds(lambda: inputs.model(batch), repeats)
    quantized_seconds = median_step_seconds(lambda: quantized(batch), repeats)
    tokens = batch.numel()
    return {"tokens": tokens, "checkpoint": str(merged_dir), "float_tokens_per_second": tokens / float_seconds,
            "quantized_tokens_per_second": tokens / quantized_seconds,
            "quantized_over_float": float_seconds / quantized_seconds}
