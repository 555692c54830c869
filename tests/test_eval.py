"""Tests for mambaspin.evaluate and the `mambaspin eval` command on a tiny random model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers

import mambaspin.loading
from mambaspin.cli import main
from mambaspin.errors import UserError
from mambaspin.evaluate import evaluate_text
from mambaspin.loading import load_model
from mambaspin.tokenizer import load_tokenizer

EVAL_CHARS = 4000
CLI_BLOCK_SIZE = 32
CLI_TIMEOUT_S = 120


@pytest.fixture
def eval_text(text) -> str:
    return text[:EVAL_CHARS]


@pytest.fixture
def model_and_tokenizer(hf_model_dir):
    return load_model(hf_model_dir), load_tokenizer(hf_model_dir)


def run_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    """Run `python -m mambaspin.cli` in offline mode and capture its output as text."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "mambaspin.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )


def test_eval_counts(model_and_tokenizer, eval_text):
    model, tokenizer = model_and_tokenizer
    ids = tokenizer.encode(eval_text)

    result = evaluate_text(model, tokenizer, eval_text, block_size=64, progress=False)

    assert result.tokens == len(ids) - 1
    assert result.chars == len(eval_text) - len(tokenizer.decode(ids[:1]))
    assert result.chars == len(tokenizer.decode(ids[1:]))


def test_eval_derived_metrics(model_and_tokenizer, eval_text):
    model, tokenizer = model_and_tokenizer

    result = evaluate_text(model, tokenizer, eval_text, block_size=64, progress=False)

    assert result.perplexity == pytest.approx(math.exp(result.loss_per_token), rel=1e-12)
    assert result.bits_per_char == pytest.approx(result.nats_per_char / math.log(2), rel=1e-12)
    assert result.nats_per_char == pytest.approx(result.loss_per_token * result.tokens / result.chars, rel=1e-12)


def test_eval_single_window_loss(model_and_tokenizer, eval_text):
    # With one window covering the text, the loss is the plain mean cross-entropy of one forward.
    model, tokenizer = model_and_tokenizer
    text = eval_text[:600]
    ids = tokenizer.encode(text)
    with torch.no_grad():
        expected = F.cross_entropy(model(ids[None, :-1])[0], ids[1:]).item()

    result = evaluate_text(model, tokenizer, text, block_size=len(ids) - 1, progress=False)

    assert result.loss_per_token == pytest.approx(expected, rel=1e-5)


def test_eval_repeatable(model_and_tokenizer, eval_text):
    model, tokenizer = model_and_tokenizer

    first = evaluate_text(model, tokenizer, eval_text, block_size=64, progress=False)
    second = evaluate_text(model, tokenizer, eval_text, block_size=64, progress=False)

    assert first == second


def test_eval_block_sizes_same_tokens(model_and_tokenizer, eval_text):
    model, tokenizer = model_and_tokenizer

    small = evaluate_text(model, tokenizer, eval_text, block_size=16, progress=False)
    large = evaluate_text(model, tokenizer, eval_text, block_size=64, progress=False)

    assert small.tokens == large.tokens
    assert small.chars == large.chars
    # Shorter windows see less context, so the losses differ.
    assert small.loss_per_token != large.loss_per_token


def test_eval_restores_training_mode(model_and_tokenizer, eval_text):
    model, tokenizer = model_and_tokenizer
    model.train()

    evaluate_text(model, tokenizer, eval_text[:600], block_size=64, progress=False)

    assert model.training


def test_eval_short_text_rejected(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer

    with pytest.raises(UserError, match="fewer than one block of 64 \\+ 1"):
        evaluate_text(model, tokenizer, "To be, or not to be.", block_size=64, progress=False)


def test_eval_large_tokenizer_rejected(model_factory, eval_text):
    directory = model_factory(vocab=260, tokenizer_vocab=300)
    model, tokenizer = load_model(directory), load_tokenizer(directory)

    with pytest.raises(UserError, match="has 300 tokens .* vocabulary has 260 rows"):
        evaluate_text(model, tokenizer, eval_text, block_size=64, progress=False)


def test_cli_writes_json(tmp_path, hf_model_dir, eval_text):
    data = tmp_path / "text.txt"
    data.write_text(eval_text, encoding="utf-8")
    report = tmp_path / "eval.json"
    args = ["eval", "--model", str(hf_model_dir), "--data", str(data), "--block-size", str(CLI_BLOCK_SIZE)]

    first = run_cli(*args, "--json", str(report), cwd=tmp_path)
    second = run_cli(*args, cwd=tmp_path)

    assert first.returncode == 0, first.stderr
    values = json.loads(report.read_text())
    for key in ("tokens", "loss_per_token", "perplexity", "bits_per_char"):
        assert key in values, key
    assert values["perplexity"] == pytest.approx(math.exp(values["loss_per_token"]), rel=1e-12)
    assert f"{values['tokens']} tokens" in first.stdout
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout


@pytest.mark.parametrize("case", ["missing_model", "missing_hub_model", "gpt2_model", "large_tokenizer", "short_text",
                                  "zero_batch", "bad_device", "cuda_without_gpu"])
def test_cli_bad_input(tmp_path, model_factory, eval_text, case):
    if case == "cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU; the case checks the error on machines without one")
    data = tmp_path / "text.txt"
    data.write_text(eval_text, encoding="utf-8")
    args = ["eval", "--data", str(data), "--block-size", str(CLI_BLOCK_SIZE)]
    if case == "missing_model":
        args += ["--model", str(tmp_path / "no-such-model")]
    elif case == "missing_hub_model":
        args += ["--model", "mambaspin-tests/no-such-model"]
    elif case == "gpt2_model":
        gpt2 = tmp_path / "gpt2"
        transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=101).save_pretrained(gpt2)
        args += ["--model", str(gpt2)]
    elif case == "large_tokenizer":
        model_dir = model_factory(vocab=260, tokenizer_vocab=None)
        tokenizer_dir = model_factory(vocab=300)
        args += ["--model", str(model_dir), "--tokenizer", str(tokenizer_dir)]
    elif case == "short_text":
        args += ["--model", str(model_factory()), "--block-size", "100000"]
    elif case == "zero_batch":
        args += ["--model", str(model_factory()), "--batch-size", "0"]
    elif case == "bad_device":
        args += ["--model", str(model_factory()), "--device", "gpu0"]
    elif case == "cuda_without_gpu":
        args += ["--model", str(model_factory()), "--device", "cuda"]

    completed = run_cli(*args, cwd=tmp_path)

    lines = completed.stderr.strip().splitlines()
    assert completed.returncode == 2
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("mambaspin eval: error: ")
    assert "Traceback" not in completed.stderr
    assert completed.stdout == ""


def test_cli_multiline_error_printed_as_one_line(monkeypatch, capsys, tmp_path):
    # Errors from the hub client can contain line breaks, but the CLI must still print one line.
    def fail(name_or_path):
        raise UserError(f"could not fetch {name_or_path}\nsecond line of the cause")

    monkeypatch.setattr(mambaspin.loading, "resolve_model_dir", fail)

    status = main(["eval", "--model", "org/model", "--data", str(tmp_path / "unused.txt")])

    captured = capsys.readouterr()
    assert status == 2
    assert captured.err == "mambaspin eval: error: could not fetch org/model second line of the cause\n"
