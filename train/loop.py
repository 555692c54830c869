"""Recipe `mambaspin train` / `accelerate launch -m train`: QAT of rotations and LoRA.

Orchestration only: the model pieces come from `train.qat_model`, the math from the library.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import pickle
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import geoopt
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from safetensors import SafetensorError
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from mambaspin.errors import NotSupportedError, UserError
from mambaspin.evaluate import evaluate_text
from mambaspin.io import check_output_path, write_json_atomic
from lora.adapters import check_targets
from mambaspin.quant_model import LINEARS, calibrate_act_quantizers
from rotations.calibration import model_fingerprint
from rotations.config import SITES
from rotations.klt import build_rotations, check_site_sizes

from .ablate import ptq_loss
from .checkpoints import checkpoint_root, complete_checkpoints, read_metadata, resolve_checkpoint, save_checkpoint
from .config import RunConfig
from .inputs import load_inputs, load_or_run_calibration
from .qat_model import (act_quantizers, build_qat_model, check_finite, float_mode, make_act_scales_learnable,
                        trainable_groups)

logger = logging.getLogger(__name__)


ORTHOGONALITY_LIMIT = 1e-3
"""Largest max |RᵀR − I| a checkpoint may be saved with; more means the optimizer diverged."""


@dataclass
class TrainState:
    """Everything of the loop that accelerate's save_state does not already hold."""

    step: int = 0
    tokens: int = 0
    last_loss: float = float("nan")

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class StepSampler(Sampler):
    """Indices of `n_steps` batches of `batch_size` blocks: a new seeded permutation each epoch.

    The order depends only on (seed, n_blocks), so step k sees the same batch in every run.
    """

    def __init__(self, n_blocks: int, batch_size: int, n_steps: int, seed: int):
        self.n_blocks, self.batch_size, self.n_steps, self.seed = n_blocks, batch_size, n_steps, seed

    def __len__(self) -> int:
        return self.n_steps * self.batch_size

    def __iter__(self):
        produced, epoch = 0, 0
        while produced < len(self):
            generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            for index in torch.randperm(self.n_blocks, generator=generator).tolist():
                if produced == len(self):
                    return
                yield index
                produced += 1
            epoch += 1


def warmup_cosine(warmup: int, total: int):
    """Learning-rate factor: linear warmup, then cosine decay to 0 at `total` steps."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return factor


def qat_loss(model, batch: torch.Tensor, distill_weight: float, temperature: float) -> tuple[torch.Tensor, dict]:
    """(1 - w)·CE + w·T²·KL(teacher ‖ student) with the float model as teacher (Hinton et al., 2015)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(inputs).float()  # (b, l, v)
    cross_entropy = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    parts = {"ce": cross_entropy.item()}
    if distill_weight == 0.0:
        return cross_entropy, parts
    with torch.no_grad(), float_mode(model):
        teacher = model(inputs).float()  # (b, l, v)
    kl = F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(teacher / temperature, -1),
                  log_target=True, reduction="batchmean") * temperature**2 / inputs.shape[1]
    parts["kl"] = kl.item()
    return (1 - distill_weight) * cross_entropy + distill_weight * kl, parts


def identity_parts(config: RunConfig, model_fingerprint: str) -> dict[str, str]:
    """Hash of each thing a checkpoint cannot change on resume: model weights, rotation, quant, LoRA, block size."""
    fixed = {"model weights": model_fingerprint, "rotation": dataclasses.asdict(config.rotation),
             "quant": dataclasses.asdict(config.quant), "lora": dataclasses.asdict(config.lora),
             "data.block_size": config.data.block_size}
    return {name: hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
            for name, value in fixed.items()}


def _digest(parts: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def identity_fingerprint(config: RunConfig, model_fingerprint: str) -> str:
    """Hash `identity_parts` into one hex digest."""
    return _digest(identity_parts(config, model_fingerprint))


def identity_mismatch(metadata: dict, config: RunConfig, model_fingerprint: str) -> str | None:
    """Return None when a checkpoint's identity matches, else what differs, e.g. 'model weights, quant'."""
    current = identity_parts(config, model_fingerprint)
    if metadata.get("identity") == _digest(current):
        return None
    saved = metadata.get("identity_parts")
    if not saved:
        return "model weights, rotation, quant, LoRA or block size (the checkpoint predates per-part identities)"
    return ", ".join(name for name in current if saved.get(name) != current[name]) or "unknown parts"


def make_optimizers(config: RunConfig, model):
    """Riemannian optimizer for the rotations and AdamW for LoRA, clips and activation scales."""
    rotations, euclidean = trainable_groups(model)
    cfg = config.train
    if cfg.rotation_optimizer == "sgd":
        rotation_opt = geoopt.optim.RiemannianSGD(rotations or [torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr_rotation,
                                                  momentum=cfg.momentum, stabilize=cfg.stabilize)
    else:
        rotation_opt = geoopt.optim.RiemannianAdam(rotations or [torch.nn.Parameter(torch.zeros(1))],
                                                   lr=cfg.lr_rotation, stabilize=cfg.stabilize)
    euclidean_opt = torch.optim.AdamW(euclidean or [torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr_lora, weight_decay=0.0)
    schedule = warmup_cosine(cfg.warmup_steps, max(1, config.max_steps))
    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, schedule) for opt in (rotation_opt, euclidean_opt)]
    return rotation_opt, euclidean_opt, schedulers


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _validation_loss(config: RunConfig, model, inputs) -> float:
    result = evaluate_text(model, inputs.tokenizer, inputs.validation_text, config.data.block_size, progress=False)
    return result.loss_per_token


def _prepare_model(config: RunConfig, accelerator, inputs) -> dict:
    """Calibrate, record the float and RTN baselines, and turn inputs.model into the QAT model."""
    sites = config.rotation.needs_statistics()
    if accelerator.is_main_process:
        calibration = load_or_run_calibration(config, inputs, sites)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        calibration = load_or_run_calibration(config, inputs, sites, progress=False)
    baselines = {"model_fingerprint": model_fingerprint(inputs.model)}
    scheme = config.quant.scheme()
    baselines["float"] = _validation_loss(config, inputs.model, inputs)
    baselines["rtn"] = ptq_loss(config, inputs, None, scheme, (), "none")

    rotations = build_rotations(config.rotation, inputs.model, calibration)
    build_qat_model(inputs.model, rotations, config.rotation, scheme, config.lora.settings())
    calibrate_act_quantizers(inputs.model, act_quantizers(inputs.model), inputs.calibration_blocks[:16], progress=False)
    if config.train.learnable_act_scales:
        make_act_scales_learnable(inputs.model)
    baselines["klt_ptq"] = _validation_loss(config, inputs.model, inputs)
    logger.info("validation loss before training: float %.4f, round-to-nearest %.4f, rotations at init %.4f",
                baselines["float"], baselines["rtn"], baselines["klt_ptq"])
    return baselines


def _check_resume(path: Path, config: RunConfig, model_fingerprint: str) -> None:
    differs = identity_mismatch(read_metadata(path), config, model_fingerprint)
    if differs:
        raise UserError(f"checkpoint {path} was made with other {differs} settings than this config; resume with the "
                        "config of that run, or start a new output_dir")


def _log_metrics(accelerator, model, state, optimizers, grad_norm, parts, started, device) -> dict:
    metrics = {"loss": state.last_loss, **parts, "grad_norm": float(grad_norm),
               "lr_rotation": optimizers[0].param_groups[0]["lr"], "lr_lora": optimizers[1].param_groups[0]["lr"],
               "orthogonality_error": accelerator.unwrap_model(model).rotations.max_orthogonality_error(),
               "tokens_per_second": state.tokens / max(1e-9, time.time() - started), "peak_memory_mb": peak_memory_mb(device)}
    accelerator.log(metrics, step=state.step)
    logger.info("step %d: %s", state.step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return {"step": state.step, **metrics}


def _make_accelerator(config: RunConfig) -> Accelerator:
    device = config.model.torch_device()
    trackers = None
    try:
        import tensorboard  # noqa: F401

        trackers = "tensorboard"
    except ImportError:
        logger.info("tensorboard is not installed; metrics go to the log only")
    accelerator = Accelerator(gradient_accumulation_steps=config.train.grad_accum, cpu=device.type == "cpu",
                              mixed_precision="bf16" if device.type == "cuda" else "no",
                              log_with=trackers, project_dir=config.output_dir)
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise NotSupportedError(
            f"training under {accelerator.distributed_type.value}: it shards parameters, and the Riemannian step needs "
            "each rotation matrix whole. Use plain data parallelism (accelerate launch --multi_gpu, or torchrun / "
            "--cpu with several processes), which is tested")
    if trackers:
        accelerator.init_trackers("mambaspin")
    return accelerator


def _load_checkpoint(accelerator, path: Path) -> None:
    """Load accelerate state from `path`, raising UserError when a file is truncated, missing or foreign."""
    try:
        accelerator.load_state(str(path))
    except (OSError, EOFError, KeyError, ValueError, RuntimeError, pickle.UnpicklingError, SafetensorError) as error:
        detail = " ".join(str(error).split())[:300]
        raise UserError(f"checkpoint {path} could not be loaded ({type(error).__name__}: {detail}). It may be truncated "
                        "or written by another program; resume from an earlier checkpoint with "
                        "--resume_from_checkpoint step_N, or start a new output_dir") from error


def _make_output_dir(path: str) -> None:
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"output_dir {path} cannot be created ({error.strerror}: {error.filename}); "
                        "set output_dir to a writable directory") from error
    if not os.access(path, os.W_OK):
        raise UserError(f"output_dir {path} is not writable; set output_dir to a writable directory")


def check_run_fits_model(config: RunConfig, model) -> None:
    """Raise UserError, before any calibration, when the rotation inits or LoRA ranks cannot be built for `model`."""
    check_site_sizes(config.rotation, model.config)
    check_targets(model, config.lora.settings())
    scheme = config.quant.scheme()
    if scheme.weight is not None:
        mixer = model.backbone.layers[0].mixer
        layers = {f"backbone.layers.0.mixer.{name}": tuple(getattr(mixer, name).weight.shape) for name in LINEARS}
        if scheme.lm_head:
            layers["lm_head"] = tuple(model.lm_head.weight.shape)
        scheme.weight.check_shapes(layers)


def _check_fresh_output_dir(config: RunConfig) -> None:
    """Reject a new run over an earlier run's checkpoints.

    Checkpoint retention keeps the highest steps, so a new run there would lose its own early
    checkpoints to the old run's later ones, and `latest` would point at the old run.
    """
    found = complete_checkpoints(config.output_dir)
    if found:
        raise UserError(f"output_dir {config.output_dir} already contains checkpoints of an earlier run "
                        f"({found[0].name} to {found[-1].name}). Resume it with --resume_from_checkpoint latest, set output_dir to a new "
                        f"directory, or delete {checkpoint_root(config.output_dir)} to start over there")


def _check_resume_step(config: RunConfig, path: Path, step: int) -> None:
    if step >= config.max_steps:
        where = "past" if step > config.max_steps else "already at"
        raise UserError(f"checkpoint {path} is at step {step}, {where} max_steps={config.max_steps}. Raise max_steps to "
                        f"continue training, or merge that checkpoint with `mambaspin merge --checkpoint {path.name}`")


def train(config: RunConfig, resume_from: str | None = None, progress: bool = True) -> dict:
    """Run QAT with `config`, writing checkpoints and RUN/results.json. Returns the results."""
    started = time.time()
    if resume_from:
        path = resolve_checkpoint(config.output_dir, resume_from)
        _check_resume_step(config, path, int(read_metadata(path).get("state", {}).get("step", 0)))
    else:
        _check_fresh_output_dir(config)
    _make_output_dir(config.output_dir)
    check_output_path(config.calibration_dir, "calibration.dir", directory=True)
    accelerator = _make_accelerator(config)
    set_seed(config.seed)
    inputs = load_inputs(config)
    check_run_fits_model(config, inputs.model)
    if resume_from:  # before calibrating: a mismatch must not cost the user a calibration
        _check_resume(path, config, model_fingerprint(inputs.model))
    baselines = _prepare_model(config, accelerator, inputs)
    fingerprint = identity_fingerprint(config, baselines["model_fingerprint"])
    model = inputs.model

    rotation_opt, euclidean_opt, schedulers = make_optimizers(config, model)
    n_batches = config.max_steps * config.train.grad_accum * accelerator.num_processes
    sampler = StepSampler(inputs.train_blocks.shape[0], config.train.batch_size, n_batches, config.seed)
    loader = DataLoader(inputs.train_blocks, batch_size=config.train.batch_size, sampler=sampler)
    model, rotation_opt, euclidean_opt, loader, *schedulers = accelerator.prepare(
        model, rotation_opt, euclidean_opt, loader, *schedulers)
    state = TrainState()
    if resume_from:
        _load_checkpoint(accelerator, path)
        state.load_state_dict(read_metadata(path)["state"])
        loader = accelerator.skip_first_batches(loader, state.step * config.train.grad_accum)
        logger.info("resumed from %s at step %d", path, state.step)

    metadata = {"identity": fingerprint, "identity_parts": identity_parts(config, baselines["model_fingerprint"]),
                "config": config.to_dict()}
    history = _run_steps(config, accelerator, model, (rotation_opt, euclidean_opt), schedulers, loader, state,
                         inputs, metadata, progress)
    if config.save_every == 0 or state.step % config.save_every:
        _save(config, accelerator, model, state, metadata)
    results = {**baselines, "model": config.model.path, "preset": config.quant.preset,
               "max_eval_tokens": config.data.max_eval_tokens,
               "sites": list(config.rotation.applied),
               "trained": _validation_loss(config, accelerator.unwrap_model(model), inputs),
               "minutes": (time.time() - started) / 60,
               "steps": state.step, "tokens": state.tokens, "history": history,
               "orthogonality_error": accelerator.unwrap_model(model).rotations.max_orthogonality_error()}
    if accelerator.is_main_process:
        write_json_atomic(Path(config.output_dir) / "results.json", results)
    # Debugging aid: with MAMBASPIN_DUMP_TRAINABLES=DIR set, every process writes its trainable
    # parameters to DIR/rank_{process_index}.safetensors, so that replicas can be compared.
    if os.environ.get("MAMBASPIN_DUMP_TRAINABLES"):
        _dump_trainables(accelerator, model, Path(os.environ["MAMBASPIN_DUMP_TRAINABLES"]))
    accelerator.end_training()
    return results


def _run_steps(config, accelerator, model, optimizers, schedulers, loader, state, inputs, metadata, progress) -> list:
    """The optimization loop from state.step to config.max_steps; returns logged metrics."""
    history, started, device = [], time.time(), accelerator.device
    bar = tqdm(total=config.max_steps, initial=state.step, desc="train",
               disable=not (progress and accelerator.is_local_main_process))
    trainable = [p for p in model.parameters() if p.requires_grad]
    batches = iter(loader)
    while state.step < config.max_steps:
        for _ in range(config.train.grad_accum):
            batch = next(batches)
            with accelerator.accumulate(model):
                loss, parts = qat_loss(model, batch, config.train.distill_weight, config.train.distill_temperature)
                # Averaged over processes, so the log shows the global batch's loss, and a NaN on one
                # process stops all of them instead of leaving the others waiting in backward's all-reduce.
                mean_loss, parts = _mean_over_processes(accelerator, loss, parts)
                if not torch.isfinite(mean_loss):
                    _stop_on_nan(config, state, mean_loss)
                accelerator.backward(loss)
                grad_norm = accelerator.clip_grad_norm_(trainable, config.train.grad_clip) if accelerator.sync_gradients else 0.0
                for optimizer in optimizers:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            state.tokens += batch[:, :-1].numel() * accelerator.num_processes
        for scheduler in schedulers:
            scheduler.step()
        state.step += 1
        state.last_loss = mean_loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{state.last_loss:.4f}")
        check_finite(accelerator.unwrap_model(model))
        if config.log_every and state.step % config.log_every == 0:
            history.append(_log_metrics(accelerator, model, state, optimizers, grad_norm, parts, started, device))
        if config.eval_every and state.step % config.eval_every == 0:
            validation = _validation_loss(config, accelerator.unwrap_model(model), inputs)
            accelerator.log({"validation_loss": validation}, step=state.step)
            logger.info("step %d: validation loss %.4f", state.step, validation)
            history.append({"step": state.step, "validation_loss": validation})
        if config.save_every and state.step % config.save_every == 0:
            _save(config, accelerator, model, state, metadata)
    bar.close()
    return history


def _save(config: RunConfig, accelerator, model, state: TrainState, metadata: dict) -> None:
    """Save a checkpoint unless the rotations have left the Stiefel manifold.

    The loop state goes into checkpoint.json, not into a pickle, so resuming unpickles nothing
    of ours.
    """
    error = accelerator.unwrap_model(model).rotations.max_orthogonality_error()
    if error > ORTHOGONALITY_LIMIT:
        _stop_on_nan(config, state, torch.tensor(float("nan")),
                     reason=f"the rotations left the Stiefel manifold (max |RᵀR − I| = {error:.3e})", step=state.step)
    save_checkpoint(accelerator, config.output_dir, state.step, {**metadata, "state": state.state_dict()},
                    config.keep_checkpoints)


def _mean_over_processes(accelerator, loss: torch.Tensor, parts: dict) -> tuple[torch.Tensor, dict]:
    """Average the loss and its logged parts over all processes (one all-reduce)."""
    values = torch.tensor([loss.item(), *parts.values()], dtype=torch.float32, device=accelerator.device)
    values = accelerator.reduce(values, reduction="mean")
    return values[0], dict(zip(parts, values[1:].tolist()))


def _dump_trainables(accelerator, model, directory: Path) -> None:
    """Write this process's trainable parameters to DIRECTORY/rank_{process_index}.safetensors."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: parameter.detach().cpu().contiguous()
               for name, parameter in accelerator.unwrap_model(model).named_parameters() if parameter.requires_grad}
    save_file(tensors, str(directory / f"rank_{accelerator.process_index}.safetensors"))


def _stop_on_nan(config: RunConfig, state: TrainState, loss: torch.Tensor, reason: str | None = None,
                 step: int | None = None) -> None:
    """Raise FloatingPointError naming the step and the last good checkpoint; nothing is saved."""
    found = complete_checkpoints(config.output_dir)
    last = str(found[-1]) if found else "none"
    reason = reason or f"loss became {float(loss.detach())}"
    step = state.step + 1 if step is None else step
    raise FloatingPointError(f"{reason} at step {step}; no checkpoint was written for it. "
                             f"Last good checkpoint: {last}. Lower the learning rates and resume from it.")
