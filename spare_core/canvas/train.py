"""Train the embedded canvas model (CLIP text encoder + 16x16 RGB UNet2DConditionModel, jointly,
from scratch) on freshly rendered style x object images, and save it as a diffusers pipeline
folder.

    python -m spare_core.canvas.train --out spare_core/assets/canvas --seed 0

Every step renders a new batch (uniform style and object, random wording; one-domain and empty
prompts as in :func:`~spare_core.canvas.data.draw_prompt_index`). One CPU thread by default
(deterministic for a given seed and thread count).
"""
from __future__ import annotations

import copy
import sys
import time

import torch
import torch.nn.functional as F

from ..digits.model import build_scheduler, build_text_encoder, save_pipeline_folder
from ..digits.tokenizer import build_tokenizer
from ..digits.train import after_step, finish_note, optimizer_step, training_parser
from .data import draw_prompt_index, random_labels, render
from .names import all_words, training_prompts
from .model import CanvasConfig, build_unet, config_dict, write_readme


def train(out: str, seed: int = 0, steps: int = 4500, batch: int = 64, lr: float = 1e-3,
          ema_decay: float = 0.999, cfg: CanvasConfig | None = None, command: str = "",
          device: str = "cpu") -> dict:
    """Train and save to ``out``; returns the note written to ``out/training.json``. Batches
    are drawn on the CPU from the seed and moved to ``device``, so the data do not depend on
    it (the weights do, up to floating-point order)."""
    from tqdm import tqdm

    cfg = cfg or CanvasConfig()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    prompts = training_prompts()
    tok = build_tokenizer(cfg.max_length, all_words(), prompts)
    text_encoder = build_text_encoder(len(tok.get_vocab()), tok.bos_token_id, tok.eos_token_id,
                                      cfg)
    unet = build_unet(cfg).to(device)
    text_encoder = text_encoder.to(device)
    sched = build_scheduler(cfg)
    ac = sched.alphas_cumprod.float()
    ids = tok(prompts, padding="max_length", max_length=cfg.max_length, truncation=True,
              return_tensors="pt").input_ids.to(device)  # [P, L]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    unet.train(), text_encoder.train()
    losses = []
    t0 = time.time()
    bar = tqdm(range(steps), desc="train canvas", file=sys.stdout, mininterval=10)
    for step in bar:
        style, obj = random_labels(batch, gen)
        x0 = render(style, obj, gen)
        which = draw_prompt_index(style, obj, gen)
        t = torch.randint(0, len(ac), (batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = ac[t].view(-1, 1, 1, 1)
        x_t = (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(device)
        t, noise = t.to(device), noise.to(device)
        used, inverse = torch.unique(which, return_inverse=True)  # encode each prompt once
        ctx = text_encoder(ids[used.to(device)])[0][inverse.to(device)]
        loss = F.mse_loss(unet(x_t, t, encoder_hidden_states=ctx).sample, noise)
        losses.append(optimizer_step(opt, loss, params, step, steps, lr, warmup=200))
        after_step(step, ema_decay, [(ema_unet, unet), (ema_te, text_encoder)], losses, bar)
    seconds = time.time() - t0
    n_params = sum(p.numel() for p in params)
    note = finish_note({
        "command": command, "seed": seed, "steps": steps, "batch": batch, "lr": lr,
        "ema_decay": ema_decay, "device": str(device), "params_unet": sum(p.numel() for p in unet.parameters()),
        "params_text_encoder": sum(p.numel() for p in text_encoder.parameters()),
        "params_total": n_params}, seconds, losses, config_dict(cfg))
    save_pipeline_folder(out, ema_unet.cpu(), ema_te.cpu(), tok, sched, note, readme=write_readme,
                         words=all_words())
    print(f"saved {out}: {n_params} params, {seconds:.0f} s, final loss {note['final_loss_avg100']}")
    return note


def main(argv: list[str] | None = None) -> None:
    p = training_parser(__doc__, steps=4500)
    p.add_argument("--device", default="cpu", help="cpu (the committed weights), cuda, ...")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    train(a.out, seed=a.seed, steps=a.steps, batch=a.batch, lr=a.lr, device=a.device,
          command="python -m spare_core.canvas.train " + " ".join(argv or sys.argv[1:]))


if __name__ == "__main__":
    main()
