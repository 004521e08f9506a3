"""The canvas benchmark's classifier: one small CNN on 16x16 RGB images in ``[-1, 1]`` with two
heads, style (8) and object (8), trained on freshly rendered images and checked on a held-out
rendered set of another seed. ``features`` (the 128-d shared penultimate layer) feed the Frechet
distance.

    python -m spare_core.canvas.classifier --out spare_core/assets/canvas_classifier.safetensors
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import random_labels, render, render_set
from .names import OBJECTS, STYLES

FEATURE_DIM = 128
HELD_OUT_SEED = 12345


class CanvasClassifier(nn.Module):
    """conv(3->32) -> conv(32->32) -> pool -> conv(32->64) -> conv(64->64) -> pool ->
    linear(1024->128) = features -> style head (8), object head (8)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv4 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.style_head = nn.Linear(FEATURE_DIM, len(STYLES))
        self.object_head = nn.Linear(FEATURE_DIM, len(OBJECTS))
        self.drop = nn.Dropout(0.2)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations ``[N, 128]`` of images ``[N, 3, 16, 16]`` in ``[-1, 1]``."""
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        h = F.max_pool2d(h, 2)
        h = F.max_pool2d(F.relu(self.conv4(F.relu(self.conv3(h)))), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits ``([N, 8] style, [N, 8] object)``."""
        f = self.drop(self.features(x))
        return self.style_head(f), self.object_head(f)

    @torch.no_grad()
    def predict(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Predicted (style ``[N]``, object ``[N]``) indices; eval mode, images clamped to
        ``[-1, 1]``."""
        was = self.training
        self.eval()
        s, o = self(x.float().clamp(-1, 1))
        self.train(was)
        return s.argmax(1), o.argmax(1)


def held_out_accuracy(model: CanvasClassifier, n: int = 4096) -> tuple[float, float]:
    """(style, object) accuracy on ``n`` renders of :data:`HELD_OUT_SEED`."""
    x, s, o = render_set(n, HELD_OUT_SEED)
    ps, po = model.predict(x)
    return (ps == s).float().mean().item(), (po == o).float().mean().item()


def train_classifier(seed: int = 0, steps: int = 3000, batch: int = 128,
                     noise: float = 0.1,
                     device: str = "cpu") -> tuple[CanvasClassifier, tuple[float, float]]:
    """Train on fresh renders (Gaussian pixel noise up to ``noise`` and loose dot lattices as
    augmentation, as generated images are not exact renders); returns the model (eval mode) and its held-out
    accuracies. Batches are drawn on the CPU and moved to ``device``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = CanvasClassifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    model.train()
    for _ in range(steps):
        s, o = random_labels(batch, gen)
        x = render(s, o, gen, loose_dots=True)
        x = x + noise * torch.rand(batch, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
        ls, lo = model(x.to(device))
        loss = F.cross_entropy(ls, s.to(device)) + F.cross_entropy(lo, o.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model = model.cpu().eval()
    return model, held_out_accuracy(model)


def save_classifier(model: CanvasClassifier, path: str, acc: tuple[float, float]) -> None:
    """Write the weights as safetensors (held-out accuracies in the metadata)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path,
              metadata={"held_out_style_accuracy": f"{acc[0]:.4f}",
                        "held_out_object_accuracy": f"{acc[1]:.4f}", "arch": "CanvasClassifier"})


def load_classifier_file(path: str) -> CanvasClassifier:
    """Load weights written by :func:`save_classifier`; eval mode."""
    from safetensors.torch import load_file

    model = CanvasClassifier()
    model.load_state_dict(load_file(path))
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="train the canvas benchmark's style/object classifier")
    p.add_argument("--out", required=True, help=".safetensors file to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, acc = train_classifier(a.seed, a.steps, device=a.device)
    save_classifier(model, a.out, acc)
    print(f"held-out accuracy: style {acc[0]:.4f}, object {acc[1]:.4f} (4096 renders); saved {a.out}")
    if min(acc) < 0.98:
        sys.exit("held-out accuracy below 0.98")


if __name__ == "__main__":
    main()
