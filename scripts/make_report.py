"""Build docs/results.md (and copy its plots into docs/) and the README's results section from the
outputs of the benchmark runs.

    python scripts/make_report.py [--runs runs] [--out docs] [--readme README.md]

Reads, when present: RUNS/default/results.json and RUNS/w4a8/results.json (mambaspin train with
configs/default.yaml and configs/w4a8.yaml), RUNS/default/ablation/ (mambaspin ablate),
RUNS/bench/bench_quality/ (scripts/bench_quality.py), RUNS/bench_speed.json
(scripts/bench_speed.py --json) and RUNS/ortho1000/results.json (a 1000-step run). A missing
input is listed as not run.
"""

import argparse
import sys
from pathlib import Path

from mambaspin.cli import run_guarded
from train.report import build_results_page, readme_results_section, update_readme


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs", help="directory holding the benchmark outputs")
    parser.add_argument("--out", default="docs", help="directory for results.md and its plots")
    parser.add_argument("--readme", default="README.md", help="README whose results section is rebuilt")
    args = parser.parse_args()
    page = build_results_page(Path(args.runs), Path(args.out))
    print(f"wrote {page}")
    readme = update_readme(Path(args.readme), readme_results_section(Path(args.runs), Path(args.out)))
    print(f"rebuilt the results section of {readme}")


if __name__ == "__main__":
    sys.exit(run_guarded("make_report.py", main))
