"""The QAT training loop on a tiny random checkpoint: checkpoints, results, resume, NaN stop, CLI.

Every run trains a `MambaLM` with d_model 48 and 2 layers for at most 4 steps of 2 blocks of 32
tokens on CPU.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import perturb_parameters
from mambaspin.config import MambaConfig
from mambaspin.errors import UserError
from mambaspin.loading import save_model
from mambaspin.model import MambaLM
from mambaspin.tokenizer import train_byte_level_bpe
from train.checkpoints import MARKER, checkpoint_root, resolve_checkpoint
from train import loop as train_loop
from train.config import load_run_config
from train.loop import train

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"
SHIPPED_TEXT = REPO_ROOT / "shipped" / "tinyshakespeare.txt"
TEXT_CHARS = 60_000
VOCAB = 280
RESULT_KEYS = ("float", "rtn", "klt_ptq", "trained")
CLI_TIMEOUT_SECONDS = 120


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """A saved tiny checkpoint with its tokenizer, and the training text file."""
    root = tmp_path_factory.mktemp("loop")
    text = SHIPPED_TEXT.read_text(encoding="utf-8")[:TEXT_CHARS]
    text_file = root / "text.txt"
    text_file.write_text(text, encoding="utf-8")
    tokenizer = train_byte_level_bpe(text, VOCAB)
    assert tokenizer.vocab_size <= VOCAB

    torch.manual_seed(0)
    model = MambaLM(MambaConfig(vocab_size=VOCAB, d_model=48, n_layer=2, d_state=8, dt_rank=4))
    perturb_parameters(model, seed=0)
    model_dir = save_model(model, root / "model", tokenizer)
    return {"root": root, "model_dir": model_dir, "text_file": text_file}


def run_overrides(workspace, output_dir: Path, *overrides) -> list[str]:
    """key=value overrides that shrink the default run to the tiny checkpoint, then `overrides`."""
    return [
        f"model.path={workspace['model_dir']}",
        f"data.text={workspace['text_file']}",
        "model.device=cpu",
        "data.block_size=32",
        "data.max_eval_tokens=300",
        "calibration.n_blocks=8",
        "train.batch_size=2",
        "lora.rank=2",
        f"output_dir={output_dir}",
        "log_every=1",
        "eval_every=0",
        "max_steps=4",
        "save_every=2",
        "keep_checkpoints=2",
        *overrides,
    ]


def make_config(workspace, output_dir: Path, *overrides):
    return load_run_config(DEFAULT_CONFIG, run_overrides(workspace, output_dir, *overrides))


def checkpoint_names(output_dir: Path) -> list[str]:
    return sorted(path.name for path in checkpoint_root(output_dir).iterdir())


@pytest.fixture(scope="module")
def four_step_run(workspace) -> Path:
    """Output directory of an uninterrupted 4-step run saving every 2 steps."""
    output_dir = workspace["root"] / "four_steps"
    train(make_config(workspace, output_dir), progress=False)
    return output_dir


@pytest.fixture(scope="module")
def two_step_run(workspace) -> Path:
    """Output directory of the same run stopped after 2 steps.

    Tests that resume from it work on a copy, so that each of them starts from step 2.
    """
    output_dir = workspace["root"] / "two_steps"
    train(make_config(workspace, output_dir, "max_steps=2"), progress=False)
    return output_dir


# ---------------------------------------------------------------------------------------------
# Checkpoints and results


def test_run_writes_both_checkpoints(four_step_run):
    assert checkpoint_names(four_step_run) == ["step_2", "step_4"]
    for name in ("step_2", "step_4"):
        assert (checkpoint_root(four_step_run) / name / MARKER).is_file(), name
        assert (checkpoint_root(four_step_run) / name / "model.safetensors").is_file(), name


def test_run_writes_results(four_step_run):
    results = json.loads((four_step_run / "results.json").read_text())
    for key in RESULT_KEYS:
        assert key in results, key
        assert math.isfinite(results[key]), key
    assert results["steps"] == 4


def test_keep_one_checkpoint(workspace, tmp_path):
    output_dir = tmp_path / "run"
    train(make_config(workspace, output_dir, "keep_checkpoints=1"), progress=False)
    assert checkpoint_names(output_dir) == ["step_4"]


def test_keep_zero_keeps_all(workspace, tmp_path):
    output_dir = tmp_path / "run"
    train(make_config(workspace, output_dir, "keep_checkpoints=0", "save_every=1"), progress=False)
    assert checkpoint_names(output_dir) == ["step_1", "step_2", "step_3", "step_4"]


# ---------------------------------------------------------------------------------------------
# Resume


def test_resume_matches_uninterrupted(workspace, four_step_run, two_step_run, tmp_path):
    output_dir = tmp_path / "resumed"
    shutil.copytree(two_step_run, output_dir)
    train(make_config(workspace, output_dir), resume_from="latest", progress=False)

    resumed = load_file(str(checkpoint_root(output_dir) / "step_4" / "model.safetensors"))
    uninterrupted = load_file(str(checkpoint_root(four_step_run) / "step_4" / "model.safetensors"))
    assert set(resumed) == set(uninterrupted)
    for key, tensor in uninterrupted.items():
        assert torch.equal(resumed[key], tensor), key


def test_resume_trains_rotations_and_lora(four_step_run, two_step_run):
    """Guards the resume test: steps 3 and 4 change the rotations and LoRA factors."""
    at_step_2 = load_file(str(checkpoint_root(two_step_run) / "step_2" / "model.safetensors"))
    at_step_4 = load_file(str(checkpoint_root(four_step_run) / "step_4" / "model.safetensors"))
    trained = [key for key in at_step_4 if key.startswith("rotations.") or ".lora_" in key]
    changed = [key for key in trained if not torch.equal(at_step_2[key], at_step_4[key])]
    assert any(key.startswith("rotations.") for key in changed)
    assert any(".lora_B." in key for key in changed)


def test_resume_rejects_changed_sites(workspace, two_step_run, tmp_path):
    output_dir = tmp_path / "changed"
    shutil.copytree(two_step_run, output_dir)
    config = make_config(workspace, output_dir, "rotation.sites.R2.apply=false")
    with pytest.raises(UserError, match="with other rotation settings"):
        train(config, resume_from="latest", progress=False)


def make_checkpoint_dirs(output_dir: Path, complete: list[str], incomplete: list[str]) -> Path:
    """Create checkpoint directories, with the completion marker only in those of `complete`."""
    root = checkpoint_root(output_dir)
    for name in complete + incomplete:
        (root / name).mkdir(parents=True)
    for name in complete:
        (root / name / MARKER).write_text("{}")
    return root


def test_latest_skips_incomplete_dirs(tmp_path):
    # A staging directory contains the marker for a moment, between writing it and the rename.
    root = make_checkpoint_dirs(tmp_path, ["step_2", "step_4", ".step_9.tmp"], ["step_5"])
    assert resolve_checkpoint(tmp_path, "latest") == root / "step_4"


def test_latest_orders_steps_numerically(tmp_path):
    root = make_checkpoint_dirs(tmp_path, ["step_2", "step_10"], [])
    assert resolve_checkpoint(tmp_path, "latest") == root / "step_10"


def test_latest_without_checkpoint_raises(tmp_path):
    (checkpoint_root(tmp_path) / "step_3").mkdir(parents=True)
    with pytest.raises(UserError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path, "latest")


# ---------------------------------------------------------------------------------------------
# Failures and config checks


def test_nan_loss_stops_run(workspace, tmp_path, monkeypatch):
    real_loss = train_loop.qat_loss
    calls = []

    def loss_nan_on_third_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            return torch.tensor(float("nan"), requires_grad=True), {"ce": float("nan")}
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_loop, "qat_loss", loss_nan_on_third_call)
    output_dir = tmp_path / "run"
    with pytest.raises(FloatingPointError) as raised:
        train(make_config(workspace, output_dir), progress=False)

    message = str(raised.value)
    assert "step 3" in message
    assert str(checkpoint_root(output_dir) / "step_2") in message
    assert checkpoint_names(output_dir) == ["step_2"]


def test_lora_dropout_rejected(workspace, tmp_path):
    with pytest.raises(UserError, match="lora.dropout"):
        make_config(workspace, tmp_path / "run", "lora.dropout=0.1")


# ---------------------------------------------------------------------------------------------
# Command line


@pytest.mark.parametrize("module", ["mambaspin.cli", "train"])
def test_cli_train_prints_table(workspace, tmp_path, module):
    output_dir = tmp_path / "run"
    command = [sys.executable, "-m", module]
    if module == "mambaspin.cli":
        command.append("train")
    command += ["--config", str(DEFAULT_CONFIG), *run_overrides(workspace, output_dir, "max_steps=2")]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True,
                               timeout=CLI_TIMEOUT_SECONDS)

    assert completed.returncode == 0, completed.stderr[-2000:]
    rows = [line.split()[0] for line in completed.stdout.splitlines() if line.strip()]
    for name in RESULT_KEYS:
        assert name in rows, completed.stdout
    assert (output_dir / "results.json").is_file()
