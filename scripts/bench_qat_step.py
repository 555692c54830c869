"""Time one QAT step against one plain LoRA step on the same model and batch.

python scripts/bench_qat_step.py [--config configs/default.yaml] [--repeats 5] [--json out.json] [key=value ...]
"""

import argparse
import sys

from mambaspin.cli import DEFAULT_CONFIG, run_guarded
from mambaspin.io import write_json_atomic
from train.bench import qat_step_benchmark
from train.config import load_run_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config YAML")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant (median is reported)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args()
    result = qat_step_benchmark(load_run_config(args.config, args.overrides), args.repeats)
    print(f"| step | seconds (median of {args.repeats}) | ratio to plain LoRA |")
    print("|---|---|---|")
    print(f"| plain LoRA (CE) | {result['plain_lora_seconds']:.3f} | 1.00 |")
    print(f"| QAT (CE) | {result['qat_seconds']:.3f} | {result['qat_over_plain']:.2f} |")
    print(f"| QAT (CE + distillation) | {result['qat_distill_seconds']:.3f} | {result['qat_distill_over_plain']:.2f} |")
    print(f"{result['tokens_per_step']} tokens per step")
    if args.json:
        write_json_atomic(args.json, result)


if __name__ == "__main__":
    sys.exit(run_guarded("bench_qat_step.py", main))
