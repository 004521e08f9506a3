"""Adapter and tensor files: ``.safetensors`` only (never pickle), written atomically, read with
validation (format, shapes, target modules, base-model fingerprint).

An adapter file records what the adapter edits in its ``root`` metadata (``"text_encoder"`` for
the ``text_encoder`` localisation); a file without it is a UNet adapter, as every file written
before the field existed. Where a function takes the model (``unet``) to check against, give
what the adapter edits (the UNet, or the text encoder) or the denoiser (its UNet or text
encoder is picked by the root)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from .adapter import UnlearnAdapter, check_shapes_fit
from .families.unet import adaptable_modules
from .text_encoder import ROOTS, UNET, adapted_network

FORMAT = "spare_adapter"


class AdapterFileError(ValueError):
    """The file is missing, truncated, corrupt or not of the expected kind."""


class ModelMismatchError(ValueError):
    """The adapter was made for another model."""


# The strength a native file may carry (metadata ``strength``, applied on top of the Apply node's
# own -2..2): save_adapter writes 1.0 unless the API changed ``adapter.strength``. 10 leaves 5x the
# node's range for deliberate extrapolation, while a hand-edited 1e308 (or inf/nan), which would
# turn every image the adapter touches into noise, is refused at load time.
MAX_FILE_STRENGTH = 10.0

# A module claiming more weight elements than this (without a UNet to check it against) is refused
# before anything is allocated: 2**28 is 20x the largest weight of SD1.x/SD2.x/SDXL UNets.
MAX_CLAIMED_ELEMENTS = 2 ** 28


def _create_temp(folder: str, suffix: str) -> str:
    """Create an empty, new, uniquely named file in ``folder`` with mode ``0o666`` minus the
    process umask (applied by the kernel: the umask is never read or changed, so other threads
    creating files meanwhile are unaffected)."""
    for _ in range(100):
        path = os.path.join(folder, f".tmp-{secrets.token_hex(8)}{suffix}")
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return path
    raise FileExistsError(f"could not create a temporary file in {folder!r}")


def atomic_write(path: str, write: Callable[[str], None], suffix: str = "") -> None:
    """Call ``write(tmp_path)`` on a temporary file in ``path``'s folder, fsync it, then rename it
    over ``path``: a reader never sees a half-written file, and an interrupted or failed write
    leaves nothing behind (and any earlier ``path`` untouched)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = _create_temp(folder, suffix)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
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
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)

    atomic_write(path, write, suffix=".json")


def _read_safetensors(path: str, read: Callable) -> tuple[dict, dict[str, str]]:
    """``{key: read(f, key)}`` and the string metadata of a ``.safetensors`` file; AdapterFileError
    if the file is absent, truncated or not safetensors."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise AdapterFileError(f"no file at {path!r}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            items = {k: read(f, k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers / short files
        raise AdapterFileError(f"{path!r} is truncated or not a safetensors file ({e}); "
                               "re-save or re-download it") from e
    return items, meta


def read_safetensors(path: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the string metadata of a ``.safetensors`` file; AdapterFileError if the
    file is absent, truncated or not safetensors."""
    return _read_safetensors(path, lambda f, k: f.get_tensor(k))


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
    surrogate, rank, mask fraction, root (text-encoder adapters), base-model fingerprint (if
    ``unet``, the model the adapter edits or its denoiser, is given), version."""
    from . import __version__

    if not path.endswith(".safetensors"):
        raise ValueError(f"adapter files are .safetensors; got {path!r}")
    s = float(adapter.strength)
    if not (math.isfinite(s) and abs(s) <= MAX_FILE_STRENGTH):
        raise ValueError(f"adapter.strength is {s!r}; a file may carry a strength in "
                         f"[-{MAX_FILE_STRENGTH:g}, {MAX_FILE_STRENGTH:g}] (load_adapter refuses "
                         "others): set adapter.strength = 1.0 and scale at apply time instead")
    tensors, m = adapter.to_tensors()
    m.update({k: str(v) for k, v in meta.items()})
    m["format"] = FORMAT
    m["spare_core_version"] = __version__
    if unet is not None:
        m["base_model_fingerprint"] = model_fingerprint(adapter.network(unet), adapter.names)
    atomic_save_safetensors(tensors, path, m)


def read_safetensors_header(path: str) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Shapes of every tensor and the string metadata of a ``.safetensors`` file, without loading
    any tensor; AdapterFileError as :func:`read_safetensors`."""
    return _read_safetensors(path, lambda f, k: tuple(int(x) for x in f.get_slice(k).get_shape()))


def _layout(path: str, meta: Mapping[str, str]) -> dict[str, dict]:
    """The ``modules`` metadata, checked for form: kind, a 2-D or 4-D positive shape, and for
    LoRA a positive integer rank and a finite alpha."""
    try:
        layout = json.loads(meta["modules"])
    except (KeyError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"{path!r}: unreadable 'modules' metadata ({e}); re-save the "
                               "adapter with save_adapter") from e
    if not isinstance(layout, dict) or not layout:
        raise AdapterFileError(f"{path!r}: 'modules' metadata lists no modules")
    for n, e in layout.items():
        shape = e.get("shape") if isinstance(e, dict) else None
        ok = (isinstance(shape, list) and len(shape) in (2, 4)
              and all(isinstance(x, int) and x > 0 for x in shape)
              and e.get("kind") in ("lora", "full"))
        if ok and e["kind"] == "lora":
            r, alpha = e.get("rank"), e.get("alpha")
            ok = (isinstance(r, int) and 0 < r <= min(shape[0], math.prod(shape[1:]))
                  and isinstance(alpha, (int, float)) and math.isfinite(alpha))
        if not ok:
            raise AdapterFileError(f"{path!r}: module {n!r} has malformed metadata {e!r}; "
                                   "the file was not written by save_adapter")
    return layout


def _check_layout_against_file(path: str, layout: Mapping[str, dict],
                               shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Every tensor the metadata implies exists with the shape the metadata claims."""
    def need(key: str, want: tuple[int, ...]) -> None:
        if key not in shapes:
            raise AdapterFileError(f"{path!r} is missing tensor {key!r} (truncated or not a "
                                   "SPARE adapter)")
        if shapes[key] != want:
            raise AdapterFileError(f"{path!r}: tensor {key!r} has shape {list(shapes[key])}, the "
                                   f"metadata claims {list(want)}; the file is corrupt")

    for n, e in layout.items():
        shape = tuple(e["shape"])
        if e["kind"] == "lora":
            need(f"{n}.lora_A", (e["rank"], math.prod(shape[1:])))
            need(f"{n}.lora_B", (shape[0], e["rank"]))
            if f"{n}.mask" in shapes:
                need(f"{n}.mask", shape)
        elif f"{n}.index" in shapes:
            idx = shapes[f"{n}.index"]
            if len(idx) != 1 or idx[0] > math.prod(shape):
                raise AdapterFileError(f"{path!r}: index of {n!r} does not fit weight {list(shape)}")
            need(f"{n}.values", idx)
        else:
            need(f"{n}.values", shape)


def _check_strength(path: str, meta: Mapping[str, str]) -> None:
    """The ``strength`` metadata (absent: 1.0) is a finite number within
    :data:`MAX_FILE_STRENGTH`."""
    raw = meta.get("strength", "1.0")
    try:
        s = float(raw)
    except ValueError:
        s = None
    if s is not None and math.isfinite(s) and abs(s) <= MAX_FILE_STRENGTH:
        return
    what = ("is not a number" if s is None else "is not finite" if not math.isfinite(s) else
            f"is outside [-{MAX_FILE_STRENGTH:g}, {MAX_FILE_STRENGTH:g}]")
    raise AdapterFileError(
        f"{path!r}: metadata strength {raw!r} {what}, so the adapter would turn images into "
        "noise (the file was edited or damaged); set its 'strength' metadata back to 1.0 (the "
        "trained update; scale at apply time with ApplyUnlearnAdapter's strength) or re-save the "
        "adapter from its training run")


def _check_finite(path: str, tensors: Mapping[str, Tensor]) -> None:
    """Every floating-point tensor holds only finite values (no NaN, no inf)."""
    for k, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise AdapterFileError(
                f"{path!r}: tensor {k!r} holds {nan} NaN and {inf} inf values, so the adapter "
                "would turn images into noise (training diverged, or the file was edited or "
                "damaged); re-save the adapter from a training run whose loss stayed finite "
                "(lower lr), or re-download the file")


def _check_claimed_size(path: str, layout: Mapping[str, dict]) -> None:
    """Without a UNet: no module may claim more than :data:`MAX_CLAIMED_ELEMENTS` weight
    elements, nor all of them together more than 8x that (a sparse full delta allocates a
    weight-sized mask that no tensor in the file backs)."""
    sizes = {n: math.prod(e["shape"]) for n, e in layout.items()}
    big = [n for n, k in sizes.items() if k > MAX_CLAIMED_ELEMENTS]
    if big or sum(sizes.values()) > 8 * MAX_CLAIMED_ELEMENTS:
        what = (f"module {big[0]!r} claims a weight of {layout[big[0]]['shape']}" if big else
                f"its {len(sizes)} modules claim {sum(sizes.values())} weight elements")
        raise AdapterFileError(f"{path!r}: {what}, more than any diffusion UNet has; pass "
                               "unet=... to check it against the model")


def load_adapter(path: str, unet: nn.Module | None = None, strict: bool = True) -> UnlearnAdapter:
    """Load an adapter; with ``unet`` (the model it edits: the UNet, or a text-encoder adapter's
    text encoder; or their denoiser), check its layers and (``strict``) its fingerprint.

    The metadata is checked against the file's tensor shapes and against ``unet`` (without one:
    no module may claim more than :data:`MAX_CLAIMED_ELEMENTS` weight elements) before any
    tensor is read or allocated, so a crafted file cannot make it allocate arbitrary memory. A
    file whose ``strength`` metadata is not finite or beyond :data:`MAX_FILE_STRENGTH`, or whose
    tensors hold NaN or inf, is refused (AdapterFileError naming the file and the fix) before an
    adapter is built, so nothing it holds is ever applied."""
    shapes, meta = read_safetensors_header(path)
    if meta.get("format") != FORMAT or "modules" not in meta:
        raise AdapterFileError(f"{path!r} is not a SPARE adapter (format={meta.get('format')!r}); "
                               "a ComfyUI/kohya LoRA loads with LoraLoader instead")
    layout = _layout(path, meta)
    _check_strength(path, meta)
    _check_layout_against_file(path, layout, shapes)
    root = meta.get("root", UNET)
    if root not in ROOTS:
        raise AdapterFileError(f"{path!r}: metadata root {root!r} is none of {list(ROOTS)}; the "
                               "file was edited or damaged: re-save the adapter with save_adapter")
    if unet is not None:
        unet = adapted_network(unet, root)  # what the adapter's names address
        try:
            check_shapes_fit({n: tuple(e["shape"]) for n, e in layout.items()}, unet)
        except ValueError as e:
            hint = (" (it edits a CLIP text encoder's first block: pass the text encoder, or "
                    "the denoiser)" if root != UNET else "")
            raise ModelMismatchError(f"{e}; load the checkpoint it was trained on{hint}") from e
    else:
        _check_claimed_size(path, layout)
    tensors, meta = read_safetensors(path)
    _check_finite(path, tensors)
    try:
        adapter = UnlearnAdapter.from_tensors(tensors, meta)
    except (KeyError, ValueError) as e:
        raise AdapterFileError(f"{path!r}: {e}") from e
    if unet is not None:
        want = meta.get("base_model_fingerprint")
        if strict and want and want != model_fingerprint(unet, adapter.names):
            raise ModelMismatchError(
                f"adapter was made for a different model (fingerprint {want}, this model "
                f"{model_fingerprint(unet, adapter.names)}); load the checkpoint it was trained on, "
                "or pass strict=False to apply it anyway")
    return adapter
