"""SaveUnlearnAdapter / LoadUnlearnAdapter: adapters as files under ComfyUI's models/loras.

A save writes two ``.safetensors`` files, each atomically (temporary file + rename):
``<prefix>_00001_.safetensors``, a LoRA in ComfyUI's key format that the stock LoraLoader (and
A1111/Forge) load, and ``<prefix>_00001_.spare.safetensors``, spare_core's native format (A, B,
masks) that LoadUnlearnAdapter reads back for further training or ApplyUnlearnAdapter.
"""
from __future__ import annotations

import os

from spare_core import __version__
from spare_core.export import to_comfy_lora
from spare_core.files import AdapterFileError, atomic_save_safetensors, load_adapter, save_adapter

from . import comfy_bridge as bridge
from .adapter_nodes import require_adapter
from .common import ADAPTER, CATEGORY

LORA_META_KEYS = ("concept", "surrogate", "method", "objective", "rank", "sparsity", "steps",
                  "base_model_fingerprint")


def _outside(prefix: str) -> str:
    return (f"filename_prefix {prefix!r} points outside models/loras, and ComfyUI saves only "
            "inside that folder: use a relative name without '..', such as "
            "'spare/erased_concept' (subfolders are created)")


def check_prefix(prefix: str) -> None:
    """ValueError for a prefix that ComfyUI's ``folder_paths.get_save_image_path`` would place
    outside the loras folder (absolute, or climbing out with ``..``) or that names no file."""
    text = prefix.strip()
    if not text:
        return  # the bridge names that one ("filename prefix is empty")
    norm = os.path.normpath(text)
    if os.path.isabs(text) or norm.startswith(os.pardir + os.sep):
        raise ValueError(_outside(prefix))
    if os.path.basename(norm) in ("", os.curdir, os.pardir):
        raise ValueError(f"filename_prefix {prefix!r} names no file: end it with a name, such as "
                         "'spare/erased_concept'")


class SaveUnlearnAdapter:
    """Saves the adapter into models/loras: a ComfyUI LoRA (pick it in LoraLoader) and, with
    ``keep_native``, the native adapter next to it (pick it in LoadUnlearnAdapter)."""

    DESCRIPTION = __doc__
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("lora_name",)
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "adapter": (ADAPTER, {"tooltip": "The trained adapter."}),
                "filename_prefix": ("STRING", {
                    "default": "spare/erased_concept",
                    "tooltip": "Path under models/loras (relative, no '..'); a counter is appended."}),
                "keep_native": ("BOOLEAN", {"default": True,
                                            "tooltip": "Also write the native .spare.safetensors file."}),
            }
        }

    def save(self, adapter, filename_prefix: str, keep_native: bool) -> dict:
        adapter = require_adapter(adapter)
        check_prefix(filename_prefix)
        try:
            lora_path, native_path, lora_name = bridge.next_save_paths(filename_prefix)
        except Exception as e:  # folder_paths.get_save_image_path's own check, a plain Exception
            if "outside the output folder" not in str(e):
                raise
            raise ValueError(_outside(filename_prefix)) from e
        meta = {k: adapter.meta[k] for k in LORA_META_KEYS if adapter.meta.get(k)}
        meta.update(format="comfy_lora", spare_core_version=__version__)
        if keep_native:
            save_adapter(adapter, native_path)
            meta["spare_native"] = os.path.basename(native_path)
        try:
            atomic_save_safetensors(to_comfy_lora(adapter), lora_path, meta)
        except BaseException:
            if keep_native and os.path.exists(native_path):
                os.remove(native_path)  # never leave half a pair behind
            raise
        return {"ui": {"text": [lora_name]}, "result": (lora_name,)}


class LoadUnlearnAdapter:
    """Loads a native adapter (``*.spare.safetensors``) saved by SaveUnlearnAdapter."""

    DESCRIPTION = __doc__
    CATEGORY = CATEGORY
    RETURN_TYPES = (ADAPTER,)
    RETURN_NAMES = ("adapter",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"adapter_name": (bridge.list_adapters(), {
            "tooltip": "Native adapters in models/loras (saved with keep_native)."})}}

    @classmethod
    def IS_CHANGED(cls, adapter_name: str) -> str:
        try:
            path = bridge.adapter_path(adapter_name)
        except ValueError:
            return ""
        return f"{os.path.getmtime(path)}:{os.path.getsize(path)}"

    def load(self, adapter_name: str) -> tuple:
        path = bridge.adapter_path(adapter_name)
        try:
            with bridge.autograd_enabled():  # trainable tensors, not inference tensors
                return (load_adapter(path),)
        except AdapterFileError as e:
            raise ValueError(f"{e}. Pick a .spare.safetensors file written by SaveUnlearnAdapter") from e
