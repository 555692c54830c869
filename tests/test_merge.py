"""`mambaspin merge`: round trips of trained runs through the packed quantized checkpoint.

Every run trains a `MambaLM` with d_model 48 and 2 layers for 2 steps of 2 blocks of 32 tokens on
CPU. After 2 AdamW steps the LoRA B factors are nonzero and the rotations have moved, so a merge
that dropped LoRA, a rotation or an activation scale would change the logits.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from conftest import perturb_parameters, relative_error
from mambaspin.config import MambaConfig
from mambaspin.data import load_text_splits
from mambaspin.errors import NotSupportedError, UserError
from mambaspin.evaluate import evaluate_text
from mambaspin.export import pack_codes, unpack_codes, is_quantized_dir, load_quantized
from mambaspin.loading import load_model, save_model
from mambaspin.model import MambaLM
from mambaspin.qat import QATLinear
from mambaspin.quant import ActFakeQuantizer
from mambaspin.quant_model import LINEARS, SSM_POINTS
from mambaspin.tokenizer import train_byte_level_bpe
from train.checkpoints import resolve_checkpoint
from train.config import load_run_config
from train.loop import train
from train.merge import load_trained, merge

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"
SHIPPED_TEXT = REPO_ROOT / "shipped" / "tinyshakespeare.txt"
TEXT_CHARS = 60_000
VOCAB = 300
EVAL_CHARS = 1_500
BLOCK_SIZE = 32
PRESETS = ("W8A8", "W4A8", "W4A4", "W4A16")
LOGITS_RTOL = 1e-4
LOSS_RTOL = 1e-3
MAX_WEIGHT_SHARE_W4 = 0.30
CLI_TIMEOUT_SECONDS = 120
ONLINE_OPTIONS = ("rotation.sites.R3.apply=true", "rotation.sites.R4.apply=true",
                  "rotation.smooth.apply=true", "quant.ssm_inputs=true")
OFFLINE_ONLY = ("rotation.sites.R2.apply=false", "rotation.sites.R6.apply=false")


def make_model(seed: int) -> MambaLM:
    torch.manual_seed(seed)
    model = MambaLM(MambaConfig(vocab_size=VOCAB, d_model=48, n_layer=2, d_state=8, dt_rank=4))
    perturb_parameters(model, seed=seed)
    return model


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """A saved tiny checkpoint with its tokenizer, the training text file and a validation sample."""
    root = tmp_path_factory.mktemp("merge")
    text = SHIPPED_TEXT.read_text(encoding="utf-8")[:TEXT_CHARS]
    text_file = root / "text.txt"
    text_file.write_text(text, encoding="utf-8")
    tokenizer = train_byte_level_bpe(text, VOCAB)
    assert tokenizer.vocab_size <= VOCAB

    model_dir = save_model(make_model(seed=0), root / "model", tokenizer)
    validation = load_text_splits(text_file).validation[:EVAL_CHARS]
    return {"root": root, "model_dir": model_dir, "text_file": text_file, "tokenizer": tokenizer,
            "validation": validation}


def train_run(model_dir: Path, text_file: Path, output_dir: Path, *overrides) -> Path:
    """Train the default config, shrunk to the tiny checkpoint, for 2 steps and return the run directory."""
    config = load_run_config(DEFAULT_CONFIG, [
        f"model.path={model_dir}",
        f"data.text={text_file}",
        "model.device=cpu",
        f"data.block_size={BLOCK_SIZE}",
        "data.max_eval_tokens=300",
        "calibration.n_blocks=8",
        "train.batch_size=2",
        "lora.rank=2",
        "max_steps=2",
        "save_every=0",
        "eval_every=0",
        "log_every=0",
        f"output_dir={output_dir}",
        *overrides,
    ])
    train(config, progress=False)
    return output_dir


@pytest.fixture(scope="module")
def trained(workspace):
    """Return a function that trains a run once per override set and returns its directory."""
    runs: dict[tuple, Path] = {}

    def get(*overrides) -> Path:
        if overrides not in runs:
            output_dir = workspace["root"] / f"run{len(runs)}"
            runs[overrides] = train_run(workspace["model_dir"], workspace["text_file"], output_dir, *overrides)
        return runs[overrides]

    return get


@pytest.fixture(scope="module")
def merged(workspace, trained):
    """Return a function that merges a trained run once per override set and returns (run dir, merged dir)."""
    outputs: dict[tuple, Path] = {}

    def get(*overrides) -> tuple[Path, Path]:
        run = trained(*overrides)
        if overrides not in outputs:
            outputs[overrides] = merge(run, workspace["root"] / f"merged{len(outputs)}")["out"]
        return run, Path(outputs[overrides])

    return get


@pytest.fixture
def damaged_copy(merged, tmp_path):
    """A writable copy of the merged W4A4 checkpoint, for tests that damage it."""
    _, merged_dir = merged("quant.preset=W4A4")
    return Path(shutil.copytree(merged_dir, tmp_path / "copy"))


def sample_ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (2, BLOCK_SIZE), generator=generator)


@torch.no_grad()
def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    output = model(ids)
    return getattr(output, "logits", output).float()


def validation_loss(model, workspace) -> float:
    result = evaluate_text(model, workspace["tokenizer"], workspace["validation"], BLOCK_SIZE, progress=False)
    return result.loss_per_token


def loaded_message(directory: Path) -> str:
    """Return the UserError message of load_quantized(directory), failing the test when it does not raise."""
    with pytest.raises(UserError) as caught:
        load_quantized(directory)
    return str(caught.value)


# ---------------------------------------------------------------------------------------------
# Training moved the factors that the merge folds in


def test_run_trains_lora_b(trained):
    state = load_file(str(resolve_checkpoint(trained("quant.preset=W4A4"), "latest") / "model.safetensors"))
    factors = {name: tensor for name, tensor in state.items() if ".lora_B." in name}
    assert factors, "the checkpoint holds no LoRA B factor"
    assert any(tensor.abs().max() > 0 for tensor in factors.values())


# ---------------------------------------------------------------------------------------------
# Round trip: load_quantized reproduces the training-time model


@pytest.mark.parametrize("preset", PRESETS)
def test_round_trip_logits(merged, preset):
    run, merged_dir = merged(f"quant.preset={preset}")
    _, reference, _, _ = load_trained(run)
    ids = sample_ids()
    error = relative_error(logits_of(load_quantized(merged_dir), ids), logits_of(reference, ids))
    assert error <= LOGITS_RTOL, f"{preset}: relative logits error {error:.2e}"


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("width", [1, 5, 6])
def test_pack_codes_round_trip(symmetric, width):
    generator = torch.Generator().manual_seed(width)
    low, high = (-8, 8) if symmetric else (0, 16)
    codes = torch.randint(low, high, (3, width), generator=generator, dtype=torch.int8 if symmetric else torch.uint8)
    packed = pack_codes(codes, bits=4)
    assert packed.shape == (3, (width + 1) // 2)
    assert torch.equal(unpack_codes(packed, 4, symmetric, width), codes)


def test_round_trip_odd_dt_rank(workspace, tmp_path):
    """dt_proj's input is dt_rank wide; an odd width is padded by one code when packing 4-bit codes."""
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(vocab_size=VOCAB, d_model=40, n_layer=1, d_state=4, dt_rank=5))
    perturb_parameters(model, seed=0)
    model_dir = save_model(model, tmp_path / "model", workspace["tokenizer"])
    run = train_run(model_dir, workspace["text_file"], tmp_path / "run", "quant.preset=W4A4",
                    "rotation.sites.R5.init=klt", "rotation.sites.R1.init=klt")
    merged_dir = merge(run, tmp_path / "merged")["out"]
    _, reference, _, _ = load_trained(run)
    ids = sample_ids()
    assert torch.equal(logits_of(load_quantized(merged_dir), ids), logits_of(reference, ids))


@pytest.mark.parametrize("preset", PRESETS)
def test_round_trip_loss(merged, workspace, preset):
    run, merged_dir = merged(f"quant.preset={preset}")
    _, reference, _, _ = load_trained(run)
    expected = validation_loss(reference, workspace)
    actual = validation_loss(load_quantized(merged_dir), workspace)
    assert abs(actual - expected) <= LOSS_RTOL * abs(expected), f"{preset}: loss {actual} vs {expected}"


@pytest.mark.parametrize("preset", PRESETS)
def test_load_twice_bitwise(merged, preset):
    _, merged_dir = merged(f"quant.preset={preset}")
    ids = sample_ids()
    assert torch.equal(logits_of(load_quantized(merged_dir), ids), logits_of(load_quantized(merged_dir), ids))


@pytest.mark.parametrize("preset", PRESETS)
def test_load_model_dispatches(merged, preset):
    _, merged_dir = merged(f"quant.preset={preset}")
    ids = sample_ids()
    assert is_quantized_dir(merged_dir)
    assert torch.equal(logits_of(load_model(merged_dir), ids), logits_of(load_quantized(merged_dir), ids))


def test_transformers_rejects_packed_checkpoint(merged):
    """transformers must stop on the packed format: one that loaded it would drop the packed
    weights and run randomly initialized linears."""
    _, merged_dir = merged("quant.preset=W4A4")
    with pytest.raises(ValueError, match="quant_method"):
        transformers.AutoModelForCausalLM.from_pretrained(merged_dir)


def test_online_sites_round_trip(merged, workspace):
    run, merged_dir = merged(*ONLINE_OPTIONS)
    _, reference, _, _ = load_trained(run)
    quantized = load_quantized(merged_dir)
    ids = sample_ids()

    error = relative_error(logits_of(quantized, ids), logits_of(reference, ids))
    assert error <= LOGITS_RTOL, f"relative logits error {error:.2e}"
    expected = validation_loss(reference, workspace)
    actual = validation_loss(quantized, workspace)
    assert abs(actual - expected) <= LOSS_RTOL * abs(expected), f"loss {actual} vs {expected}"


def test_online_sites_stored(merged):
    _, merged_dir = merged(*ONLINE_OPTIONS)
    tensors = load_file(str(merged_dir / "model.safetensors"))
    for site in ("R2", "R3", "R4", "R6", "smooth"):
        assert f"backbone.layers.0.mixer.online.{site}" in tensors, site
    for point in SSM_POINTS:
        assert f"backbone.layers.0.mixer.act.{point}.scale" in tensors, point


# ---------------------------------------------------------------------------------------------
# Size of the packed weights


def test_w4_weights_size(merged):
    _, merged_dir = merged("quant.preset=W4A4")
    tensors = load_file(str(merged_dir / "model.safetensors"))
    float_model = make_model(seed=0)
    stored, float_bytes = 0, 0
    for layer, mixer in enumerate(float_model.mixers):
        for name in LINEARS:
            prefix = f"backbone.layers.{layer}.mixer.{name}"
            assert f"{prefix}.weight" not in tensors, f"{prefix} is stored as floats"
            n_weights = getattr(mixer, name).weight.numel()
            assert tensors[f"{prefix}.qweight"].numel() * 2 == n_weights, f"{prefix}: codes are not two per byte"
            for part in ("qweight", "scale", "zero"):
                if f"{prefix}.{part}" in tensors:
                    tensor = tensors[f"{prefix}.{part}"]
                    stored += tensor.numel() * tensor.element_size()
            float_bytes += n_weights * 4
    assert stored <= MAX_WEIGHT_SHARE_W4 * float_bytes, f"{stored} bytes for {float_bytes} float32 bytes"


# ---------------------------------------------------------------------------------------------
# Hugging Face export


def test_hf_export_matches_float_qat(trained, tmp_path):
    run = trained(*OFFLINE_ONLY)
    out = tmp_path / "hf"
    merge(run, out, fmt="hf")
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()

    _, reference, _, _ = load_trained(run)
    for module in reference.modules():
        if isinstance(module, QATLinear):
            module.use_quant = False
        if isinstance(module, ActFakeQuantizer):
            module.enabled = False
    ids = sample_ids()
    with torch.no_grad():
        actual = exported(ids, use_cache=False).logits
    error = relative_error(actual, logits_of(reference, ids))
    assert error <= LOGITS_RTOL, f"relative logits error {error:.2e}"


def test_hf_export_rejects_online_sites(trained, tmp_path):
    run = trained("quant.preset=W4A4")
    with pytest.raises(NotSupportedError) as caught:
        merge(run, tmp_path / "hf", fmt="hf")
    assert "R2" in str(caught.value)
    assert "R6" in str(caught.value)
    assert not (tmp_path / "hf").exists()


# ---------------------------------------------------------------------------------------------
# Rejected inputs


def test_merge_rejects_existing_out(trained, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("kept")
    with pytest.raises(UserError, match="exists"):
        merge(trained("quant.preset=W4A4"), out)
    assert (out / "keep.txt").read_text() == "kept"


def test_merge_overwrites_an_earlier_merge(trained, tmp_path):
    out = tmp_path / "out"
    merge(trained("quant.preset=W8A8"), out)
    stale = (out / "README.md").read_text() + "\nstale line\n"
    (out / "README.md").write_text(stale)
    merge(trained("quant.preset=W4A4"), out, overwrite=True)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["weight"]["bits"] == 4
    assert (out / "README.md").read_text() != stale
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("contents", [["notes.txt"], ["config.json", "model.safetensors", "train.txt"],
                                      ["config.json", "checkpoints/"], ["config.json", "vocab_my_notes.txt"],
                                      ["config.json", "model.safetensors", "README.md"]])
def test_overwrite_rejects_foreign_directory(trained, tmp_path, contents):
    out = tmp_path / "precious"
    for name in contents:
        if name.endswith("/"):
            (out / name).mkdir(parents=True)
        else:
            out.mkdir(exist_ok=True)
            (out / name).write_text("keep")
    before = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*"))
    with pytest.raises(UserError, match="is not a merged checkpoint"):
        merge(trained("quant.preset=W4A4"), out, overwrite=True)
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")) == before


def test_train_rejects_merged_checkpoint(merged, workspace, tmp_path):
    from train.inputs import load_inputs

    _, merged_dir = merged("quant.preset=W4A4")
    config = load_run_config(DEFAULT_CONFIG, [f"model.path={merged_dir}", f"data.text={workspace['text_file']}",
                                              f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(UserError, match="is a quantized checkpoint written by `mambaspin merge`"):
        load_inputs(config)


def test_merge_rejects_inside_base_model(trained, workspace):
    with pytest.raises(UserError, match="inside the base model"):
        merge(trained("quant.preset=W4A4"), workspace["model_dir"] / "sub")
    assert not (workspace["model_dir"] / "sub").exists()


def test_merge_rejects_current_directory(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="the current directory"):
        merge(trained("quant.preset=W4A4"), ".", overwrite=True)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", ["run", "parent", "checkpoints", "checkpoint", "calibration", "other_run",
                                   "base_model"])
def test_merge_rejects_out_holding_run(trained, workspace, tmp_path, where):
    run = Path(shutil.copytree(trained("quant.preset=W4A4"), tmp_path / "runs" / "run"))
    other = Path(shutil.copytree(run, tmp_path / "runs" / "other"))
    checkpoint = "latest"
    out = {"run": run, "parent": run.parent, "checkpoints": run / "checkpoints",
           "checkpoint": run / "checkpoints" / "step_2", "calibration": run / "calibration",
           "other_run": other, "base_model": workspace["model_dir"]}[where]
    if where == "other_run":
        checkpoint = str(other / "checkpoints" / "step_2")
    before = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*"))
    model_before = sorted(os.listdir(workspace["model_dir"]))
    with pytest.raises(UserError, match="--out"):
        merge(run, out, checkpoint=checkpoint, overwrite=True)
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")) == before
    assert sorted(os.listdir(workspace["model_dir"])) == model_before


def test_merge_rejects_out_file(trained, tmp_path):
    out = tmp_path / "model.bin"
    out.write_text("a regular file")
    with pytest.raises(UserError, match="is a file"):
        merge(trained("quant.preset=W4A4"), out, overwrite=True)
    assert out.read_text() == "a regular file"


def test_load_rejects_scaled_rotation(damaged_copy):
    weights = damaged_copy / "model.safetensors"
    tensors = load_file(str(weights))
    name = "backbone.layers.0.mixer.online.R2"
    tensors[name] = tensors[name] * 1.1
    save_file(tensors, str(weights))
    rotation = tensors[name].double()
    measured = float((rotation.T @ rotation - torch.eye(rotation.shape[0], dtype=torch.float64)).abs().max())

    message = loaded_message(damaged_copy)
    assert "not orthogonal" in message
    assert "online.R2" in message
    numbers = [float(match) for match in re.findall(r"\d+\.\d+e[-+]\d+", message)]
    assert any(abs(number - measured) <= 1e-3 * measured for number in numbers), message


def test_load_rejects_missing_weights(damaged_copy):
    (damaged_copy / "model.safetensors").unlink()
    message = loaded_message(damaged_copy)
    assert "model.safetensors" in message
    assert "missing" in message


def test_load_rejects_removed_tensor(damaged_copy):
    weights = damaged_copy / "model.safetensors"
    tensors = load_file(str(weights))
    name = "backbone.layers.1.mixer.out_proj.qweight"
    del tensors[name]
    save_file(tensors, str(weights))
    message = loaded_message(damaged_copy)
    assert "incomplete" in message
    assert name in message


def test_load_rejects_truncated_weights(damaged_copy):
    weights = damaged_copy / "model.safetensors"
    content = weights.read_bytes()
    weights.write_bytes(content[: len(content) // 2])
    assert "model.safetensors" in loaded_message(damaged_copy)


def test_load_rejects_float_checkpoint(workspace):
    message = loaded_message(workspace["model_dir"])
    assert "quantization_config" in message


def test_load_rejects_missing_config(damaged_copy):
    (damaged_copy / "config.json").unlink()
    assert "config.json" in loaded_message(damaged_copy)


def test_load_rejects_invalid_config(damaged_copy):
    (damaged_copy / "config.json").write_text("{not json")
    assert "not valid JSON" in loaded_message(damaged_copy)


def test_merge_rejects_incomplete_run(trained, tmp_path):
    run = Path(shutil.copytree(trained("quant.preset=W4A4"), tmp_path / "run"))
    weights = resolve_checkpoint(run, "latest") / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(name for name in sorted(tensors) if ".lora_B." in name)
    del tensors[name]
    save_file(tensors, str(weights))
    with pytest.raises(UserError) as caught:
        merge(run, tmp_path / "out")
    assert name in str(caught.value)


def test_merge_rejects_other_model(workspace, tmp_path):
    model_dir = Path(shutil.copytree(workspace["model_dir"], tmp_path / "model"))
    run = train_run(model_dir, workspace["text_file"], tmp_path / "run")
    save_model(make_model(seed=1), model_dir, workspace["tokenizer"])
    with pytest.raises(UserError, match=r"\(model weights differ\)"):
        merge(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_merge_rejects_unwritable_out(trained, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a regular file")
    with pytest.raises(UserError) as caught:
        merge(trained("quant.preset=W4A4"), blocker / "out")
    assert str(blocker) in str(caught.value)


def test_hf_export_rejects_unwritable_out(trained, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a regular file")
    with pytest.raises(UserError) as caught:
        merge(trained(*OFFLINE_ONLY), blocker / "out", fmt="hf")
    assert str(blocker) in str(caught.value)


# ---------------------------------------------------------------------------------------------
# Directory layout


def test_merged_files(merged):
    _, merged_dir = merged("quant.preset=W4A4")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert (merged_dir / name).is_file(), name
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["quantization_config"]["format"] == "mambaspin"


def test_merged_permissions(merged):
    _, merged_dir = merged("quant.preset=W4A4")
    assert stat.S_IMODE(merged_dir.stat().st_mode) == 0o755
    for path in merged_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name


def test_merge_leaves_no_staging(trained, tmp_path):
    out = tmp_path / "out"
    merge(trained("quant.preset=W4A4"), out)
    merge(trained("quant.preset=W4A4"), out, overwrite=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------------------------------------
# Command line


def run_cli(*args) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mambaspin.cli", *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_SECONDS)


def test_cli_merge_then_eval(trained, workspace, tmp_path):
    run, out, report = trained("quant.preset=W4A4"), tmp_path / "out", tmp_path / "merge.json"

    merged_process = run_cli("merge", "--run", run, "--out", out, "--json", report)
    assert merged_process.returncode == 0, merged_process.stderr
    assert json.loads(report.read_text())["out"] == str(out)

    evaluated = run_cli("eval", "--model", out, "--data", workspace["text_file"], "--block-size", BLOCK_SIZE)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "loss" in evaluated.stdout

    again = run_cli("merge", "--run", run, "--out", out)
    assert again.returncode == 2, again.stderr
    assert "Traceback" not in again.stderr
    error_lines = [line for line in again.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1, again.stderr
