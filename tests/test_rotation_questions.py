"""The questions users ask about Mamba rotations, answered by measurement on a random model.

1. Rotating in_proj's input and out_proj's output by R1 without rotating the embedding and
   lm_head (and without folding the norm weights) changes the function: R1 is a change of basis
   of the whole residual stream, so everything that writes or reads it must follow.
2. R1 and R5 are independent: R5 acts on the dt path inside the mixer, which never touches the
   residual stream, so the two fold in either order to the same weights.
3. Every site can be used alone (covered for all 64 subsets in test_rotations.py).
"""

import copy

import torch

from mambaspin.config import MambaConfig
from mambaspin.model import MambaLM
from rotations.config import RotationConfig
from rotations.fold import apply_rotations, rotate_in_proj, rotate_out_proj
from rotations.hadamard import random_orthogonal
from rotations.klt import RotationSet, build_rotations


def make_model(seed: int = 0) -> MambaLM:
    torch.manual_seed(seed)
    model = MambaLM(MambaConfig(vocab_size=101, d_model=48, n_layer=2, d_state=8, dt_rank=4, bias=True))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    return model.eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
def test_r1_on_projections_alone_breaks_function():
    model = make_model()
    ids = torch.randint(0, 101, (2, 29))
    reference = model(ids)
    r1 = random_orthogonal(48, seed=1)
    for mixer in model.mixers:
        w_in, _ = rotate_in_proj(mixer.in_proj.weight.double(), None, r1)
        w_out, b_out = rotate_out_proj(mixer.out_proj.weight.double(), mixer.out_proj.bias.double(), r1)
        mixer.in_proj.weight.copy_(w_in.float())
        mixer.out_proj.weight.copy_(w_out.float())
        mixer.out_proj.bias.copy_(b_out.float())
    assert relative_error(model(ids), reference) > 1e-2


@torch.no_grad()
def test_r1_with_embedding_and_head_keeps_function():
    model = make_model()
    ids = torch.randint(0, 101, (2, 29))
    reference = model(ids)
    rotations = RotationSet({"R1": random_orthogonal(48, seed=1)}, [{} for _ in range(2)])
    apply_rotations(model, rotations)
    assert relative_error(model(ids), reference) < 1e-4


@torch.no_grad()
def test_r1_and_r5_commute():
    model = make_model()
    config = RotationConfig().with_sites(("R1", "R5"), "random")
    rotations = build_rotations(config, model)
    only_r1 = RotationSet({"R1": rotations.global_matrices["R1"]}, [{} for _ in range(2)])
    only_r5 = RotationSet({}, [{"R5": m["R5"]} for m in rotations.layer_matrices])

    first_r1 = copy.deepcopy(model)
    apply_rotations(first_r1, only_r1)
    apply_rotations(first_r1, only_r5)
    first_r5 = copy.deepcopy(model)
    apply_rotations(first_r5, only_r5)
    apply_rotations(first_r5, only_r1)
    for (name, a), (_, b) in zip(first_r1.state_dict().items(), first_r5.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name
