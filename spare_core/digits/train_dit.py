"""Train the embedded flow-matching digits model "digits-dit" (SD3Transformer2DModel, rectified
flow) on scikit-learn's digits with the committed digits model's CLIP text encoder (frozen), and
save it as a diffusers pipeline folder.

    python -m spare_core.digits.train_dit --out spare_core/assets/digits_dit --seed 0

Rectified flow: ``x_s = (1 - s) x0 + s noise``, sigma ``s ~ sigmoid(N(0, 1))`` (SD3's
logit-normal), the transformer gets ``timestep = 1000 s`` and regresses ``v = noise - x0`` (MSE).
One CPU thread by default (deterministic for a given seed and thread count).
"""
from __future__ import annotations

import copy
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import EMPTY_PROMPT, PROMPTS, load_digit_images
from .dit import DitConfig, build_flow_scheduler, build_transformer, config_dict, save_dit_folder
from .metrics import DEFAULT_MODEL
from .train import after_step, finish_note, optimizer_step, training_parser

DEFAULT_MODEL_REL = "spare_core/assets/digits"  # DEFAULT_MODEL as written into training.json


def load_text_encoder(folder: str = DEFAULT_MODEL):
    """The digits model's ``CLIPTextModel`` (eval mode, frozen) and ``CLIPTokenizer``."""
    from transformers import CLIPTextModel, CLIPTokenizer

    te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", use_safetensors=True)
    tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    te.eval().requires_grad_(False)
    return te, tok


@torch.no_grad()
def prompt_embeddings(text_encoder, tokenizer) -> tuple[Tensor, Tensor]:
    """Embeddings of the ten digit prompts and the empty prompt (row 10):
    ``(last hidden state [11, 16, 64], pooler_output [11, 64])``."""
    ids = tokenizer([*PROMPTS, EMPTY_PROMPT], padding="max_length",
                    max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    out = text_encoder(ids)
    return out.last_hidden_state, out.pooler_output


def sample_sigmas(n: int, gen: torch.Generator, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """Logit-normal sigmas ``[n]`` in ``(0, 1)``: ``sigmoid(mean + std * N(0, 1))``."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=gen))


def flow_loss(transformer: nn.Module, x0: Tensor, ctx: Tensor, pooled: Tensor, sigma: Tensor,
              noise: Tensor) -> Tensor:
    """Rectified-flow MSE of a batch: ``x0``/``noise`` ``[B, 1, 8, 8]``, ``sigma`` ``[B]``."""
    s = sigma.view(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    v = transformer(x_t, encoder_hidden_states=ctx, pooled_projections=pooled,
                    timestep=sigma * 1000.0).sample
    return F.mse_loss(v, noise - x0)


def train_dit(out: str, seed: int = 0, steps: int = 6000, batch: int = 64, lr: float = 1e-3,
              cfg_dropout: float = 0.1, ema_decay: float = 0.999, cfg: DitConfig | None = None,
              text_model: str = DEFAULT_MODEL, command: str = "") -> dict:
    """Train and save to ``out``; returns the note written to ``out/training.json``."""
    from tqdm import tqdm

    cfg = cfg or DitConfig()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    text_encoder, tok = load_text_encoder(text_model)
    ctx_all, pooled_all = prompt_embeddings(text_encoder, tok)  # frozen: computed once
    transformer = build_transformer(cfg)
    sched = build_flow_scheduler(cfg)
    x_all, y_all = load_digit_images()
    params = list(transformer.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = copy.deepcopy(transformer).eval()
    transformer.train()
    n = x_all.shape[0]
    perm, pos, losses = torch.randperm(n, generator=gen), 0, []
    t0 = time.time()
    bar = tqdm(range(steps), desc="train digits-dit", file=sys.stdout, mininterval=5)
    for step in bar:
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + batch]
        pos += batch
        x0, lab = x_all[idx], y_all[idx].clone()
        lab[torch.rand(batch, generator=gen) < cfg_dropout] = 10  # 10 = empty prompt
        sigma = sample_sigmas(batch, gen)
        noise = torch.randn(x0.shape, generator=gen)
        loss = flow_loss(transformer, x0, ctx_all[lab], pooled_all[lab], sigma, noise)
        losses.append(optimizer_step(opt, loss, params, step, steps, lr, warmup=200))
        after_step(step, ema_decay, [(ema, transformer)], losses, bar)
    seconds = time.time() - t0
    n_params = sum(p.numel() for p in params)
    note = finish_note({
        "command": command, "seed": seed, "objective": "rectified flow, v = noise - x0",
        "sigma_sampling": "logit-normal: sigmoid(N(0, 1))", "timestep": "1000 * sigma",
        "steps": steps, "batch": batch, "lr": lr, "warmup": 200, "cfg_dropout": cfg_dropout,
        "ema_decay": ema_decay, "params_transformer": n_params,
        "params_text_encoder": sum(p.numel() for p in text_encoder.parameters()),
        "text_encoder": "frozen copy of " + (DEFAULT_MODEL_REL if text_model == DEFAULT_MODEL
                                             else text_model)}, seconds, losses, config_dict(cfg))
    save_dit_folder(out, ema, text_encoder, tok, sched, note)
    print(f"saved {out}: {n_params} params, {seconds:.0f} s, final loss {note['final_loss_avg100']}")
    return note


def main(argv: list[str] | None = None) -> None:
    p = training_parser(__doc__, steps=6000)
    p.add_argument("--layers", type=int, default=DitConfig.num_layers)
    p.add_argument("--patch", type=int, default=DitConfig.patch_size, choices=[1, 2])
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = DitConfig(num_layers=a.layers, patch_size=a.patch)
    train_dit(a.out, seed=a.seed, steps=a.steps, batch=a.batch, lr=a.lr, cfg=cfg,
              command="python -m spare_core.digits.train_dit " + " ".join(argv or sys.argv[1:]))


if __name__ == "__main__":
    main()
