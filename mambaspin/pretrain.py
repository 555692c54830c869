"""Pretraining of the shipped reference model: a small Mamba-1 LM on Tiny Shakespeare.

Trains a byte-level BPE tokenizer on the training split, then the model with AdamW, a warmup +
cosine learning rate, dropout attached at the named points (removed before saving), and early
stopping on validation loss per character. The best epoch is saved in the Hugging Face format.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import MambaConfig
from .data import DEFAULT_TEXT, load_text_splits, pack_blocks
from .evaluate import evaluate_text
from .loading import save_model
from .model import MambaLM
from .tokenizer import train_byte_level_bpe

logger = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    """Settings of the reference pretraining run (defaults reproduce the shipped model)."""

    out_dir: str = "shipped/mamba-shakespeare"
    text: str = str(DEFAULT_TEXT)
    vocab_size: int = 2048
    d_model: int = 192
    n_layer: int = 6
    block_size: int = 256
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.1
    dropout: float = 0.1
    warmup_steps: int = 100
    max_epochs: int = 14
    patience: int = 3
    seed: int = 0
    threads: int = 0


def init_weights(model: MambaLM, seed: int) -> None:
    """Initialize linears and embedding with N(0, 0.02) and dt_proj as in Mamba (dt in [1e-3, 0.1])."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, 0.02, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
        for mixer in model.mixers:
            dt_rank = mixer.dt_proj.in_features
            mixer.dt_proj.weight.uniform_(-(dt_rank**-0.5), dt_rank**-0.5, generator=generator)
            dt = torch.exp(torch.rand(mixer.dt_proj.out_features, generator=generator) * math.log(100) + math.log(1e-3))
            mixer.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            mixer.out_proj.weight.div_(math.sqrt(2 * model.config.n_layer))


def set_dropout(model: MambaLM, p: float) -> None:
    """Attach dropout at each mixer's out_proj input and at lm_head's input (p=0 detaches)."""
    make = (lambda: nn.Dropout(p)) if p > 0 else nn.Identity
    for layer in range(model.config.n_layer):
        model.set_point("out_proj_input", layer, make())
    model.set_point("lm_head_input", None, make())


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warmup to `base`, then cosine decay to base / 10."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_epoch(model, optimizer, ids, cfg, epoch, step, total_steps) -> tuple[int, float]:
    """One pass over the training stream, shifted by a seeded offset so blocks differ per epoch."""
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    offset = int(torch.randint(0, cfg.block_size, (1,), generator=generator))
    blocks = pack_blocks(ids[offset:], cfg.block_size, cfg.text)  # (n_blocks, block + 1)
    blocks = blocks[torch.randperm(blocks.shape[0], generator=generator)]
    model.train()
    losses = []
    for first in tqdm(range(0, blocks.shape[0], cfg.batch_size), desc=f"epoch {epoch}", leave=False):
        batch = blocks[first : first + cfg.batch_size]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total_steps, cfg.lr, cfg.warmup_steps)
        logits = model(batch[:, :-1])  # (b, l, v)
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        step += 1
    return step, sum(losses) / len(losses)


def pretrain(cfg: PretrainConfig) -> dict:
    """Run the reference pretraining and save the best model into `cfg.out_dir`."""
    torch.manual_seed(cfg.seed)
    torch.set_flush_denormal(True)  # decayed SSM states reach denormal floats, which are slow on x86
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    splits = load_text_splits(cfg.text)
    tokenizer = train_byte_level_bpe(splits.train, cfg.vocab_size)
    train_ids = tokenizer.encode(splits.train)
    model_cfg = MambaConfig(vocab_size=tokenizer.vocab_size, d_model=cfg.d_model, n_layer=cfg.n_layer)
    model = MambaLM(model_cfg)
    init_weights(model, cfg.seed)
    set_dropout(model, cfg.dropout)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "A_log" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "A_log" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )
    steps_per_epoch = math.ceil(((train_ids.numel() - 1) // cfg.block_size) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.max_epochs

    history, best, best_state, step, start = [], math.inf, None, 0, time.time()
    for epoch in range(cfg.max_epochs):
        step, train_loss = train_epoch(model, optimizer, train_ids, cfg, epoch, step, total_steps)
        result = evaluate_text(model, tokenizer, splits.validation, cfg.block_size, progress=False)
        history.append({"epoch": epoch, "step": step, "train_loss": train_loss, **result.to_dict(),
                        "minutes": (time.time() - start) / 60})
        logger.info("epoch %d: train %.4f, validation %.4f nats/token, %.4f nats/char", epoch, train_loss,
                    result.loss_per_token, result.nats_per_char)
        if result.nats_per_char < best:
            best, best_state = result.nats_per_char, {k: v.clone() for k, v in model.state_dict().items()}
        elif epoch - min(range(len(history)), key=lambda i: history[i]["nats_per_char"]) >= cfg.patience:
            break

    model.load_state_dict(best_state)
    set_dropout(model, 0.0)
    summary = {"config": asdict(cfg), "history": history,
               "best": min(history, key=lambda h: h["nats_per_char"]),
               "parameters": sum(p.numel() for p in model.parameters())}
    files = {"training_log.json": json.dumps(summary, indent=2) + "\n", "README.md": model_card(summary)}
    save_model(model, cfg.out_dir, tokenizer, files)
    return summary


def model_card(summary: dict) -> str:
    """A short markdown model card from the pretraining summary."""
    cfg, best = summary["config"], summary["best"]
    return f"""# mamba-shakespeare

The default model shipped with mambaspin: a Mamba-1 causal LM in the Hugging Face
`MambaForCausalLM` format, trained on Tiny Shakespeare by `scripts/pretrain_reference.py`.

| | |
|---|---|
| parameters | {summary["parameters"]:,} (embedding tied to lm_head) |
| shape | d_model {cfg["d_model"]}, d_inner {2 * cfg["d_model"]}, {cfg["n_layer"]} layers, d_state 16, d_conv 4, dt_rank {-(-cfg["d_model"] // 16)} |
| tokenizer | byte-level BPE, {cfg["vocab_size"]} tokens, trained on the training split only |
| data | Tiny Shakespeare (`shipped/tinyshakespeare.txt`): first 90% of characters train, last 10% validation |
| validation loss | {best["loss_per_token"]:.4f} nats/token, {best["nats_per_char"]:.4f} nats/char, {best["bits_per_char"]:.4f} bits/char |
| validation tokens | {best["tokens"]:,} tokens, {best["chars"]:,} characters |
| best epoch | {best["epoch"] + 1} of {len(summary["history"])} run, {best["minutes"]:.0f} minutes of CPU training |

Training: AdamW (lr {cfg["lr"]}, betas 0.9/0.95, weight decay {cfg["weight_decay"]} on matrices), linear
warmup over {cfg["warmup_steps"]} steps then cosine decay to lr/10 over {cfg["max_epochs"]} epochs, batches of
{cfg["batch_size"]} x {cfg["block_size"]} tokens from a randomly shifted packing each epoch, dropout {cfg["dropout"]}
at each out_proj input and at the lm_head input (removed in the shipped weights), gradient clipping
at 1.0, early stopping after {cfg["patience"]} epochs without improvement; the best epoch is kept. The
validation loss is total nats over total characters of the validation split, in windows of
{cfg["block_size"]} tokens. `training_log.json` has every epoch.

Reproduce: `python scripts/pretrain_reference.py` (seed {cfg["seed"]}).
"""
