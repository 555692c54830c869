"""Cost of one QAT step against one plain LoRA step on the same model, measured in one run."""

from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn.functional as F

from lora.adapters import add_lora
from rotations.klt import build_rotations

from .config import RunConfig
from .inputs import load_inputs, load_or_run_calibration
from .loop import make_optimizers, qat_loss
from .qat_model import act_quantizers, build_qat_model, make_act_scales_learnable
from mambaspin.quant_model import calibrate_act_quantizers


def median_step_seconds(step, repeats: int) -> float:
    """Median wall seconds of `repeats` calls of `step`, after one untimed warm-up call."""
    step()  # warm-up: allocator and autograd caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _plain_lora_step(model, batch, optimizer):
    def step():
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _qat_step(config, model, batch, distill_weight):
    rotation_opt, euclidean_opt, _ = make_optimizers(config, model)

    def step():
        loss, _ = qat_loss(model, batch, distill_weight, config.train.distill_temperature)
        loss.backward()
        for optimizer in (rotation_opt, euclidean_opt):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return step


def qat_step_benchmark(config: RunConfig, repeats: int = 5) -> dict:
    """Median seconds of a plain LoRA step and of QAT steps (CE only, and CE + distillation)."""
    inputs = load_inputs(config)
    batch = inputs.train_blocks[: config.train.batch_size]
    float_model = copy.deepcopy(inputs.model)

    plain = add_lora(copy.deepcopy(float_model), config.lora.settings())
    plain_params = [p for p in plain.parameters() if p.requires_grad]
    plain_seconds = median_step_seconds(_plain_lora_step(plain, batch, torch.optim.AdamW(plain_params, lr=1e-4)), repeats)

    calibration = load_or_run_calibration(config, inputs, config.rotation.needs_statistics(), progress=False)
    rotations = build_rotations(config.rotation, inputs.model, calibration)
    build_qat_model(inputs.model, rotations, config.rotation, config.quant.scheme(), config.lora.settings())
    calibrate_act_quantizers(inputs.model, act_quantizers(inputs.model), inputs.calibration_blocks[:4], progress=False)
    make_act_scales_learnable(inputs.model)
    qat_ce = median_step_seconds(_qat_step(config, inputs.model, batch, 0.0), repeats)
    qat_distill = median_step_seconds(_qat_step(config, inputs.model, batch, 1.0), repeats)
    return {
        "tokens_per_step": int(batch[:, :-1].numel()),
        "plain_lora_seconds": plain_seconds,
        "qat_seconds": qat_ce,
        "qat_distill_seconds": qat_distill,
        "qat_over_plain": qat_ce / plain_seconds,
        "qat_distill_over_plain": qat_distill / plain_seconds,
    }
