"""Tests for mambaspin.model: parity with transformers' MambaForCausalLM, tying and named points."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import DEFAULT_VOCAB, hf_logits, load_hf_model, relative_error
from mambaspin.loading import load_model
from mambaspin.model import MIXER_POINTS, MODEL_POINTS

# Not a multiple of the conv kernel, of 8 or of any block size used elsewhere.
LENGTH = 37
PARITY_TOLERANCE = 1e-5


class Scale(nn.Module):
    """Multiply the input by a constant."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class Recorder(nn.Module):
    """Pass the input through unchanged and record its shape on every call."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return x


class Rotate(nn.Module):
    """Multiply the last axis by a fixed matrix: x @ rotation."""

    def __init__(self, rotation: torch.Tensor):
        super().__init__()
        self.register_buffer("rotation", rotation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.rotation


def random_ids(vocab: int, batch: int = 2, length: int = LENGTH, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


@pytest.fixture
def tiny_model(hf_model_dir):
    return load_model(hf_model_dir)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_logits_match_transformers(model_factory, bias, tie):
    directory = model_factory(bias=bias, tie=tie, seed=3)
    ids = random_ids(DEFAULT_VOCAB)
    expected = hf_logits(load_hf_model(directory), ids)

    model = load_model(directory)
    with torch.no_grad():
        actual = model(ids)

    assert actual.shape == (2, LENGTH, DEFAULT_VOCAB)
    assert actual.dtype == torch.float32
    assert relative_error(actual, expected) <= PARITY_TOLERANCE


def test_tied_model_shares_lm_head(model_factory):
    model = load_model(model_factory(tie=True))

    assert model.is_tied()
    assert model.lm_head.weight.data_ptr() == model.backbone.embeddings.weight.data_ptr()


def test_untied_model_has_own_lm_head(model_factory):
    directory = model_factory(tie=False)
    model = load_model(directory)
    reference = load_hf_model(directory)

    assert not model.is_tied()
    assert model.lm_head.weight.data_ptr() != model.backbone.embeddings.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)
    assert not torch.equal(model.lm_head.weight, model.backbone.embeddings.weight)


@pytest.mark.parametrize("name", ["out_proj_input", "ssm_u", "ssm_C", "ssm_state", "ssm_y"])
def test_point_zero_scale_changes_logits(tiny_model, name):
    ids = random_ids(DEFAULT_VOCAB)
    with torch.no_grad():
        before = tiny_model(ids)
        tiny_model.set_point(name, 1, Scale(0.0))
        after = tiny_model(ids)

    assert (after - before).abs().max() > 1e-3


def test_model_point_zero_scale_zeroes_logits(tiny_model):
    tiny_model.set_point("lm_head_input", None, Scale(0.0))
    with torch.no_grad():
        logits = tiny_model(random_ids(DEFAULT_VOCAB))

    assert torch.count_nonzero(logits) == 0


def test_zero_embedding_ignores_ids(tiny_model):
    tiny_model.set_point("embedding_output", None, Scale(0.0))
    with torch.no_grad():
        first = tiny_model(random_ids(DEFAULT_VOCAB, seed=1))
        second = tiny_model(random_ids(DEFAULT_VOCAB, seed=2))

    assert torch.equal(first, second)


def test_identity_detaches_point(tiny_model):
    ids = random_ids(DEFAULT_VOCAB)
    with torch.no_grad():
        before = tiny_model(ids)
        tiny_model.set_point("x_proj_input", 0, Scale(0.0))
        tiny_model.set_point("x_proj_input", 0, nn.Identity())
        after = tiny_model(ids)

    assert torch.equal(after, before)


def test_every_point_is_called(tiny_model):
    config = tiny_model.config
    batch, length = 2, LENGTH
    expected_shapes = {
        "in_proj_input": (batch, length, config.d_model),
        "x_proj_input": (batch, length, config.d_inner),
        "dt_proj_input": (batch, length, config.dt_rank),
        "ssm_u": (batch, length, config.d_inner),
        "ssm_delta": (batch, length, config.d_inner),
        "ssm_B": (batch, length, config.d_state),
        "ssm_C": (batch, length, config.d_state),
        "ssm_state": (batch, length, config.d_inner, config.d_state),
        "ssm_y": (batch, length, config.d_inner),
        "out_proj_input": (batch, length, config.d_inner),
        "embedding_output": (batch, length, config.d_model),
        "lm_head_input": (batch, length, config.d_model),
    }
    # A new point needs its documented shape here.
    assert set(expected_shapes) == set(MIXER_POINTS + MODEL_POINTS)

    recorders = {}
    for name in MIXER_POINTS:
        for layer in range(config.n_layer):
            recorders[name, layer] = Recorder()
            tiny_model.set_point(name, layer, recorders[name, layer])
    for name in MODEL_POINTS:
        recorders[name, None] = Recorder()
        tiny_model.set_point(name, None, recorders[name, None])

    with torch.no_grad():
        tiny_model(random_ids(DEFAULT_VOCAB, batch, length))

    for (name, layer), recorder in recorders.items():
        assert recorder.shapes == [expected_shapes[name]], f"point {name} of layer {layer}"


def test_set_point_rejects_unknown_name(tiny_model):
    with pytest.raises(ValueError, match="unknown point 'ssm_z'"):
        tiny_model.set_point("ssm_z", 0, Scale(1.0))


@pytest.mark.parametrize("layer", [None, -1, 2, 100])
def test_set_point_rejects_bad_layer(tiny_model, layer):
    with pytest.raises(ValueError, match="needs a layer index from 0 to 1"):
        tiny_model.set_point("ssm_u", layer, Scale(1.0))


def test_identity_state_transform_keeps_logits(tiny_model):
    ids = random_ids(DEFAULT_VOCAB)
    with torch.no_grad():
        expected = tiny_model(ids)
        for layer in range(tiny_model.config.n_layer):
            tiny_model.set_point("ssm_state", layer, Scale(1.0))
        actual = tiny_model(ids)

    assert relative_error(actual, expected) <= PARITY_TOLERANCE


def test_orthogonal_state_transform_keeps_logits(tiny_model):
    # Rotating the states by Q along n and C by the same Q leaves h·C unchanged.
    n = tiny_model.config.d_state
    generator = torch.Generator().manual_seed(5)
    rotation, _ = torch.linalg.qr(torch.randn(n, n, generator=generator))
    ids = random_ids(DEFAULT_VOCAB)

    with torch.no_grad():
        expected = tiny_model(ids)
        for layer in range(tiny_model.config.n_layer):
            tiny_model.set_point("ssm_state", layer, Rotate(rotation))
            tiny_model.set_point("ssm_C", layer, Rotate(rotation))
        actual = tiny_model(ids)

    assert relative_error(actual, expected) <= PARITY_TOLERANCE
