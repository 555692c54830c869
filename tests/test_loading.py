"""Tests for mambaspin.loading: original mamba_ssm checkpoints, safe loading, saving and user errors."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import transformers
from safetensors.torch import save_file

from conftest import hf_logits, perturb_parameters, relative_error
from mambaspin.config import MambaConfig
from mambaspin.errors import UserError
from mambaspin.loading import load_model, resolve_model_dir, save_model
from mambaspin.model import MambaLM

LENGTH = 37
PARITY_TOLERANCE = 1e-5
# An original config.json stores the unpadded vocabulary, and the embedding has 256 rows.
ORIGINAL_VOCAB = 250
PADDED_VOCAB = 256


class Payload:
    """A picklable object whose unpickling creates a directory, standing in for malicious code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def random_ids(vocab: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, LENGTH), generator=generator)


def random_mamba_lm(config: MambaConfig, seed: int = 0) -> MambaLM:
    torch.manual_seed(seed)
    model = MambaLM(config)
    perturb_parameters(model, seed)
    return model.eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def original_config() -> dict:
    """Return an original mamba_ssm config.json dict. An empty ssm_cfg keeps d_state 16, expand 2, d_conv 4."""
    return {
        "d_model": 48,
        "n_layer": 2,
        "vocab_size": ORIGINAL_VOCAB,
        "ssm_cfg": {},
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": 8,
        "tie_embeddings": True,
    }


def original_state_dict(model: MambaLM) -> dict[str, torch.Tensor]:
    """Rename a MambaLM state dict to mamba_ssm's names (`backbone.embedding.weight`)."""
    return {
        name.replace("backbone.embeddings.", "backbone.embedding."): tensor.detach().clone()
        for name, tensor in model.state_dict().items()
    }


def write_original_checkpoint(directory: Path, state: dict, weights_format: str) -> Path:
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(original_config()))
    if weights_format == "bin":
        torch.save(state, directory / "pytorch_model.bin")
    else:
        # safetensors rejects shared tensors, and the tied lm_head is the embedding anyway.
        state = {name: tensor for name, tensor in state.items() if name != "lm_head.weight"}
        save_file(state, str(directory / "model.safetensors"))
    return directory


@pytest.fixture
def source_model() -> MambaLM:
    config = MambaConfig(vocab_size=PADDED_VOCAB, d_model=48, n_layer=2, tie_embeddings=True)
    return random_mamba_lm(config, seed=7)


@pytest.fixture
def network_attempts(monkeypatch) -> list:
    """Make name lookups and socket connections fail, and record each attempt in the returned list."""
    attempts = []

    def reject_connection(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", reject_connection)
    monkeypatch.setattr(socket, "create_connection", reject_connection)
    monkeypatch.setattr(socket.socket, "connect", reject_connection)
    return attempts


def test_original_config_pads_vocab(tmp_path, source_model):
    directory = write_original_checkpoint(tmp_path / "original", original_state_dict(source_model), "bin")

    model = load_model(directory)

    assert model.config.vocab_size == PADDED_VOCAB
    assert model.config.d_state == 16
    assert model.config.dt_rank == 3
    assert model.is_tied()


@pytest.mark.parametrize("weights_format", ["bin", "safetensors"])
def test_original_checkpoint_logits(tmp_path, source_model, weights_format):
    state = original_state_dict(source_model)
    directory = write_original_checkpoint(tmp_path / "original", state, weights_format)
    ids = random_ids(PADDED_VOCAB)

    model = load_model(directory)

    assert relative_error(logits(model, ids), logits(source_model, ids)) <= PARITY_TOLERANCE


def test_pickled_object_rejected(tmp_path, source_model):
    marker = tmp_path / "unpickled"
    state = original_state_dict(source_model)
    state["payload"] = Payload(marker)
    directory = write_original_checkpoint(tmp_path / "original", state, "bin")

    with pytest.raises(UserError, match="pytorch_model.bin"):
        load_model(directory)
    assert not marker.exists()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_saved_model_loads_in_transformers(tmp_path, tie):
    config = MambaConfig(vocab_size=101, d_model=48, n_layer=2, d_state=8, bias=True, tie_embeddings=tie)
    model = random_mamba_lm(config, seed=11)
    ids = random_ids(config.vocab_size)

    directory = save_model(model, tmp_path / "saved")
    reference = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()

    assert isinstance(reference, transformers.MambaForCausalLM)
    assert relative_error(hf_logits(reference, ids), logits(model, ids)) <= PARITY_TOLERANCE


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_saved_model_round_trip(tmp_path, tie):
    config = MambaConfig(vocab_size=101, d_model=48, n_layer=2, d_state=8, tie_embeddings=tie)
    model = random_mamba_lm(config, seed=12)
    ids = random_ids(config.vocab_size)

    loaded = load_model(save_model(model, tmp_path / "saved"))

    assert loaded.is_tied() == tie
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_save_replaces_existing_directory(tmp_path):
    model = random_mamba_lm(MambaConfig(vocab_size=101, d_model=48, n_layer=2, d_state=8))
    target = tmp_path / "saved"
    target.mkdir()
    (target / "stale.txt").write_text("left over from an earlier run")

    save_model(model, target)

    assert not (target / "stale.txt").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["saved"]


def test_missing_local_path(tmp_path):
    missing = tmp_path / "no-such-model"

    with pytest.raises(UserError, match="model directory not found") as error:
        resolve_model_dir(missing)
    assert str(missing) in str(error.value)


def test_file_instead_of_directory(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")

    with pytest.raises(UserError, match="is a file"):
        resolve_model_dir(weights)


def test_offline_hub_id(monkeypatch, tmp_path, network_attempts):
    # huggingface_hub reads HF_HUB_OFFLINE once, at import, so the module constant is patched too.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    with pytest.raises(UserError, match="could not be fetched from the hub") as error:
        resolve_model_dir("mambaspin-tests/no-such-model")
    assert "mambaspin-tests/no-such-model" in str(error.value)
    assert network_attempts == []


def test_gpt2_directory_rejected(tmp_path):
    directory = tmp_path / "gpt2"
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=101).save_pretrained(directory)

    with pytest.raises(UserError, match="model_type='gpt2'"):
        load_model(directory)


def test_missing_config_rejected(tmp_path):
    directory = tmp_path / "empty"
    directory.mkdir()

    with pytest.raises(UserError, match="config.json"):
        load_model(directory)


def test_mismatched_shapes_rejected(hf_model_dir):
    config_file = hf_model_dir / "config.json"
    config = json.loads(config_file.read_text())
    config["vocab_size"] = 320
    config_file.write_text(json.dumps(config))

    with pytest.raises(UserError, match=r"backbone.embeddings.weight has shape \(300, 48\)"):
        load_model(hf_model_dir)


def test_missing_weights_rejected(hf_model_dir):
    config_file = hf_model_dir / "config.json"
    config = json.loads(config_file.read_text())
    config["num_hidden_layers"] = 3
    config_file.write_text(json.dumps(config))

    with pytest.raises(UserError, match="do not match its config.json"):
        load_model(hf_model_dir)


def test_untied_without_lm_head_rejected(tmp_path, source_model):
    directory = write_original_checkpoint(tmp_path / "original", original_state_dict(source_model), "safetensors")
    config = original_config() | {"tie_embeddings": False}
    (directory / "config.json").write_text(json.dumps(config))

    with pytest.raises(UserError, match="lm_head.weight is missing"):
        load_model(directory)
