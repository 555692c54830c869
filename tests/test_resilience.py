"""Training that is killed, crashes while saving, diverges or gets bad input.

Most tests run the command line in a subprocess, on a `MambaLM` with d_model 48 and 2 layers,
and check the exit status, the single `error:` line on stderr and what is left in the output
directory. The kill test runs for real: it sends SIGKILL to a training process and resumes it.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from accelerate import Accelerator
from safetensors.torch import load_file

from conftest import perturb_parameters
from mambaspin.config import MambaConfig
from mambaspin.loading import save_model
from mambaspin.model import MambaLM
from mambaspin.tokenizer import train_byte_level_bpe
from train.checkpoints import MARKER, checkpoint_root, resolve_checkpoint
from train.config import load_run_config
from train.loop import train

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"
SHIPPED_TEXT = REPO_ROOT / "shipped" / "tinyshakespeare.txt"
TEXT_CHARS = 60_000
VOCAB = 300
CLI_TIMEOUT_SECONDS = 180
POLL_SECONDS = 0.01


def subprocess_environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def save_tiny_model(directory: Path, tokenizer, dt_rank: int) -> Path:
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(vocab_size=VOCAB, d_model=48, n_layer=2, d_state=8, dt_rank=dt_rank))
    perturb_parameters(model, seed=0)
    return save_model(model, directory, tokenizer)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """Tiny checkpoints with dt_rank 4 and 3, their tokenizer, and the training text file."""
    root = tmp_path_factory.mktemp("resilience")
    text = SHIPPED_TEXT.read_text(encoding="utf-8")[:TEXT_CHARS]
    text_file = root / "text.txt"
    text_file.write_text(text, encoding="utf-8")
    tokenizer = train_byte_level_bpe(text, VOCAB)
    return {
        "root": root,
        "model_dir": save_tiny_model(root / "model", tokenizer, dt_rank=4),
        "model_dt_rank_3": save_tiny_model(root / "model_dt_rank_3", tokenizer, dt_rank=3),
        "text_file": text_file,
    }


def run_overrides(workspace, output_dir: Path, *overrides) -> list[str]:
    """key=value overrides that shrink the default run to the tiny checkpoint, then `overrides`."""
    return [
        f"model.path={workspace['model_dir']}",
        f"data.text={workspace['text_file']}",
        "model.device=cpu",
        "data.block_size=32",
        "data.max_eval_tokens=200",
        "calibration.n_blocks=8",
        "train.batch_size=2",
        "lora.rank=2",
        f"output_dir={output_dir}",
        "log_every=1",
        "eval_every=0",
        "max_steps=2",
        "save_every=1",
        "keep_checkpoints=4",
        *overrides,
    ]


def make_config(workspace, output_dir: Path, *overrides):
    return load_run_config(DEFAULT_CONFIG, run_overrides(workspace, output_dir, *overrides))


def train_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "mambaspin.cli", "train", "--config", str(DEFAULT_CONFIG), *arguments]


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(*arguments), cwd=REPO_ROOT, env=subprocess_environment(),
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_SECONDS)


def error_line(completed: subprocess.CompletedProcess, status: int = 2) -> str:
    """Check for a clean failure with `status` and return its only `error:` line."""
    assert completed.returncode == status, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr, completed.stderr[-3000:]
    lines = [line for line in completed.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith("mambaspin train: error: "), lines[0]
    return lines[0]


def assert_nothing_half_written(output_dir: Path) -> None:
    """Check that no checkpoint, results or staging file exists, and that a calibration, if any, is complete."""
    if not output_dir.exists():
        return
    assert not (output_dir / "results.json").exists()
    assert not checkpoint_root(output_dir).exists()
    assert [path for path in output_dir.rglob("*.tmp")] == []
    calibration = output_dir / "calibration"
    if calibration.exists():
        assert sorted(path.name for path in calibration.iterdir()) == ["calibration.json", "calibration.safetensors"]


def tree_digest(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under `directory`, keyed by relative path."""
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def two_step_run(workspace) -> Path:
    """Output directory of a finished 2-step run with checkpoints step_1 and step_2.

    Tests that resume from it work on a copy.
    """
    output_dir = workspace["root"] / "two_steps"
    train(make_config(workspace, output_dir), progress=False)
    return output_dir


# ---------------------------------------------------------------------------------------------
# Kill and resume


def slow_run_arguments(workspace, output_dir: Path) -> list[str]:
    # Blocks of 128 tokens and 4 micro-batches per step make a step take about 0.25 s on one thread
    # of a 2-core x86 CPU, so the 4 steps after step_4 last far longer than the 10 ms polling interval.
    return ["--config", str(DEFAULT_CONFIG),
            *run_overrides(workspace, output_dir, "data.block_size=128", "train.batch_size=4",
                           "train.grad_accum=4", "max_steps=8", "save_every=2", "keep_checkpoints=8")]


def start_training(arguments: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as stream:
        return subprocess.Popen([sys.executable, "-m", "train", *arguments], cwd=REPO_ROOT, env=subprocess_environment(),
                                stdout=stream, stderr=subprocess.STDOUT)


def test_kill_resume_matches_uninterrupted(workspace, tmp_path):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference = start_training(slow_run_arguments(workspace, reference_dir), tmp_path / "reference.log")
    victim = start_training(slow_run_arguments(workspace, killed_dir), tmp_path / "killed.log")

    marker = checkpoint_root(killed_dir) / "step_4" / MARKER
    deadline = time.monotonic() + CLI_TIMEOUT_SECONDS
    while not marker.is_file() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
    killed_mid_run = victim.poll() is None
    if killed_mid_run:
        os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=CLI_TIMEOUT_SECONDS)
    assert reference.wait(timeout=CLI_TIMEOUT_SECONDS) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    assert marker.is_file(), (tmp_path / "killed.log").read_text()[-3000:]
    assert killed_mid_run, "the run finished before step_4 was seen; it cannot test a kill"

    resumed = subprocess.run([sys.executable, "-m", "train", *slow_run_arguments(workspace, killed_dir),
                              "--resume_from_checkpoint", "latest"], cwd=REPO_ROOT, env=subprocess_environment(),
                             capture_output=True, text=True, timeout=CLI_TIMEOUT_SECONDS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed_from = re.search(r"resumed from \S+ at step (\d+)", resumed.stderr)
    assert resumed_from is not None, resumed.stderr[-3000:]
    assert 4 <= int(resumed_from.group(1)) < 8

    final = load_file(str(checkpoint_root(killed_dir) / "step_8" / "model.safetensors"))
    expected = load_file(str(checkpoint_root(reference_dir) / "step_8" / "model.safetensors"))
    assert set(final) == set(expected)
    assert any(name.startswith("rotations.") for name in expected)
    assert any(".lora_B." in name for name in expected)
    for name, tensor in expected.items():
        assert torch.equal(final[name], tensor), name


# ---------------------------------------------------------------------------------------------
# Crash while a checkpoint is written


class SimulatedCrash(Exception):
    """Stands in for a kill in the middle of `accelerator.save_state`."""


def test_crash_during_save_keeps_previous(workspace, tmp_path, monkeypatch):
    real_save_state = Accelerator.save_state
    calls = []

    def save_state_crashing_on_second_call(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) < 2:
            return real_save_state(self, output_dir, **kwargs)
        staging = Path(output_dir)
        staging.mkdir(parents=True, exist_ok=True)
        (staging / "model.safetensors").write_bytes(b"\x00" * 100)
        raise SimulatedCrash(output_dir)

    monkeypatch.setattr(Accelerator, "save_state", save_state_crashing_on_second_call)
    output_dir = tmp_path / "run"
    config = make_config(workspace, output_dir, "max_steps=4", "save_every=2")
    with pytest.raises(SimulatedCrash):
        train(config, progress=False)

    root = checkpoint_root(output_dir)
    assert not (root / ".step_4.tmp").exists()  # an exception removes the partial checkpoint
    assert not (root / "step_4").exists()
    assert resolve_checkpoint(output_dir, "latest") == root / "step_2"

    # A kill leaves the partial directory behind: `latest` ignores it and the next save replaces it.
    (root / ".step_4.tmp").mkdir()
    (root / ".step_4.tmp" / "model.safetensors").write_bytes(b"\x00" * 100)
    assert resolve_checkpoint(output_dir, "latest") == root / "step_2"

    monkeypatch.undo()
    results = train(config, resume_from="latest", progress=False)
    assert results["steps"] == 4
    assert (root / "step_4" / MARKER).is_file()
    assert not (root / ".step_4.tmp").exists()


# ---------------------------------------------------------------------------------------------
# NaN loss


def test_nan_loss_exits_3(workspace, tmp_path):
    # A learning rate of 1e30 (5e28 after the first warmup step) sends the LoRA factors to about
    # 1e28 in step 1, so the loss of step 2 overflows to NaN.
    output_dir = tmp_path / "run"
    completed = run_cli(*run_overrides(workspace, output_dir, "max_steps=4", "train.lr_lora=1e30"))
    line = error_line(completed, status=3)
    assert "step 2" in line
    assert str(checkpoint_root(output_dir) / "step_1") in line
    assert sorted(path.name for path in checkpoint_root(output_dir).iterdir()) == ["step_1"]


def test_diverged_rotations_not_saved(workspace, tmp_path):
    # A rotation learning rate of 1e30 throws the Cayley step off the manifold in step 1.
    output_dir = tmp_path / "run"
    completed = run_cli(*run_overrides(workspace, output_dir, "max_steps=4", "train.lr_rotation=1e30"))
    line = error_line(completed, status=3)
    assert "Stiefel manifold" in line
    assert "step 1" in line
    assert not any(path.name.startswith("step_") for path in checkpoint_root(output_dir).glob("*"))


# ---------------------------------------------------------------------------------------------
# Bad input: one case per test, each through the command line


def test_missing_model_path(workspace, tmp_path):
    missing = tmp_path / "no_such_model"
    completed = run_cli(*run_overrides(workspace, tmp_path / "run", f"model.path={missing}"))
    assert str(missing) in error_line(completed)
    assert_nothing_half_written(tmp_path / "run")


def test_model_not_mamba(workspace, tmp_path):
    gpt2_dir = tmp_path / "gpt2"
    transformers.GPT2Config(n_layer=2, n_embd=48, n_head=2, vocab_size=VOCAB).save_pretrained(gpt2_dir)
    completed = run_cli(*run_overrides(workspace, tmp_path / "run", f"model.path={gpt2_dir}"))
    line = error_line(completed)
    assert str(gpt2_dir / "config.json") in line
    assert "gpt2" in line
    assert_nothing_half_written(tmp_path / "run")


def test_unknown_key_suggests(workspace, tmp_path):
    completed = run_cli(*run_overrides(workspace, tmp_path / "run", "train.lr_lorra=1"))
    line = error_line(completed)
    assert "train.lr_lorra" in line
    assert "Did you mean 'lr_lora'?" in line
    assert_nothing_half_written(tmp_path / "run")


def test_bits_out_of_range(workspace, tmp_path):
    completed = run_cli(*run_overrides(workspace, tmp_path / "run", "quant.weight={bits: 9}"))
    assert "bits=9" in error_line(completed)
    assert_nothing_half_written(tmp_path / "run")


def test_bits_out_of_range_yaml(workspace, tmp_path):
    config_file = tmp_path / "nine_bits.yaml"
    config_file.write_text(f"base: {DEFAULT_CONFIG}\nquant:\n  weight: {{bits: 9}}\n")
    command = train_command(*run_overrides(workspace, tmp_path / "run"))
    command[command.index(str(DEFAULT_CONFIG))] = str(config_file)
    completed = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_environment(), capture_output=True, text=True,
                               timeout=CLI_TIMEOUT_SECONDS)
    assert "bits=9" in error_line(completed)
    assert_nothing_half_written(tmp_path / "run")


def test_group_size_not_divisor(workspace, tmp_path):
    completed = run_cli(*run_overrides(workspace, tmp_path / "run",
                                       "quant.weight={bits: 4, granularity: per_group, group_size: 7}"))
    line = error_line(completed)
    assert "group_size=7 does not divide the input width of every quantized linear (in_features 4, 48, 96)" in line
    assert "gcd 4, such as 4, 2, 1" in line
    assert not (tmp_path / "run" / "calibration").exists()  # rejected before calibrating
    assert_nothing_half_written(tmp_path / "run")


def test_lora_on_conv1d(workspace, tmp_path):
    completed = run_cli(*run_overrides(workspace, tmp_path / "run", "lora.targets=[conv1d]"))
    assert "conv1d" in error_line(completed)
    assert_nothing_half_written(tmp_path / "run")


def test_lora_on_missing_module(workspace, tmp_path):
    completed = run_cli(*run_overrides(workspace, tmp_path / "run", "lora.targets=[gate_proj]"))
    line = error_line(completed)
    assert "gate_proj" in line
    assert "matches no module" in line
    assert_nothing_half_written(tmp_path / "run")


def test_lora_rank_above_dt_rank(workspace, tmp_path):
    completed = run_cli(*run_overrides(workspace, tmp_path / "run", "lora.rank=8"))
    line = error_line(completed)
    assert "rank 8" in line
    assert "dt_proj" in line
    assert_nothing_half_written(tmp_path / "run")


def test_text_shorter_than_block(workspace, tmp_path):
    short_text = tmp_path / "short.txt"
    short_text.write_text("To be, or not to be.\n", encoding="utf-8")
    completed = run_cli(*run_overrides(workspace, tmp_path / "run", f"data.text={short_text}"))
    line = error_line(completed)
    assert str(short_text) in line
    assert "fewer than one block" in line
    assert_nothing_half_written(tmp_path / "run")


def test_few_calibration_tokens_warn(workspace, tmp_path):
    """One block of 32 tokens gives a rank-deficient covariance at the 96-channel sites: a warning."""
    completed = run_cli(*run_overrides(workspace, tmp_path / "run", "calibration.n_blocks=1", "max_steps=1"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    warnings = [line for line in completed.stderr.splitlines() if line.startswith("WARNING rotations.klt")]
    assert len(warnings) == 1, completed.stderr[-3000:]
    assert "R2 layer 0 (32 samples, dim 96)" in warnings[0]


def test_resume_changed_sites(workspace, two_step_run, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(two_step_run, output_dir)
    before = tree_digest(output_dir)
    completed = run_cli(*run_overrides(workspace, output_dir, "rotation.sites.R2.apply=false", "max_steps=4"),
                        "--resume_from_checkpoint", "latest")
    line = error_line(completed)
    assert str(checkpoint_root(output_dir) / "step_2") in line
    assert "with other rotation settings" in line
    assert tree_digest(output_dir) == before


def test_no_hadamard_for_size(workspace, tmp_path):
    completed = run_cli(*run_overrides(workspace, tmp_path / "run", f"model.path={workspace['model_dt_rank_3']}",
                                       "rotation.sites.R5.init=hadamard"))
    line = error_line(completed)
    assert "R5" in line
    assert "size 3" in line
    assert_nothing_half_written(tmp_path / "run")


def test_output_dir_under_file(workspace, tmp_path):
    regular_file = tmp_path / "file"
    regular_file.write_text("not a directory\n")
    output_dir = regular_file / "run"
    completed = run_cli(*run_overrides(workspace, output_dir))
    assert str(output_dir) in error_line(completed)
    assert regular_file.read_text() == "not a directory\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file"]


def test_truncated_checkpoint(workspace, two_step_run, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(two_step_run, output_dir)
    weights = checkpoint_root(output_dir) / "step_2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    before = tree_digest(output_dir)
    completed = run_cli(*run_overrides(workspace, output_dir, "max_steps=4"), "--resume_from_checkpoint", "latest")
    line = error_line(completed)
    assert str(checkpoint_root(output_dir) / "step_2") in line
    assert "could not be loaded" in line
    assert tree_digest(output_dir) == before


def test_optimizer_file_not_torch(workspace, two_step_run, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(two_step_run, output_dir)
    (checkpoint_root(output_dir) / "step_2" / "optimizer.bin").write_text("not a torch file\n")
    before = tree_digest(output_dir)
    completed = run_cli(*run_overrides(workspace, output_dir, "max_steps=4"), "--resume_from_checkpoint", "latest")
    line = error_line(completed)
    assert str(checkpoint_root(output_dir) / "step_2") in line
    assert "could not be loaded" in line
    assert tree_digest(output_dir) == before


def test_resume_from_non_checkpoint(workspace, tmp_path):
    not_checkpoint = tmp_path / "elsewhere"
    not_checkpoint.mkdir()
    (not_checkpoint / "model.safetensors").write_bytes(b"\x00" * 100)
    completed = run_cli(*run_overrides(workspace, tmp_path / "run"), "--resume_from_checkpoint", str(not_checkpoint))
    line = error_line(completed)
    assert str(not_checkpoint) in line
    assert "not a complete checkpoint" in line
    assert_nothing_half_written(tmp_path / "run")


# ---------------------------------------------------------------------------------------------
# No pickle from user paths


SOURCE_DIRS = ("mambaspin", "train", "rotations", "lora", "scripts", "tests")


def unsafe_loads(source: str) -> list[int]:
    """Line numbers of `torch.load(...)` calls without weights_only=True, and of pickle loads."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        if owner == "pickle" and node.func.attr in ("load", "loads", "Unpickler"):
            lines.append(node.lineno)
        if owner == "torch" and node.func.attr == "load":
            safe = any(keyword.arg == "weights_only" and isinstance(keyword.value, ast.Constant)
                       and keyword.value.value is True for keyword in node.keywords)
            if not safe:
                lines.append(node.lineno)
    return lines


def test_unsafe_loads_finds_unsafe_calls():
    source = ("import torch, pickle\n"
              "torch.load(path)\n"
              "torch.load(path, weights_only=False)\n"
              "torch.load(path, map_location='cpu', weights_only=True)\n"
              "pickle.load(stream)\n")
    assert unsafe_loads(source) == [2, 3, 5]


def test_sources_load_without_pickle():
    offenders = []
    for directory in SOURCE_DIRS:
        for path in sorted((REPO_ROOT / directory).rglob("*.py")):
            for line in unsafe_loads(path.read_text(encoding="utf-8")):
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{line}")
    assert offenders == []


# ---------------------------------------------------------------------------------------------
# Existing runs, value types, argument order and Ctrl-C


def test_new_run_rejects_old_checkpoints(workspace, two_step_run, tmp_path):
    """Retention keeps the highest steps, so a new run over old checkpoints would lose its own."""
    output_dir = tmp_path / "run"
    shutil.copytree(two_step_run, output_dir)
    before = tree_digest(output_dir)
    line = error_line(run_cli(*run_overrides(workspace, output_dir)))
    assert "already contains checkpoints" in line
    assert "--resume_from_checkpoint latest" in line
    assert tree_digest(output_dir) == before


def test_resume_past_max_steps(workspace, two_step_run, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(two_step_run, output_dir)
    before = tree_digest(output_dir)
    line = error_line(run_cli(*run_overrides(workspace, output_dir, "max_steps=1"), "--resume_from_checkpoint", "latest"))
    assert "step 2, past max_steps=1" in line


def test_resume_at_max_steps_rejected(workspace, two_step_run, tmp_path):
    """A finished run resumed would redo its baselines and overwrite results.json with an empty history."""
    output_dir = tmp_path / "run"
    shutil.copytree(two_step_run, output_dir)
    before = tree_digest(output_dir)
    line = error_line(run_cli(*run_overrides(workspace, output_dir), "--resume_from_checkpoint", "latest"))
    assert "step 2, already at max_steps=2" in line
    assert tree_digest(output_dir) == before
    assert tree_digest(output_dir) == before


@pytest.mark.parametrize("override, expected", [
    ("train.lr_lora=abc", "train.lr_lora='abc' is invalid: expected a number"),
    ("rotation.sites.R2.apply=maybe", "rotation.sites.R2.apply='maybe' is invalid: expected true or false"),
    ("max_steps=1.5", "max_steps=1.5 is invalid: expected an integer"),
    ("seed=true", "seed=True is invalid: expected an integer"),
    ("calibration.batch_size=0", "calibration.batch_size=0 is invalid"),
    ("model.device=tpu", "model.device='tpu' is invalid"),
    ("lora.targets=conv1d", "LoRA on conv1d is not supported"),
])
def test_bad_value_types(workspace, tmp_path, override, expected):
    line = error_line(run_cli(*run_overrides(workspace, tmp_path / "run", override)))
    assert expected in line
    assert_nothing_half_written(tmp_path / "run")


def test_cuda_device_without_gpu(workspace, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU; the test checks the error on machines without one")
    line = error_line(run_cli(*run_overrides(workspace, tmp_path / "run", "model.device=cuda")))
    assert "model.device 'cuda' needs a CUDA GPU" in line
    assert_nothing_half_written(tmp_path / "run")


def test_overrides_after_options(workspace, tmp_path):
    report = tmp_path / "report.json"
    overrides = run_overrides(workspace, tmp_path / "run", "max_steps=1")
    completed = run_cli(*overrides[:3], "--json", str(report), *overrides[3:])
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert json.loads(report.read_text())["steps"] == 1


@pytest.mark.parametrize("stop, status, word", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_stop_signal_exits_cleanly(workspace, tmp_path, stop, status, word):
    output_dir = tmp_path / "run"
    arguments = [argument for argument in slow_run_arguments(workspace, output_dir) if argument != "max_steps=8"]
    process = start_training([*arguments, "max_steps=200"], tmp_path / "log.txt")
    deadline = time.time() + CLI_TIMEOUT_SECONDS
    while not (checkpoint_root(output_dir) / "step_2").is_dir() and time.time() < deadline and process.poll() is None:
        time.sleep(POLL_SECONDS)
    process.send_signal(stop)
    returncode = process.wait(timeout=CLI_TIMEOUT_SECONDS)
    log = (tmp_path / "log.txt").read_text()
    assert returncode == status, log[-3000:]
    assert "Traceback" not in log
    assert f"mambaspin train: {word}" in log
    assert (checkpoint_root(output_dir) / "step_2" / MARKER).is_file()
    assert [path for path in output_dir.rglob("*.tmp")] == []
