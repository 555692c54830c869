"""Rotations stay orthogonal over a long run: 1000 Riemannian SGD steps, as the training loop takes them."""

import geoopt
import torch

from rotations.klt import orthogonality_error
from rotations.hadamard import random_orthogonal


def test_thousand_cayley_steps_stay_orthogonal():
    # Sizes of the shipped model's R1 (d_model 192) and dt path (dt_rank 12); float32 as in training,
    # with the loop's default optimizer settings (lr 0.05, momentum 0.9, projection every 10 steps).
    generator = torch.Generator().manual_seed(0)
    parameters = [geoopt.ManifoldParameter(random_orthogonal(size, seed=size).float(),
                                           manifold=geoopt.Stiefel(canonical=True)) for size in (192, 12)]
    optimizer = geoopt.optim.RiemannianSGD(parameters, lr=0.05, momentum=0.9, stabilize=10)
    for _ in range(1000):
        for parameter in parameters:
            parameter.grad = torch.randn(parameter.shape, generator=generator) * 0.1
        optimizer.step()
    for parameter in parameters:
        assert orthogonality_error(parameter.detach().double()) < 1e-5
