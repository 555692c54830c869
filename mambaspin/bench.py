"""Timing of the CPU selective scan against transformers' CPU path and the step-by-step reference.

Each measurement is one forward and one backward pass with a fixed random output gradient, so
the autograd graph that each implementation keeps is part of the cost.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .scan import selective_scan_reference, selective_scan_torch

SCAN_INPUT_NAMES = ("u", "delta", "A", "B", "C", "D")


def time_scan(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], repeats: int) -> float:
    """Return the median wall-clock seconds of `repeats` forward + backward passes of `fn(*inputs)`.

    Inputs that require grad get their .grad reset before each pass. The output gradient is drawn
    once with a fixed seed, from the shape of one untimed forward pass under no_grad. There is no
    separate warm-up pass, so with repeats=1 the result includes one-off allocation costs.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    leaves = [tensor for tensor in inputs if tensor.requires_grad]
    with torch.no_grad():
        output_shape = fn(*inputs).shape
    generator = torch.Generator().manual_seed(0)
    grad_output = torch.randn(output_shape, generator=generator)

    seconds = []
    for _ in range(repeats):
        for tensor in leaves:
            tensor.grad = None
        start = time.perf_counter()
        fn(*inputs).backward(grad_output)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def random_scan_inputs(batch: int, length: int, d_inner: int, d_state: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Draw float32 scan inputs in the (b, l, d) layout of `selective_scan_torch`.

    delta = softplus(randn) and A = -exp(randn), the ranges of a trained Mamba layer.
    """
    generator = torch.Generator().manual_seed(seed)
    return {
        "u": torch.randn(batch, length, d_inner, generator=generator),
        "delta": F.softplus(torch.randn(batch, length, d_inner, generator=generator)),
        "A": -torch.exp(torch.randn(d_inner, d_state, generator=generator)),
        "B": torch.randn(batch, length, d_state, generator=generator),
        "C": torch.randn(batch, length, d_state, generator=generator),
        "D": torch.randn(d_inner, generator=generator),
    }


def leaves_in_order(inputs: dict[str, torch.Tensor], channels_first: bool) -> list[torch.Tensor]:
    """Return detached copies that require grad, in scan argument order.

    channels_first=True converts u, delta, B and C to transformers' (b, d, l) and (b, n, l)
    layout before the copy, so the timed call does no transposes.
    """
    leaves = []
    for name in SCAN_INPUT_NAMES:
        tensor = inputs[name]
        if channels_first and tensor.dim() == 3:
            tensor = tensor.transpose(1, 2)
        leaves.append(tensor.detach().contiguous().requires_grad_(True))
    return leaves


def transformers_scan() -> Callable[..., torch.Tensor]:
    """Return transformers' selective scan, which falls back to its PyTorch loop without mamba_ssm.

    Arguments in (b, d, l) layout with delta already softplus-ed, as `mamba_selective_scan`
    takes them in transformers 5.x.
    """
    from transformers.models.mamba.modeling_mamba import mamba_selective_scan

    def scan(u, delta, A, B, C, D):
        return mamba_selective_scan(u, delta, A, B, C, D)

    return scan


def scan_benchmark(
    d_inners: Sequence[int], batch: int, length: int, d_state: int, repeats: int
) -> list[dict]:
    """Time forward + backward of the three CPU scans at each d_inner.

    Returns one dict per d_inner with the median seconds of `selective_scan_torch` (torch_s),
    transformers' `mamba_selective_scan` (transformers_s) and `selective_scan_reference`
    (reference_s), and the time ratios torch_s / transformers_s and torch_s / reference_s, so a
    ratio below 1 means `selective_scan_torch` is faster.
    """
    hf_scan = transformers_scan()
    implementations = [
        (selective_scan_torch, False),
        (hf_scan, True),
        (selective_scan_reference, False),
    ]

    # One pass of each at a tiny size pays one-off costs (lazy imports, einops pattern parsing,
    # first allocations) outside the timed runs, without a full-size warm-up pass.
    tiny_inputs = random_scan_inputs(batch=1, length=2, d_inner=2, d_state=2)
    for scan, channels_first in implementations:
        time_scan(scan, leaves_in_order(tiny_inputs, channels_first), repeats=1)

    rows = []
    for d_inner in d_inners:
        inputs = random_scan_inputs(batch, length, d_inner, d_state)
        torch_s, transformers_s, reference_s = (
            time_scan(scan, leaves_in_order(inputs, channels_first), repeats) for scan, channels_first in implementations
        )
        rows.append(
            {
                "batch": batch,
                "length": length,
                "d_inner": d_inner,
                "d_state": d_state,
                "repeats": repeats,
                "torch_s": torch_s,
                "transformers_s": transformers_s,
                "reference_s": reference_s,
                "ratio_to_transformers": torch_s / transformers_s,
                "ratio_to_reference": torch_s / reference_s,
            }
        )
    return rows


def format_scan_table(rows: list[dict]) -> str:
    """Format `scan_benchmark` rows as a markdown table of seconds and time ratios."""
    lines = [
        "| d_inner | selective_scan_torch (s) | transformers (s) | reference (s) "
        "| torch / transformers | torch / reference |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['d_inner']} | {row['torch_s']:.3f} | {row['transformers_s']:.3f} | {row['reference_s']:.3f} "
            f"| {row['ratio_to_transformers']:.4f} | {row['ratio_to_reference']:.3f} |"
        )
    return "\n".join(lines)


def benchmark_environment() -> dict:
    """Return the library versions and CPU threads that a timing depends on."""
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }
