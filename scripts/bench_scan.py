"""Time forward + backward of the CPU selective scan against transformers' path and the reference.

Prints a markdown table of median seconds and of time ratios selective_scan_torch / other, so a
ratio below 1 means that selective_scan_torch is faster. The defaults are batch 16, length 128
and d_state 16.

On a machine shared with other CPU-heavy work, pass --threads 1. On a 2-core machine with a
training job running, two intra-op threads made the same measurement vary by 10x or more.

    python scripts/bench_scan.py --threads 1 --repeats 3 --json runs/bench_scan.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from mambaspin.bench import benchmark_environment, format_scan_table, scan_benchmark
from mambaspin.io import write_json_atomic


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-inner", type=int, nargs="+", default=[256, 384, 768], help="d_inner values to time")
    parser.add_argument("--batch", type=int, default=16, help="batch size")
    parser.add_argument("--length", type=int, default=128, help="sequence length in tokens")
    parser.add_argument("--d-state", type=int, default=16, help="SSM state size per channel")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per implementation and size (the median is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    parser.add_argument("--json", default=None, help="also write the rows and the environment to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = scan_benchmark(args.d_inner, args.batch, args.length, args.d_state, args.repeats)
    environment = benchmark_environment()

    print(format_scan_table(rows))
    print(f"\ntorch {environment['torch']}, transformers {environment['transformers']}, "
          f"{environment['torch_threads']} torch threads on {environment['cpu_count']} CPUs")
    if args.json:
        write_json_atomic(args.json, {"environment": environment, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
