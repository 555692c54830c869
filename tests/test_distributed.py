"""Data-parallel training on two CPU processes: torchrun, accelerate with MPI, FSDP and DeepSpeed.

Each run trains a `MambaLM` with d_model 48 and 2 layers for 3 steps on blocks of 32 tokens, on
localhost only. The two-process runs set MAMBASPIN_DUMP_TRAINABLES, so that every process writes
its trainable parameters after the last step and the test can compare the replicas.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from conftest import perturb_parameters
from mambaspin.config import MambaConfig
from mambaspin.errors import NotSupportedError
from mambaspin.loading import save_model
from mambaspin.model import MambaLM
from mambaspin.tokenizer import train_byte_level_bpe
from train import loop as train_loop
from train.checkpoints import checkpoint_root
from train.config import load_run_config

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"
SHIPPED_TEXT = REPO_ROOT / "shipped" / "tinyshakespeare.txt"
TEXT_CHARS = 60_000
VOCAB = 300
STEPS = 3
RUN_TIMEOUT_SECONDS = 300

# Step 1 starts both runs from the same parameters, so its loss and gradient norm differ only by
# the order of the sums. Measured on a 2-core x86 CPU with torch 2.13: 8.1e-8 and 6.4e-8.
FIRST_STEP_TOLERANCE = 1e-5
# Later steps drift apart: AdamW divides each update by the gradient's own magnitude, so rounding
# differences in small gradient entries become full-size updates, and 4-bit fake quantization
# amplifies them. Measured on the same machine: 0 at step 2 and 1.4e-3 at step 3.
LOSS_CURVE_TOLERANCE = 1e-2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def subprocess_environment(**extra) -> dict:
    """The test's environment with one thread per process, no hub access and `extra` added."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """A saved tiny checkpoint with its tokenizer, and the training text file."""
    root = tmp_path_factory.mktemp("distributed")
    text = SHIPPED_TEXT.read_text(encoding="utf-8")[:TEXT_CHARS]
    text_file = root / "text.txt"
    text_file.write_text(text, encoding="utf-8")
    tokenizer = train_byte_level_bpe(text, VOCAB)

    torch.manual_seed(0)
    model = MambaLM(MambaConfig(vocab_size=VOCAB, d_model=48, n_layer=2, d_state=8, dt_rank=4))
    perturb_parameters(model, seed=0)
    model_dir = save_model(model, root / "model", tokenizer)
    return {"root": root, "model_dir": model_dir, "text_file": text_file}


def run_overrides(workspace, output_dir: Path, batch_size: int) -> list[str]:
    """key=value overrides of a 3-step run with `batch_size` blocks per process.

    distill_weight=0 makes the loss the cross-entropy: on this random model the float teacher and
    the quantized student agree to a KL of about 1e-8, which is too small to compare runs by.
    """
    return [
        f"model.path={workspace['model_dir']}",
        f"data.text={workspace['text_file']}",
        "model.device=cpu",
        "data.block_size=32",
        "data.max_eval_tokens=200",
        "calibration.n_blocks=8",
        f"train.batch_size={batch_size}",
        "train.distill_weight=0",
        "lora.rank=2",
        f"output_dir={output_dir}",
        "log_every=1",
        "eval_every=0",
        f"max_steps={STEPS}",
        f"save_every={STEPS}",
    ]


def run(command: list[str], environment: dict) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_SECONDS)


@pytest.fixture(scope="module")
def ddp_run(workspace) -> dict:
    """torchrun with 2 processes of 2 blocks each, dumping both replicas' trainable parameters."""
    output_dir, dump_dir = workspace["root"] / "ddp", workspace["root"] / "ddp_dump"
    # `python -m torch.distributed.run` is the torchrun script, run by this test's interpreter.
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "-m", "train", "--config", str(DEFAULT_CONFIG), *run_overrides(workspace, output_dir, 2)]
    completed = run(command, subprocess_environment(MAMBASPIN_DUMP_TRAINABLES=str(dump_dir)))
    return {"completed": completed, "output_dir": output_dir, "dump_dir": dump_dir}


@pytest.fixture(scope="module")
def single_run(workspace) -> dict:
    """One process with the same global batch of 4 blocks per step."""
    output_dir = workspace["root"] / "single"
    command = [sys.executable, "-m", "train", "--config", str(DEFAULT_CONFIG), *run_overrides(workspace, output_dir, 4)]
    completed = run(command, subprocess_environment())
    return {"completed": completed, "output_dir": output_dir}


def history(output_dir: Path) -> list[dict]:
    entries = json.loads((output_dir / "results.json").read_text())["history"]
    return [entry for entry in entries if "loss" in entry]


def relative_difference(actual: float, expected: float) -> float:
    return abs(actual - expected) / abs(expected)


def assert_replicas_equal(dump_dir: Path) -> None:
    rank_0 = load_file(str(dump_dir / "rank_0.safetensors"))
    rank_1 = load_file(str(dump_dir / "rank_1.safetensors"))
    assert set(rank_0) == set(rank_1)
    assert any(name.startswith("rotations.") for name in rank_0), sorted(rank_0)
    assert any(".lora_B." in name for name in rank_0), sorted(rank_0)
    for name, tensor in rank_0.items():
        assert torch.equal(tensor, rank_1[name]), name


# ---------------------------------------------------------------------------------------------
# torchrun, 2 processes


def test_ddp_run_exits_zero(ddp_run):
    completed = ddp_run["completed"]
    assert completed.returncode == 0, completed.stderr[-3000:]


def test_ddp_replicas_bitwise_equal(ddp_run):
    assert_replicas_equal(ddp_run["dump_dir"])


def test_ddp_trains_lora(ddp_run):
    """Guards the replica test: LoRA B starts at zero, so a trained one is not."""
    rank_0 = load_file(str(ddp_run["dump_dir"] / "rank_0.safetensors"))
    lora_b = [tensor for name, tensor in rank_0.items() if ".lora_B." in name]
    assert any(tensor.abs().max() > 0 for tensor in lora_b)


def test_ddp_logs_every_step(ddp_run):
    assert [entry["step"] for entry in history(ddp_run["output_dir"])] == list(range(1, STEPS + 1))


def test_ddp_first_step_matches_single(ddp_run, single_run):
    assert single_run["completed"].returncode == 0, single_run["completed"].stderr[-3000:]
    first_ddp = history(ddp_run["output_dir"])[0]
    first_single = history(single_run["output_dir"])[0]
    assert relative_difference(first_ddp["loss"], first_single["loss"]) < FIRST_STEP_TOLERANCE
    assert relative_difference(first_ddp["grad_norm"], first_single["grad_norm"]) < FIRST_STEP_TOLERANCE


def test_ddp_loss_curve_matches_single(ddp_run, single_run):
    assert single_run["completed"].returncode == 0, single_run["completed"].stderr[-3000:]
    ddp_losses = [entry["loss"] for entry in history(ddp_run["output_dir"])]
    single_losses = [entry["loss"] for entry in history(single_run["output_dir"])]
    assert len(ddp_losses) == len(single_losses) == STEPS
    for step, (ddp_loss, single_loss) in enumerate(zip(ddp_losses, single_losses), start=1):
        assert relative_difference(ddp_loss, single_loss) < LOSS_CURVE_TOLERANCE, (step, ddp_loss, single_loss)


def test_ddp_writes_one_checkpoint(ddp_run):
    names = sorted(path.name for path in checkpoint_root(ddp_run["output_dir"]).iterdir())
    assert names == [f"step_{STEPS}"]


def test_ddp_writes_one_results_file(ddp_run):
    output_dir = ddp_run["output_dir"]
    assert [path.name for path in output_dir.rglob("results*")] == ["results.json"]
    assert [path for path in output_dir.rglob("*.tmp")] == []


def test_ddp_prints_table_once(ddp_run):
    lines = ddp_run["completed"].stdout.splitlines()
    assert sum(1 for line in lines if line.split()[:1] == ["trained"]) == 1, ddp_run["completed"].stdout
    assert sum(1 for line in lines if line.startswith("max |RᵀR − I|")) == 1, ddp_run["completed"].stdout


# ---------------------------------------------------------------------------------------------
# Sharded modes


@pytest.mark.parametrize("mode", [DistributedType.FSDP, DistributedType.DEEPSPEED])
def test_sharded_mode_rejected(workspace, tmp_path, monkeypatch, mode):
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: mode))
    config = load_run_config(DEFAULT_CONFIG, run_overrides(workspace, tmp_path / "run", 2))
    with pytest.raises(NotSupportedError) as raised:
        train_loop._make_accelerator(config)

    message = str(raised.value)
    assert mode.value in message
    assert "--multi_gpu" in message
    assert "torchrun" in message


# ---------------------------------------------------------------------------------------------
# accelerate launch with MPI


def test_mpi_run_replicas_equal(workspace, tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed (apt-get install mpich)")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost\n")
    output_dir, dump_dir = tmp_path / "run", tmp_path / "dump"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
               "--mpirun_hostfile", str(hostfile), "-m", "train", "--config", str(DEFAULT_CONFIG),
               *run_overrides(workspace, output_dir, 2)]
    # HF_HOME keeps a user's accelerate default_config.yaml out of this launch.
    environment = subprocess_environment(MAMBASPIN_DUMP_TRAINABLES=str(dump_dir), MASTER_ADDR="127.0.0.1",
                                         MASTER_PORT=str(free_port()), HF_HOME=str(tmp_path / "hf_home"))
    completed = run(command, environment)

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert_replicas_equal(dump_dir)
    assert sum(1 for line in completed.stdout.splitlines() if line.split()[:1] == ["trained"]) == 1, completed.stdout
