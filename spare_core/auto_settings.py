"""``--dtype auto`` and the memory controls' ``auto``: chosen from the device and its free memory.

The nodes default to the memory controls (ComfyUI's users run on 8-12 GB cards); the CLI and the
API used to default to float32 with every control off, which runs out of memory on an 8 GB card at
SD1.5 size. :func:`choose` picks, before anything is loaded:

- the dtype: bfloat16 where the GPU computes it (``torch.cuda.is_bf16_supported()``), float16 on
  other GPUs and on MPS (trained with dynamic loss scaling), float32 on the CPU (most CPUs have no
  fast half-precision matmul, and the CPU's memory is the machine's RAM);
- the memory controls (gradient checkpointing, one backward per loss term, saliency micro-batch
  1): on where the network's weights in that dtype times :data:`CONTROLS_OFF_FACTOR` exceed the
  device's free memory, off where they fit (faster), off on the CPU;
- where the text encoders live: on the CPU where the controls are on for a GPU (they encode a
  run's few prompts; T5-XXL alone is 8.87 GB in bf16), else on the device. A run that
  differentiates through the text encoder (its localisation, the adversarial attack) keeps it on
  the device.

:data:`CONTROLS_OFF_FACTOR` is the measured peak of the heaviest phase with every control off
over the weights' bytes (``python benchmarks/memory.py``: SD1.5 at 512 px, a SPARE step 4.75 GB
over 1.60 GB of bf16 weights, 3.0x; SDXL at 1024 px, 23.46 over 4.78 GB, 4.9x), with a margin for
CUDA's context and allocator: 6x. Explicit flags always win; :attr:`AutoSettings.reasons` says
what was chosen and why, for the CLI to print.
"""
from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass, field

from .recipes import SALIENCY_MICRO_BATCH

# torch is imported inside the functions: the CLI reads this module to build its --help
CONTROLS_OFF_FACTOR = 6.0
"""Free device memory, in multiples of the weights' bytes, above which the controls stay off."""

NETWORK_FOLDERS = ("unet", "transformer")  # where a pipeline folder keeps the trained network


@dataclass
class AutoSettings:
    """What ``auto`` resolved to; ``reasons``: one line per choice, for the user."""

    dtype: str
    gradient_checkpointing: bool
    split_backward: bool
    micro_batch: int
    text_encoders: str = "device"  # "device" or "cpu"
    reasons: list[str] = field(default_factory=list)


def network_parameters(folder: str) -> int:
    """Parameters of the pipeline folder's UNet or transformer, read from the ``.safetensors``
    headers (``safe_open`` reads the header only; no tensor is loaded); 0 when there is none."""
    from safetensors import safe_open

    for sub in NETWORK_FOLDERS:
        files = sorted(glob.glob(os.path.join(folder, sub, "*.safetensors")))
        if files:
            total = 0
            for path in files:
                with safe_open(path, "pt") as f:
                    total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
            return total
    return 0


def bf16_supported(device: str) -> bool:
    """Whether ``device`` (a CUDA device) computes bfloat16 natively."""
    import torch
    return device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def free_device_memory(device: str) -> int | None:
    """Free bytes on a CUDA device (``torch.cuda.mem_get_info``); None elsewhere."""
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    return None


def choose(device: str, parameters: int, *, dtype: str = "auto",
           gradient_checkpointing: bool | None = None, split_backward: bool | None = None,
           micro_batch: int | None = None, text_encoders: str = "auto",
           needs_text_encoder: bool = False) -> AutoSettings:
    """Resolve ``auto`` / ``None`` settings for a network of ``parameters`` weights on
    ``device`` (``cpu``, ``cuda[:N]``, ``mps``); given values are kept as they are."""
    reasons = []
    if dtype == "auto":
        if device == "cpu":
            dtype, why = "float32", "the CPU computes in float32"
        elif bf16_supported(device):
            dtype, why = "bfloat16", f"{device} computes bfloat16"
        else:
            dtype, why = "float16", f"{device} has no bfloat16: float16 with loss scaling"
        reasons.append(f"dtype {dtype} ({why})")
    free = free_device_memory(device)
    weights = parameters * {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]
    tight = free is not None and weights * CONTROLS_OFF_FACTOR > free
    if free is None:
        why_memory = f"{device}: memory is the machine's RAM"
    else:
        why_memory = (f"{free / 2**30:.1f} GB free on {device} "
                      f"{'<' if tight else '>='} {CONTROLS_OFF_FACTOR:g} x "
                      f"{weights / 2**30:.2f} GB of {dtype} weights")
    if any(c is None for c in (gradient_checkpointing, split_backward, micro_batch)):
        on, why = tight, why_memory
        chosen = []
        if gradient_checkpointing is None:
            gradient_checkpointing = on
            chosen.append(f"gradient checkpointing {'on' if on else 'off'}")
        if split_backward is None:
            split_backward = on
            chosen.append(f"split backward {'on' if on else 'off'}")
        if micro_batch is None:
            micro_batch = 1 if on else SALIENCY_MICRO_BATCH
            chosen.append(f"micro-batch {micro_batch}")
        reasons.append(f"{', '.join(chosen)} ({why})")
    if text_encoders == "auto":
        if needs_text_encoder:
            text_encoders, why = "device", "the run differentiates through the text encoder"
        elif tight:
            text_encoders, why = "cpu", f"{why_memory}; they encode a few prompts"
        else:
            text_encoders, why = "device", "room on the device" if device != "cpu" else "the CPU"
        reasons.append(f"text encoders on the {text_encoders} ({why})")
    return AutoSettings(dtype, bool(gradient_checkpointing), bool(split_backward),
                        int(micro_batch), text_encoders, reasons)
