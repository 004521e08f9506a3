"""The digit classifier of the benchmark: a tiny CNN on 8x8 images in ``[-1, 1]``, trained on the
real digits (seeded 80/20 split; held-out accuracy printed). ``features`` (the 64-d penultimate
layer) feed the Frechet distance.

    python -m spare_core.digits.classifier --out spare_core/assets/digit_classifier.safetensors
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import load_digit_images, split_indices

FEATURE_DIM = 64


class DigitClassifier(nn.Module):
    """conv(1->16) -> conv(16->32) -> maxpool -> linear(512->64) = features -> linear(64->10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, FEATURE_DIM)
        self.fc2 = nn.Linear(FEATURE_DIM, 10)
        self.drop = nn.Dropout(0.2)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations ``[N, 64]`` of images ``[N, 1, 8, 8]`` in ``[-1, 1]``."""
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc1(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, 10]``."""
        return self.fc2(self.drop(self.features(x)))

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Predicted digits ``[N]`` (int64); eval mode, images clamped to ``[-1, 1]``."""
        was = self.training
        self.eval()
        out = self(x.float().clamp(-1, 1)).argmax(1)
        self.train(was)
        return out


def train_classifier(seed: int = 0, epochs: int = 60, batch: int = 64,
                     noise: float = 0.1) -> tuple[DigitClassifier, float]:
    """Train on the 80% split (Gaussian pixel noise ``noise`` as augmentation); returns the model
    (eval mode) and its held-out accuracy on the other 20%."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = load_digit_images()
    tr, te = split_indices(len(y), 0.2, seed)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        model.train()
        perm = tr[torch.randperm(len(tr), generator=gen)]
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            xb = x[idx] + noise * torch.randn(x[idx].shape, generator=gen)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    acc = (model.predict(x[te]) == y[te]).float().mean().item()
    return model, acc


def save_classifier(model: DigitClassifier, path: str, held_out_acc: float) -> None:
    """Write the weights as safetensors (held-out accuracy in the metadata)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path,
              metadata={"held_out_accuracy": f"{held_out_acc:.4f}", "arch": "DigitClassifier"})


def load_classifier_file(path: str) -> DigitClassifier:
    """Load weights written by :func:`save_classifier`; eval mode."""
    from safetensors.torch import load_file

    model = DigitClassifier()
    model.load_state_dict(load_file(path))
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="train the benchmark's digit classifier")
    p.add_argument("--out", required=True, help=".safetensors file to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, acc = train_classifier(a.seed)
    save_classifier(model, a.out, acc)
    print(f"held-out accuracy {acc:.4f} (360 images); saved {a.out}")
    if acc < 0.95:
        sys.exit("held-out accuracy below 0.95")


if __name__ == "__main__":
    main()
