"""QAT model pieces on a tiny random checkpoint: parity with the offline PTQ path, the float
teacher, the Cayley step of the Stiefel optimizer, the shipped merged weights and the trainables.

The checkpoint is a `MambaLM` with d_model 48 (d_inner 96, d_state 8, dt_rank 4, all sizes with
a Hadamard matrix), saved once per module with a byte-level BPE trained on Tiny Shakespeare.
"""

from __future__ import annotations

from pathlib import Path

import geoopt
import pytest
import torch

from conftest import perturb_parameters, relative_error
from lora.adapters import base_linear, lora_factors
from mambaspin.config import MambaConfig
from mambaspin.loading import load_model, save_model
from mambaspin.model import MambaLM
from mambaspin.qat import QATLinear
from mambaspin.quant import ActFakeQuantizer, ActQuantConfig, WeightQuantConfig, fake_quantize_weight
from mambaspin.quant_model import (LINEARS, QuantScheme, attach_act_quantizers, calibrate_act_quantizers,
                                   quantize_weights_rtn)
from mambaspin.tokenizer import train_byte_level_bpe
from rotations.fold import apply_rotations, rotate_dt_proj, rotate_in_proj, rotate_out_proj, rotate_x_proj
from rotations.klt import build_rotations
from train.config import load_run_config
from train.inputs import load_inputs, run_calibration
from train.loop import make_optimizers, qat_loss
from train.qat_model import (act_quantizers, build_qat_model, float_mode, make_act_scales_learnable, qat_linears,
                             trainable_groups)

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
SHIPPED_TEXT = Path(__file__).resolve().parent.parent / "shipped" / "tinyshakespeare.txt"
TEXT_CHARS = 60_000
VOCAB = 280
DT_RANK = 4
D_STATE = 8

# Both paths apply the same rotations and round-to-nearest quantizers. The QAT model rotates in
# float32 at every forward and the offline path folds in float64, so a few activation values on a
# rounding boundary land on the neighbouring code. The error of such a token (about 1e-3) decays
# over the next tokens of its sequence, while most tokens stay within float32 rounding. Parity is
# therefore judged by the median over tokens of the per-token relative error. Leaving out the
# rotations or the quantizers moves that median above 1e-3 (W8A8 on this checkpoint).
PARITY_TOLERANCE = 1e-5
# The float teacher has no quantizer, so every logit must match, not only most tokens.
FLOAT_TOLERANCE = 1e-5
CAYLEY_TOLERANCE = 1e-10
ORTHOGONALITY_TOLERANCE = 1e-12


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """A saved tiny checkpoint with its tokenizer, and the training text file."""
    root = tmp_path_factory.mktemp("qat")
    text = SHIPPED_TEXT.read_text(encoding="utf-8")[:TEXT_CHARS]
    text_file = root / "text.txt"
    text_file.write_text(text, encoding="utf-8")
    tokenizer = train_byte_level_bpe(text, VOCAB)
    assert tokenizer.vocab_size <= VOCAB

    torch.manual_seed(0)
    model = MambaLM(MambaConfig(vocab_size=VOCAB, d_model=48, n_layer=2, d_state=D_STATE, dt_rank=DT_RANK))
    perturb_parameters(model, seed=0)
    model_dir = save_model(model, root / "model", tokenizer)
    return {"root": root, "model_dir": model_dir, "text_file": text_file}


def make_config(workspace, *overrides):
    """The default run config shrunk to the tiny checkpoint, with `overrides` applied last."""
    root = workspace["root"]
    return load_run_config(DEFAULT_CONFIG, [
        f"model.path={workspace['model_dir']}",
        f"data.text={workspace['text_file']}",
        "model.device=cpu",
        "data.block_size=32",
        "data.max_eval_tokens=300",
        "calibration.n_blocks=8",
        "train.batch_size=2",
        "lora.rank=2",
        f"output_dir={root}/run",
        "log_every=1",
        "eval_every=0",
        *overrides,
    ])


def prepare(config, scheme: QuantScheme | None = None):
    """Load the inputs, calibrate, build the rotations and turn the model into the QAT model.

    Returns (inputs, rotations) with inputs.model now the QAT model.
    """
    inputs = load_inputs(config)
    calibration = run_calibration(config, inputs, config.rotation.needs_statistics(), progress=False)
    rotations = build_rotations(config.rotation, inputs.model, calibration)
    scheme = config.quant.scheme() if scheme is None else scheme
    build_qat_model(inputs.model, rotations, config.rotation, scheme, config.lora.settings())
    return inputs, rotations


def sample_ids(inputs) -> torch.Tensor:
    """Return eight training blocks without their last token, (8, 32)."""
    return inputs.train_blocks[:8, :-1]


def median_token_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Return the median over tokens of ||actual_t - expected_t|| / ||expected_t|| for logits (b, l, v)."""
    errors = torch.linalg.vector_norm(actual - expected, dim=-1) / torch.linalg.vector_norm(expected, dim=-1)
    return float(errors.median())


def randomize_lora_b(model, seed: int) -> None:
    """Set every LoRA B factor (zero after injection) to seeded Gaussian values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))


def perturb_rotations(model, seed: int, lr: float = 0.05) -> None:
    """Move every rotation off its init by one Riemannian SGD step along a random gradient."""
    generator = torch.Generator().manual_seed(seed)
    matrices = list(model.rotations.matrices.values())
    for matrix in matrices:
        matrix.grad = torch.randn(matrix.shape, generator=generator)
    optimizer = geoopt.optim.RiemannianSGD(matrices, lr=lr, momentum=0.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------
# Parity with the offline path


@pytest.mark.parametrize("preset", ["W8A8", "W4A16", None])
def test_qat_init_matches_offline(workspace, preset):
    config = make_config(workspace, f"quant.preset={preset or 'null'}")
    scheme = config.quant.scheme()
    inputs, rotations = prepare(config)
    ids = sample_ids(inputs)

    offline = load_model(workspace["model_dir"])
    apply_rotations(offline, rotations)
    quantize_weights_rtn(offline, scheme)
    attach_act_quantizers(offline, scheme)

    with torch.no_grad():
        qat_logits = inputs.model(ids)
        offline_logits = offline(ids)
        float_logits = load_model(workspace["model_dir"])(ids)

    assert median_token_error(qat_logits, offline_logits) < PARITY_TOLERANCE
    if preset is not None:
        assert median_token_error(qat_logits, float_logits) > 100 * PARITY_TOLERANCE


def test_qat_init_differs_without_rotations(workspace):
    """Guards the parity test: the same quantizers without the rotations do not match."""
    config = make_config(workspace, "quant.preset=W8A8")
    scheme = config.quant.scheme()
    inputs, _ = prepare(config)
    ids = sample_ids(inputs)

    unrotated = load_model(workspace["model_dir"])
    quantize_weights_rtn(unrotated, scheme)
    attach_act_quantizers(unrotated, scheme)

    with torch.no_grad():
        error = median_token_error(inputs.model(ids), unrotated(ids))
    assert error > 100 * PARITY_TOLERANCE


# ---------------------------------------------------------------------------------------------
# Float teacher


def test_float_mode_returns_float_model(workspace):
    config = make_config(workspace, "quant.preset=W8A8")
    inputs, _ = prepare(config)
    model = inputs.model
    ids = sample_ids(inputs)
    randomize_lora_b(model, seed=1)
    perturb_rotations(model, seed=2)

    with torch.no_grad():
        expected = load_model(workspace["model_dir"])(ids)
        with float_mode(model):
            teacher = model(ids)
        student = model(ids)

    assert relative_error(teacher, expected) < FLOAT_TOLERANCE
    assert relative_error(student, expected) > 100 * FLOAT_TOLERANCE


def test_float_mode_restores_flags(workspace):
    config = make_config(workspace, "quant.preset=W8A8")
    inputs, _ = prepare(config)
    model = inputs.model
    linears, quantizers = qat_linears(model), act_quantizers(model)
    # One part off before entering: the exit must restore it off, not switch it on.
    linears[0].use_quant = False
    quantizers[0].enabled = False
    before = ([(m.use_lora, m.use_transform, m.use_quant) for m in linears], [q.enabled for q in quantizers])

    with float_mode(model):
        assert model.rotations.enabled is False
        assert not any(m.use_lora or m.use_quant for m in linears)
        assert not any(q.enabled for q in quantizers)

    after = ([(m.use_lora, m.use_transform, m.use_quant) for m in linears], [q.enabled for q in quantizers])
    assert model.rotations.enabled is True
    assert after[0] == before[0]
    assert after[1] == before[1]


def test_float_mode_nested_keeps_rotations_off(workspace):
    config = make_config(workspace, "quant.preset=W8A8")
    inputs, _ = prepare(config)
    model = inputs.model
    with float_mode(model):
        with float_mode(model):
            pass
        assert model.rotations.enabled is False


# ---------------------------------------------------------------------------------------------
# Cayley step


@pytest.mark.parametrize("size", [12, 16])
def test_cayley_step_matches_formula(size):
    generator = torch.Generator().manual_seed(size)
    x, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    gradient = torch.randn(size, size, generator=generator, dtype=torch.float64)
    lr = 0.1

    point = geoopt.ManifoldParameter(x.clone(), manifold=geoopt.Stiefel(canonical=True))
    point.grad = gradient.clone()
    geoopt.optim.RiemannianSGD([point], lr=lr, momentum=0.0).step()

    # Cayley retraction for the canonical metric. geoopt 0.5.1 (CanonicalStiefel.retr) solves
    # the linear system, so the explicit inverse here is an independent computation.
    u = -lr * (gradient - x @ gradient.T @ x)
    a = u @ x.T - x @ u.T
    eye = torch.eye(size, dtype=torch.float64)
    expected = torch.linalg.inv(eye - a / 2) @ (eye + a / 2) @ x

    result = point.detach()
    assert float((result - expected).abs().max()) < CAYLEY_TOLERANCE
    assert float((result.T @ result - eye).abs().max()) < ORTHOGONALITY_TOLERANCE
    assert float((result - x).abs().max()) > 1e-3


# ---------------------------------------------------------------------------------------------
# Shipped weights


def expected_weight(model, kind: str, layer: int | None, linear: QATLinear):
    """Compute rotate(W + s·B·A) with the `rotations.fold` functions from the base weight and factors."""
    base = base_linear(linear.inner)
    weight, bias = base.weight.float(), base.bias
    factors = lora_factors(linear.inner)
    if factors is not None:
        a, b, scaling = factors
        weight = weight + scaling * (b.float() @ a.float())
    rotations = model.rotations
    get = lambda site: rotations.get(site, layer)  # noqa: E731
    smooth = None if layer is None else rotations.smooth(layer)
    if kind == "in_proj":
        return rotate_in_proj(weight, bias, get("R1"), None, smooth)
    if kind == "x_proj":
        return rotate_x_proj(weight, DT_RANK, D_STATE, get("R6"), get("R5"), get("R4")), bias
    if kind == "dt_proj":
        return rotate_dt_proj(weight, get("R5")), bias
    if kind == "out_proj":
        return rotate_out_proj(weight, bias, get("R1"), get("R2"), smooth)
    return weight @ get("R1"), bias


def test_quantized_weight_is_rotated_merge(workspace):
    config = make_config(workspace, "quant.preset=W4A16", "rotation.smooth.apply=true")
    scheme = config.quant.scheme()
    inputs, _ = prepare(config)
    model = inputs.model
    randomize_lora_b(model, seed=3)
    perturb_rotations(model, seed=4)

    cases = [(name, layer, getattr(mixer, name)) for layer, mixer in enumerate(model.mixers) for name in LINEARS]
    cases.append(("lm_head", None, model.lm_head))
    assert len(cases) == len(qat_linears(model))

    with torch.no_grad():
        for kind, layer, linear in cases:
            weight, bias = expected_weight(model, kind, layer, linear)
            if kind != "lm_head":
                weight = fake_quantize_weight(weight, scheme.weight)
            shipped_weight, shipped_bias = linear.quantized_weight()
            assert torch.equal(shipped_weight, weight), f"{kind} of layer {layer}"
            assert (shipped_bias is None) == (bias is None), f"{kind} of layer {layer}"
            if bias is not None:
                assert torch.equal(shipped_bias, bias), f"{kind} of layer {layer}"


# ---------------------------------------------------------------------------------------------
# Trainable parameters


def learnable_clip_scheme() -> QuantScheme:
    return QuantScheme(WeightQuantConfig(bits=4, learnable_clip=True),
                       ActQuantConfig(bits=4, granularity="per_tensor", dynamic=False))


def prepare_trainable(workspace, dtype: str = "float32"):
    """A QAT model with learnable weight clips, learnable static activation scales and R2 frozen."""
    config = make_config(workspace, "rotation.sites.R2.train=false", f"model.dtype={dtype}")
    inputs, _ = prepare(config, learnable_clip_scheme())
    calibrate_act_quantizers(inputs.model, act_quantizers(inputs.model), inputs.calibration_blocks, progress=False)
    make_act_scales_learnable(inputs.model)
    return config, inputs


def test_trainables_are_expected_set(workspace):
    _, inputs = prepare_trainable(workspace)
    model = inputs.model
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    act_scales = {f"{name}.scale" for name, module in model.named_modules() if isinstance(module, ActFakeQuantizer)}

    lora = {name for name in trainable if ".lora_A." in name or ".lora_B." in name}
    clips = {name for name in trainable if name.endswith("quantizer.clip")}
    scales = trainable & act_scales
    rotations = {name for name in trainable if name.startswith("rotations.")}
    expected_rotations = {f"rotations.matrices.{name}" for name in model.rotations.matrices if not name.endswith("R2")}

    assert len(lora) == 2 * 2 * len(LINEARS)
    assert len(clips) == 2 * len(LINEARS)
    assert scales == act_scales
    assert rotations == expected_rotations
    assert trainable == lora | clips | scales | rotations


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_rotations_are_float32_stiefel(workspace, dtype):
    _, inputs = prepare_trainable(workspace, dtype)
    matrices = inputs.model.rotations.matrices
    assert set(matrices) == {"R1"} | {f"layers_{layer}_{site}" for layer in (0, 1) for site in ("R2", "R5", "R6")}
    for name, matrix in matrices.items():
        assert isinstance(matrix, geoopt.ManifoldParameter), name
        assert isinstance(matrix.manifold, geoopt.CanonicalStiefel), name
        assert matrix.dtype == torch.float32, name


def test_untrained_site_stays_frozen(workspace):
    config, inputs = prepare_trainable(workspace)
    model = inputs.model
    rotation_group, euclidean_group = trainable_groups(model)
    matrices = model.rotations.matrices
    before = {name: matrix.detach().clone() for name, matrix in matrices.items()}

    assert all(matrix is not matrices["layers_0_R2"] for matrix in rotation_group)
    assert all(not isinstance(parameter, geoopt.ManifoldParameter) for parameter in euclidean_group)

    rotation_opt, euclidean_opt, _ = make_optimizers(config, model)
    loss, _ = qat_loss(model, inputs.train_blocks[:2], distill_weight=0.5, temperature=1.0)
    loss.backward()
    rotation_opt.step()
    euclidean_opt.step()

    for layer in (0, 1):
        assert torch.equal(matrices[f"layers_{layer}_R2"], before[f"layers_{layer}_R2"])
        assert not torch.equal(matrices[f"layers_{layer}_R6"], before[f"layers_{layer}_R6"])
