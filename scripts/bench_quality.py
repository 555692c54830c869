"""Validation loss of RTN, Hadamard, KLT-enhanced, learned and learned+LoRA rotations, per preset.

python scripts/bench_quality.py [--config configs/default.yaml] [--presets W8A8,W4A8,W4A4]
    [--methods rtn,hadamard,klt_hadamard,learned,learned_lora] [--no-gptq] [--out DIR] [key=value ...]
Writes quality.md, quality.csv, quality.json and quality.png into --out (default OUTPUT_DIR/bench_quality).
"""

import argparse
import logging
import sys

from mambaspin.cli import DEFAULT_CONFIG, run_guarded
from train.config import load_run_config
from train.quality import METHODS, quality_benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config YAML (model, data, sites, training)")
    parser.add_argument("--presets", default="W8A8,W4A8,W4A4", help="comma-separated quantization presets")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--no-gptq", action="store_true", help="skip the GPTQ variant of every row")
    parser.add_argument("--out", default=None, help="output directory")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. max_steps=200")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_run_config(args.config, args.overrides)
    report = quality_benchmark(config, args.presets.split(","), args.methods.split(","), not args.no_gptq, args.out)
    print(report["table"])
    print(f"written to {report['out']}")


if __name__ == "__main__":
    sys.exit(run_guarded("bench_quality.py", main))
