"""Speed and memory benchmarks, each a ratio against a baseline measured in the same run.

python scripts/bench_speed.py [--config configs/default.yaml] [--repeats 3] [--json out.json] [--merged DIR]
    [--skip scan,...] [key=value ...]

Parts: scan (fused scan vs transformers' CPU path and the reference loop), qat_step (QAT step vs
plain LoRA step), calibration_memory (peak memory vs calibration tokens), cayley (Cayley step vs a
d x d matmul at d = 768, 1536, 2560), inference (tokens/s of an exported quantized checkpoint vs float).
On a shared machine, set OMP_NUM_THREADS=1 for steadier numbers.
"""

import argparse
import logging
import sys

from mambaspin.bench import benchmark_environment, format_scan_table, scan_benchmark
from mambaspin.cli import DEFAULT_CONFIG, run_guarded
from mambaspin.errors import UserError
from mambaspin.io import write_json_atomic
from train.bench import qat_step_benchmark
from train.config import load_run_config
from train.speed import calibration_memory_benchmark, cayley_benchmark, inference_benchmark, read_earlier_results

PARTS = ("scan", "qat_step", "calibration_memory", "cayley", "inference")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config YAML")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median reported)")
    parser.add_argument("--skip", default="",
                        help=f"comma-separated parts to skip, from {', '.join(PARTS)}; with --json, the skipped parts "
                             "keep the results an earlier run wrote there")
    parser.add_argument("--json", default=None, help="also write all results to this JSON file")
    parser.add_argument("--merged", default=None,
                        help="merged checkpoint to time for inference (default: export the untrained rotations)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    skip = set(filter(None, (part.strip() for part in args.skip.split(","))))
    if skip - set(PARTS):
        unknown = ",".join(sorted(skip - set(PARTS)))
        raise UserError(f"--skip {unknown} is invalid: expected parts from {','.join(PARTS)}")
    if skip == set(PARTS):
        raise UserError("--skip names every part, so nothing would be measured; leave at least one part out")
    if args.repeats < 1:
        raise UserError(f"--repeats {args.repeats} is invalid: expected at least 1")
    config = load_run_config(args.config, args.overrides)
    results = read_earlier_results(args.json) if skip else {}
    results["environment"] = benchmark_environment()
    results["model"] = config.model.path

    if "scan" not in skip:
        results["scan"] = scan_benchmark([256, 384, 768], 16, 128, 16, args.repeats)
        print(format_scan_table(results["scan"]))
    if "qat_step" not in skip:
        results["qat_step"] = step = qat_step_benchmark(config, args.repeats)
        print(f"QAT step / plain LoRA step: {step['qat_over_plain']:.2f} (CE), "
              f"{step['qat_distill_over_plain']:.2f} (CE + distillation)")
    if "calibration_memory" not in skip:
        results["calibration_memory"] = rows = calibration_memory_benchmark(args.config, args.overrides)
        for row in rows:
            print(f"calibration {row['tokens']} tokens: +{row['growth_mb']:.0f} MB over the loaded model and data "
                  f"({row['ratio_to_smallest']:.2f}x smallest)")
    if "cayley" not in skip:
        results["cayley"] = rows = cayley_benchmark(repeats=args.repeats)
        for row in rows:
            print(f"Cayley step d={row['d']}: {row['cayley_step_seconds']:.3f} s = {row['ratio_to_matmul']:.1f}x a d x d matmul")
    if "inference" not in skip:
        results["inference"] = row = inference_benchmark(config, repeats=args.repeats, merged_dir=args.merged)
        print(f"inference: quantized {row['quantized_tokens_per_second']:.0f} tokens/s, float "
              f"{row['float_tokens_per_second']:.0f} tokens/s ({row['quantized_over_float']:.2f}x)")
    if args.json:
        write_json_atomic(args.json, results)


if __name__ == "__main__":
    sys.exit(run_guarded("bench_speed.py", main))
