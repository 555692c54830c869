"""Command-line entry point `mambaspin`: parses arguments and calls the library.

User errors (`UserError`) print one line and exit with status 2, without a traceback. A training
run stopped by a NaN or infinite loss (`FloatingPointError`) prints one line too and exits with
status 3; Ctrl-C exits with status 130 and SIGTERM with 143, after staged writes are cleaned up.
key=value overrides may come before or after the options.
Every subcommand takes `--json PATH` and writes its results there too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

from .data import DEFAULT_TEXT, SHIPPED_DIR
from .errors import UserError

DEFAULT_MODEL = SHIPPED_DIR / "mamba-shakespeare"
DEFAULT_CONFIG = SHIPPED_DIR.parent / "configs" / "default.yaml"


def add_eval_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="perplexity of a model on a text")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint directory or hub id (default: shipped model)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    parser.add_argument("--data", default=str(DEFAULT_TEXT), help="text file, or datasets name or path (default: shipped text)")
    parser.add_argument("--split", default="validation", choices=["train", "validation"], help="which split to evaluate")
    parser.add_argument("--block-size", type=int, default=256, help="tokens per evaluation window")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.set_defaults(handler=run_eval)


def run_eval(args) -> dict:
    from .data import load_text_splits
    from .evaluate import evaluate_text
    from .loading import load_model, resolve_model_dir
    from .tokenizer import load_tokenizer

    if args.block_size < 1:
        raise UserError(f"--block-size {args.block_size} is invalid: expected a positive number of tokens")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size} is invalid: expected a positive number of windows")
    model_dir = resolve_model_dir(args.model)
    model = load_model(model_dir, device=args.device)
    tokenizer = load_tokenizer(args.tokenizer or model_dir)
    text = getattr(load_text_splits(args.data), args.split)
    result = evaluate_text(model, tokenizer, text, args.block_size, args.batch_size)
    report = {"model": str(args.model), "data": str(args.data), "split": args.split,
              "block_size": args.block_size, **result.to_dict()}
    print(
        f"{args.split}: {result.tokens} tokens, loss {result.loss_per_token:.4f} nats/token, "
        f"perplexity {result.perplexity:.3f}, {result.bits_per_char:.4f} bits/char"
    )
    return report


def add_config_arguments(parser) -> None:
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config YAML (default: configs/default.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.block_size=128")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")


def add_calibrate_parser(subparsers) -> None:
    parser = subparsers.add_parser("calibrate", help="collect activation statistics for the KLT at every site")
    add_config_arguments(parser)
    parser.add_argument("--out", default=None, help="output directory (default: OUTPUT_DIR/calibration)")
    parser.add_argument("--sites", default=None, help="comma-separated sites to collect (default: R1,R2,R3,R4,R5,R6)")
    parser.set_defaults(handler=run_calibrate)


def run_calibrate(args) -> dict:
    from train.calibrate import calibrate
    from train.config import load_run_config

    config = load_run_config(args.config, args.overrides)
    sites = None
    if args.sites is not None:
        sites = [site.strip() for site in args.sites.split(",") if site.strip()]
        if not sites:
            raise UserError("--sites is empty: name sites such as R1,R2, or leave the option out to collect all six")
    report = calibrate(config, args.out, sites)
    print(f"calibration saved to {report['out']} ({report['key']['tokens']} tokens)")
    print("site  layer  spread before  after K·H (uncentred)  after K·H (centred)   [max/mean channel E[x²]]")
    for row in report["spread"]:
        layer = "-" if row["layer"] is None else row["layer"]
        after = row.get("spread_after_uncentered", float("nan"))
        centred = row.get("spread_after_centered", float("nan"))
        print(f"{row['site']:4}  {layer:>5}  {row['spread_before']:13.3f}  {after:21.4f}  {centred:19.4f}")
    return report


def add_ablate_parser(subparsers) -> None:
    parser = subparsers.add_parser("ablate", help="post-training quantization loss per rotation site and init")
    add_config_arguments(parser)
    parser.add_argument("--out", default=None, help="output directory (default: OUTPUT_DIR/ablation)")
    parser.add_argument("--presets", default="W8A8,W4A8,W4A4", help="comma-separated quantization presets")
    parser.add_argument("--inits", default="hadamard,klt,klt_hadamard", help="comma-separated rotation inits")
    parser.set_defaults(handler=run_ablate)


def run_ablate(args) -> dict:
    from train.ablate import ablate
    from train.config import load_run_config

    config = load_run_config(args.config, args.overrides)
    report = ablate(config, args.out, args.presets.split(","), args.inits.split(","))
    print(report["table"])
    print(f"CSV, table and plots written to {report['out']}")
    return report


def add_train_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="quantization-aware training of rotations and LoRA")
    add_config_arguments(parser)
    parser.add_argument("--resume_from_checkpoint", "--resume-from-checkpoint", default=None,
                        help="latest, step_N or a checkpoint directory to resume from")
    parser.set_defaults(handler=run_train)


def run_train(args) -> dict:
    from train.config import load_run_config
    from train.loop import train

    config = load_run_config(args.config, args.overrides)
    results = train(config, args.resume_from_checkpoint)
    if int(os.environ.get("RANK", "0")) != 0:
        return results
    print(f"{'model':>10}  validation loss (nats/token)")
    for name in ("float", "rtn", "klt_ptq", "trained"):
        print(f"{name:>10}  {results[name]:.4f}  ({results[name] - results['float']:+.4f})")
    print(f"max |RᵀR − I| = {results['orthogonality_error']:.2e}; results in {config.output_dir}/results.json")
    return results


def add_merge_parser(subparsers) -> None:
    parser = subparsers.add_parser("merge", help="fold a trained run into a quantized or Hugging Face checkpoint")
    parser.add_argument("--run", required=True, help="run directory (the training output_dir)")
    parser.add_argument("--checkpoint", default="latest", help="latest, step_N or a checkpoint directory")
    parser.add_argument("--out", required=True, help="output directory (written atomically)")
    parser.add_argument("--format", default="mambaspin", choices=["mambaspin", "hf"],
                        help="mambaspin: packed quantized weights with online rotations; hf: float MambaForCausalLM")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier merge output at --out (nothing else is replaced)")
    parser.add_argument("--gptq", action="store_true", help="quantize weights with GPTQ instead of round-to-nearest")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.set_defaults(handler=run_merge)


def run_merge(args) -> dict:
    from train.merge import merge

    report = merge(args.run, args.out, args.checkpoint, args.format, args.overwrite, args.gptq)
    print(f"merged {report['checkpoint']} into {report['out']} ({report['format']} format)")
    if report["format"] == "hf":
        print("note: the hf format holds float weights (rotations and LoRA folded in, no quantization), so its loss "
              "is that of the rotated float model, not the quantized one trained")
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mambaspin", description="Quantize Mamba language models with learned rotations.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(subparsers)
    add_calibrate_parser(subparsers)
    add_ablate_parser(subparsers)
    add_train_parser(subparsers)
    add_merge_parser(subparsers)
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse `argv`, accepting key=value overrides anywhere, before or after options."""
    args, extra = parser.parse_known_args(argv)
    overrides = [item for item in extra if "=" in item and not item.startswith("-")]
    unknown = [item for item in extra if item not in overrides]
    if overrides and not hasattr(args, "overrides"):
        unknown = extra
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler's stop) turned into an exception, so that staged writes clean up."""


def _raise_terminated(signum, frame):
    raise Terminated()


def run_guarded(name: str, function) -> int:
    """Call `function()` and turn user errors, a NaN stop, Ctrl-C and SIGTERM into one line and an exit status."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        function()
    except UserError as error:
        print(f"{name}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except FloatingPointError as error:  # training stopped on a NaN or infinite loss
        print(f"{name}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as stop:
        stopped = "terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"
        print(f"{name}: {stopped}; completed checkpoints and outputs are kept, nothing half-written is left",
              file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(build_parser(), argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def run() -> None:
        if args.json is not None:
            from .io import check_output_path

            check_output_path(args.json, "--json", directory=False)
        report = args.handler(args)
        if args.json and int(os.environ.get("RANK", "0")) == 0:
            from .io import write_json_atomic

            write_json_atomic(args.json, report)

    return run_guarded(f"mambaspin {args.command}", run)


if __name__ == "__main__":
    sys.exit(main())
