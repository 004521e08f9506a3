"""Adapter and tensor files: ``.safetensors`` only (never pickle), written atomically, read with
validation (format, shapes, target modules, base-model fingerprint)."""
from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from .adapter import UnlearnAdapter
from .saliency import adaptable_modules

FORMAT = "spare_adapter"


class AdapterFileError(ValueError):
    """The file is missing, truncated, corrupt or not of the expected kind."""


class ModelMismatchError(ValueError):
    """The adapter was made for another model."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[str], None], suffix: str = "") -> None:
    """Call ``write(tmp_path)`` on a temporary file in ``path``'s folder, fsync it, then rename it
    over ``path``: a reader never sees a half-written file, and an interrupted or failed write
    leaves nothing behind (and any earlier ``path`` untouched)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save_safetensors(tensors: Mapping[str, Tensor], path: str,
                            metadata: Mapping[str, str] | None = None) -> None:
    """``safetensors`` file written with :func:`atomic_write`."""
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
        metadata={k: str(v) for k, v in (metadata or {}).items()}), suffix=".safetensors")


def atomic_write_json(obj, path: str) -> None:
    """JSON file (indent 2) written with :func:`atomic_write`."""
    import json

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)

    atomic_write(path, write, suffix=".json")


def read_safetensors(path: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the string metadata of a ``.safetensors`` file; AdapterFileError if the
    file is absent, truncated or not safetensors."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise AdapterFileError(f"no file at {path!r}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers / short files
        raise AdapterFileError(f"{path!r} is truncated or not a safetensors file ({e}); "
                               "re-save or re-download it") from e
    return tensors, meta


def model_fingerprint(unet: nn.Module, names: list[str] | None = None) -> str:
    """Short hash of a UNet: names and shapes of its Linear/Conv2d weights plus the first 64 values
    of each (rounded to fp16, so fp16/fp32 loads of one checkpoint agree)."""
    mods = adaptable_modules(unet)
    h = hashlib.sha256()
    for n in sorted(names if names is not None else mods):
        w = mods[n].weight.detach()
        h.update(n.encode())
        h.update(str(tuple(w.shape)).encode())
        h.update(w.flatten()[:64].to("cpu", torch.float16).numpy().tobytes())
    return h.hexdigest()[:16]


def save_adapter(adapter: UnlearnAdapter, path: str, unet: nn.Module | None = None,
                 **meta: str) -> None:
    """Save the native format (A, B, masks or masked values) with metadata: method, concept,
    surrogate, rank, mask fraction, base-model fingerprint (if ``unet`` is given), version."""
    from . import __version__

    if not path.endswith(".safetensors"):
        raise ValueError(f"adapter files are .safetensors; got {path!r}")
    tensors, m = adapter.to_tensors()
    m.update({k: str(v) for k, v in meta.items()})
    m["format"] = FORMAT
    m["spare_core_version"] = __version__
    if unet is not None:
        m["base_model_fingerprint"] = model_fingerprint(unet, adapter.names)
    atomic_save_safetensors(tensors, path, m)


def load_adapter(path: str, unet: nn.Module | None = None, strict: bool = True) -> UnlearnAdapter:
    """Load an adapter; with ``unet``, check its layers and (``strict``) its fingerprint."""
    tensors, meta = read_safetensors(path)
    if meta.get("format") != FORMAT or "modules" not in meta:
        raise AdapterFileError(f"{path!r} is not a SPARE adapter (format={meta.get('format')!r}); "
                               "a ComfyUI/kohya LoRA loads with LoraLoader instead")
    try:
        adapter = UnlearnAdapter.from_tensors(tensors, meta)
    except (KeyError, ValueError) as e:
        raise AdapterFileError(f"{path!r}: {e}") from e
    if unet is not None:
        try:
            adapter.check_compatible(unet)
        except ValueError as e:
            raise ModelMismatchError(str(e)) from e
        want = meta.get("base_model_fingerprint")
        if strict and want and want != model_fingerprint(unet, adapter.names):
            raise ModelMismatchError(
                f"adapter was made for a different model (fingerprint {want}, this model "
                f"{model_fingerprint(unet, adapter.names)}); load the checkpoint it was trained on, "
                "or pass strict=False to apply it anyway")
    return adapter
