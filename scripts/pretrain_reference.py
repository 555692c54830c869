"""Reproduce the shipped reference model: python scripts/pretrain_reference.py [--out DIR] ..."""

import argparse
import dataclasses
import json
import logging
import sys

from mambaspin.cli import run_guarded
from mambaspin.pretrain import PretrainConfig, pretrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for field in dataclasses.fields(PretrainConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    summary = pretrain(PretrainConfig(**vars(args)))
    print(json.dumps(summary["best"], indent=2))


if __name__ == "__main__":
    sys.exit(run_guarded("pretrain_reference.py", main))
