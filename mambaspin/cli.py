"""Command-line entry point `mambaspin`: parses arguments and calls the library.

User errors (`UserError`) print one line and exit with status 2, without a traceback.
Every subcommand takes `--json PATH` and writes its results there too.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .data import DEFAULT_TEXT, SHIPPED_DIR
from .errors import UserError

DEFAULT_MODEL = SHIPPED_DIR / "mamba-shakespeare"


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mambaspin", description="Quantize Mamba language models with learned rotations.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = args.handler(args)
        if getattr(args, "json", None):
            from .io import write_json_atomic

            write_json_atomic(args.json, report)
    except UserError as error:
        print(f"mambaspin {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
