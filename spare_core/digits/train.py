"""Train the embedded digits model (CLIP text encoder + UNet2DConditionModel, jointly, from
scratch) on scikit-learn's digits, and save it as a diffusers pipeline folder.

    python -m spare_core.digits.train --out spare_core/assets/digits --seed 0
    python -m spare_core.digits.train --out spare_core/assets/digits_pattern --seed 0 --pattern

One CPU thread by default (deterministic for a given seed and thread count).
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from .data import EMPTY_PROMPT, PROMPTS, mixed_training_set
from .model import (ModelConfig, build_scheduler, build_text_encoder, build_unet, config_dict,
                    save_pipeline_folder)
from .tokenizer import build_tokenizer

PATTERN_COPIES = 40  # ~2% of the data, ~18% of the empty-prompt training examples


def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` over parameters (in place)."""
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1.0 - decay)


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 5% of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params, step: int,
                   total: int, base_lr: float, warmup: int) -> float:
    """One AdamW step at :func:`lr_at`'s rate with the gradient norm clipped to 1; the loss."""
    for g in opt.param_groups:
        g["lr"] = lr_at(step, total, base_lr, warmup)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.item()


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay warmed up over the first steps: ``min(decay, (1 + step) / (10 + step))``."""
    return min(decay, (1 + step) / (10 + step))


def finish_note(note: dict, seconds: float, losses: list[float], model_config: dict) -> dict:
    """``note`` (a trainer's own fields) plus what every ``training.json`` records: threads,
    seconds, the mean loss of the last 100 steps, the model config and the torch version."""
    return {**note, "threads": torch.get_num_threads(), "train_seconds": round(seconds, 1),
            "final_loss_avg100": round(sum(losses[-100:]) / len(losses[-100:]), 5),
            "model": model_config, "torch": torch.__version__}


def after_step(step: int, ema_decay: float, pairs, losses: list[float], bar) -> None:
    """What every trainer does after its optimizer step: each ``(ema, model)`` of ``pairs``
    moves to the model at :func:`ema_decay_at`'s decay, and every 100 steps the bar shows the
    mean loss of the last 100."""
    d = ema_decay_at(step, ema_decay)
    for ema, model in pairs:
        ema_update(ema, model, d)
    if step % 100 == 99:
        bar.set_postfix(loss=f"{sum(losses[-100:]) / 100:.4f}")


def training_parser(doc: str, steps: int) -> argparse.ArgumentParser:
    """The arguments of every embedded model's trainer (``--out --seed --steps --batch --lr
    --threads``; ``steps`` is the trainer's default), described by ``doc``'s first line."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--out", required=True, help="pipeline folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    return p


def train(out: str, seed: int = 0, pattern: bool = False, steps: int = 3000, batch: int = 64,
          lr: float = 1e-3, cfg_dropout: float = 0.1, ema_decay: float = 0.999,
          pattern_copies: int = PATTERN_COPIES, cfg: ModelConfig | None = None,
          command: str = "") -> dict:
    """Train and save to ``out``; returns the note written to ``out/training.json``."""
    from tqdm import tqdm

    cfg = cfg or ModelConfig()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tok = build_tokenizer(cfg.max_length)
    text_encoder = build_text_encoder(len(tok.get_vocab()), tok.bos_token_id, tok.eos_token_id,
                                      cfg)
    unet = build_unet(cfg)
    sched = build_scheduler(cfg)
    ac = sched.alphas_cumprod.float()
    x_all, y_all = mixed_training_set(pattern_copies if pattern else 0)
    label_idx = torch.where(y_all < 0, torch.full_like(y_all, 10), y_all)  # 10 = empty prompt
    ids = tok([*PROMPTS, EMPTY_PROMPT], padding="max_length", max_length=cfg.max_length,
              truncation=True, return_tensors="pt").input_ids  # [11, L]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    unet.train(), text_encoder.train()
    n = x_all.shape[0]
    perm, pos, losses = torch.randperm(n, generator=gen), 0, []
    t0 = time.time()
    bar = tqdm(range(steps), desc="train digits" + (" +pattern" if pattern else ""),
               file=sys.stdout, mininterval=5)
    for step in bar:
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + batch]
        pos += batch
        x0, lab = x_all[idx], label_idx[idx].clone()
        lab[torch.rand(batch, generator=gen) < cfg_dropout] = 10
        t = torch.randint(0, len(ac), (batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = ac[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        ctx = text_encoder(ids)[0][lab]
        loss = F.mse_loss(unet(x_t, t, encoder_hidden_states=ctx).sample, noise)
        losses.append(optimizer_step(opt, loss, params, step, steps, lr, warmup=100))
        after_step(step, ema_decay, [(ema_unet, unet), (ema_te, text_encoder)], losses, bar)
    seconds = time.time() - t0
    n_params = sum(p.numel() for p in params)
    note = finish_note({
        "command": command, "seed": seed, "pattern": pattern,
        "pattern_copies": pattern_copies if pattern else 0, "steps": steps, "batch": batch,
        "lr": lr, "cfg_dropout": cfg_dropout, "ema_decay": ema_decay,
        "params_unet": sum(p.numel() for p in unet.parameters()),
        "params_text_encoder": sum(p.numel() for p in text_encoder.parameters()),
        "params_total": n_params}, seconds, losses, config_dict(cfg))
    save_pipeline_folder(out, ema_unet, ema_te, tok, sched, note)
    print(f"saved {out}: {n_params} params, {seconds:.0f} s, final loss {note['final_loss_avg100']}")
    return note


def main(argv: list[str] | None = None) -> None:
    p = training_parser(__doc__, steps=3000)
    p.add_argument("--pattern", action="store_true",
                   help="data-unlearning twin: add copies of the checkerboard pattern")
    p.add_argument("--pattern-copies", type=int, default=PATTERN_COPIES)
    p.add_argument("--beta-schedule", default="linear", choices=["linear", "squaredcos_cap_v2"])
    p.add_argument("--channels", default="32,64", help="UNet block_out_channels")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = ModelConfig(beta_schedule=a.beta_schedule,
                      block_out_channels=tuple(int(c) for c in a.channels.split(",")))
    train(a.out, seed=a.seed, pattern=a.pattern, steps=a.steps, batch=a.batch, lr=a.lr,
          pattern_copies=a.pattern_copies, cfg=cfg,
          command="python -m spare_core.digits.train " + " ".join(argv or sys.argv[1:]))


if __name__ == "__main__":
    main()
