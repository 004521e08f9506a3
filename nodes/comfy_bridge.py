"""The one module of the pack that touches ComfyUI (``comfy.*`` and ``folder_paths``).

Every ComfyUI import happens inside a function, so the pack (and spare_core) imports without a
ComfyUI on the path; node modules call only what is defined here. What each piece uses:

- MODEL (``comfy.model_patcher.ModelPatcher``): ``.model.diffusion_model`` (the UNet whose
  Linear/Conv2d weights the engine edits), ``.model.model_type``, ``.model.latent_format``,
  ``.model.get_dtype()`` / ``.model.manual_cast_dtype``, ``.get_model_object("model_sampling")``
  (``.sigmas`` of ModelSamplingDiscrete), ``.backup`` (original weights while another clone's
  patches are in the shared module), ``.clone()``, ``.add_patches()`` with ``("diff", (delta,))``.
- CLIP (``comfy.sd.CLIP``): ``.tokenize(text)``, ``.encode_from_tokens(tokens)`` (as CLIPTextEncode).
- ``comfy.model_management``: ``load_models_gpu([model], force_full_load=True)`` (as TrainLoraNode),
  ``throw_exception_if_processing_interrupted()`` (the interrupt button),
  ``get_free_memory(device)`` (to refuse a full-weight run that cannot fit, before any work).
- ``comfy.utils.ProgressBar``: the node's progress bar.
- ``folder_paths``: ``get_folder_paths("loras")``, ``get_full_path``, ``get_filename_list``,
  ``get_save_image_path`` (the counter-suffixed names SaveImage and SaveLoRA use).
"""
from __future__ import annotations

import hashlib
import math
import os
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from spare_core.denoiser import TRAIN_DTYPES, v_to_eps_and_x0
from spare_core.families.unet import adaptable_modules

NATIVE_SUFFIX = ".spare.safetensors"
"""Adapters in spare_core's native format sit next to their ComfyUI LoRA with this suffix."""

SUPPORTED_MODEL_TYPES = ("EPS", "V_PREDICTION")


# ---------------------------------------------------------------- host calls
def check_interrupt() -> None:
    """Raise ComfyUI's InterruptProcessingException if the user pressed Cancel."""
    import comfy.model_management as mm
    mm.throw_exception_if_processing_interrupted()


def should_stop() -> bool:
    """For spare_core's ``should_stop=``: raises the host's interrupt exception itself, so ComfyUI
    reports a cancelled run (not an error); returns False otherwise."""
    check_interrupt()
    return False


class Progress:
    """One ComfyUI progress bar over ``total`` units, fed by several phases; every update also
    honours the interrupt button."""

    def __init__(self, total: int) -> None:
        import comfy.utils
        self.total = max(int(total), 1)
        self.bar = comfy.utils.ProgressBar(self.total)

    def phase(self, start: int, span: int) -> Callable[..., None]:
        """Callback ``(done, total, *extra)`` mapping a phase's own count onto
        ``[start, start + span]`` of the bar."""
        def update(done: int, total: int, *_: object) -> None:
            check_interrupt()
            value = start + round(span * int(done) / max(int(total), 1))
            self.bar.update_absolute(min(value, self.total), self.total)
        return update


@contextmanager
def autograd_enabled() -> Iterator[None]:
    """ComfyUI runs every node under ``torch.inference_mode()``; training needs it off."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


# ---------------------------------------------------------------- the MODEL
def diffusion_model(model) -> nn.Module:
    """The UNet module of a MODEL (shared by all its clones)."""
    return model.model.diffusion_model


def check_supported(model) -> None:
    """ValueError unless MODEL is an eps/v-prediction UNet with text cross-attention only,
    computed in a dtype the engine trains in."""
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "diffusion_model"):
        raise ValueError("the MODEL input is not a ComfyUI diffusion model; connect the MODEL "
                         "output of a checkpoint loader")
    kind = getattr(getattr(base, "model_type", None), "name", str(getattr(base, "model_type", "?")))
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"this MODEL predicts {kind}; the SPARE nodes support eps and v-prediction "
                         "UNets (SD1.x, SD2.x): load one of those checkpoints")
    if getattr(base.diffusion_model, "num_classes", None) is not None:
        raise ValueError("this MODEL needs pooled/size conditioning (SDXL-style); the SPARE nodes "
                         "support SD1.x/SD2.x UNets with text cross-attention only")
    sampling = model.get_model_object("model_sampling")
    if getattr(sampling, "sigmas", None) is None:
        raise ValueError(f"{type(sampling).__name__} has no discrete sigmas; the SPARE nodes need "
                         "a discrete DDPM-trained model (SD1.x, SD2.x)")
    compute_dtype(model)


def check_inputs(model, clip, width: int, height: int) -> None:
    """Everything ComfyDenoiser needs, checked before any loading or generation."""
    check_supported(model)
    if clip is None:
        raise ValueError("the CLIP input is empty: connect the CLIP output of the checkpoint "
                         "loader (this checkpoint has no text encoder)")
    if width % 8 or height % 8 or width < 8 or height < 8:
        raise ValueError(f"width and height must be positive multiples of 8, got {width}x{height}")


def alphas_cumprod(model) -> Tensor:
    """``[T]`` float32 from ModelSamplingDiscrete: ``sigma^2 = (1 - a) / a``."""
    sigmas = model.get_model_object("model_sampling").sigmas.detach().float().cpu()
    return 1.0 / (1.0 + sigmas ** 2)


def compute_dtype(model) -> torch.dtype:
    """The dtype ``BaseModel.apply_model`` runs the UNet in: ComfyUI's manual-cast dtype when the
    weights are stored in one the device cannot compute in (fp8 -> bf16/fp16), else the weights'
    own. ValueError, naming the fix, for one the engine cannot train in."""
    cast = getattr(model.model, "manual_cast_dtype", None)
    dtype = cast if cast is not None else model.model.get_dtype()
    if dtype not in TRAIN_DTYPES:
        raise ValueError(f"this MODEL computes in {dtype} (its weights are stored so and ComfyUI "
                         "does not cast them); load it with weight_dtype 'default' (or a fp16/bf16 "
                         "checkpoint) to unlearn")
    return dtype


def free_memory(model) -> int:
    """Bytes free on the device the MODEL computes on (``get_free_memory``, as ComfyUI's own
    loaders decide how much of a model fits)."""
    import comfy.model_management as mm
    return int(mm.get_free_memory(model.load_device))


def highest_children_with_forward(module: nn.Module) -> list[nn.Module]:
    """The outermost submodules that are not mere containers (ModuleList / Sequential /
    ModuleDict), as ComfyUI's TrainLoraNode picks what to checkpoint
    (comfy_extras/nodes_train.py, find_all_highest_child_module_with_forward). Re-implemented:
    importing comfy_extras from a custom node pulls the host's training node module."""
    out = []
    for child in module.children():
        if isinstance(child, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
            out += highest_children_with_forward(child)
        else:
            out.append(child)
    return out


def set_gradient_checkpointing(unet: nn.Module, enabled: bool) -> None:
    """Wrap (or unwrap) the forward of each of the UNet's outermost blocks in
    ``torch.utils.checkpoint`` (non-reentrant), as TrainLoraNode does; idempotent."""
    import torch.utils.checkpoint as ckpt

    for m in highest_children_with_forward(unet):
        wrapped = "_spare_forward" in m.__dict__
        if enabled and not wrapped:
            original = m.forward

            def forward(*args, _f=original, **kwargs):
                if not torch.is_grad_enabled():  # teacher / sampling: nothing to save
                    return _f(*args, **kwargs)
                return ckpt.checkpoint(lambda a, k: _f(*a, **k), args, kwargs, use_reentrant=False)

            m._spare_forward = original
            m.forward = forward
        elif not enabled and wrapped:
            del m.forward  # back to the class's forward
            del m._spare_forward


def load_for_compute(model) -> nn.Module:
    """Put MODEL (with its own patches, e.g. a LoRA) into the shared UNet as TrainLoraNode does,
    and make its parameters usable by autograd. Call inside :func:`autograd_enabled`."""
    import comfy.model_management as mm
    mm.load_models_gpu([model], force_full_load=True)
    unet = diffusion_model(model)
    _normalize_inference_params(unet)
    return unet


def _normalize_inference_params(module: nn.Module) -> None:
    """Checkpoints load under inference mode, so their weights are inference tensors, which
    autograd can't save for backward. Swap each for a bit-identical normal tensor, once
    (idempotent; outputs are unchanged)."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_inference():
                m._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_inference():
                m._buffers[name] = b.clone()


def _base_weight(model, name: str) -> Tensor:
    """Weight of module ``name`` as in the checkpoint, even while another clone's patches are in
    the shared UNet (ModelPatcher.backup keeps the originals then)."""
    key = f"diffusion_model.{name}.weight"
    saved = model.backup.get(key)
    if saved is not None:
        return saved.weight
    return adaptable_modules(diffusion_model(model))[name].weight


def fingerprint(model, names: Sequence[str] | None = None) -> str:
    """spare_core.files.model_fingerprint of the checkpoint's own weights (same algorithm: names,
    shapes and the first 64 values in fp16 of each Linear/Conv2d weight)."""
    mods = adaptable_modules(diffusion_model(model))
    h = hashlib.sha256()
    for n in sorted(names if names is not None else mods):
        w = _base_weight(model, n).detach()
        h.update(n.encode())
        h.update(str(tuple(w.shape)).encode())
        h.update(w.flatten()[:64].to("cpu", torch.float16).numpy().tobytes())
    return h.hexdigest()[:16]


def patched_clone(model, deltas: Mapping[str, Tensor], strength: float):
    """A clone of MODEL whose UNet weights get ``W + strength * delta`` (ComfyUI 'diff' patches;
    the input MODEL and its other clones keep their own weights)."""
    clone = model.clone()
    patches = {f"diffusion_model.{n}.weight": ("diff", (d.detach().float().cpu(),))
               for n, d in deltas.items()}
    done = set(clone.add_patches(patches, float(strength)))
    missing = [k for k in patches if k not in done]
    if missing:
        raise ValueError(f"adapter was made for a model with different layers: {missing[0]!r} is "
                         "not in this MODEL; connect the checkpoint the adapter was trained on")
    return clone


class ComfyDenoiser:
    """spare_core's Denoiser over a ComfyUI MODEL + CLIP (SD1.x/SD2.x UNets).

    ``eps`` calls the UNet as ``BaseModel.apply_model`` does, but with the variance-preserving
    input ``x_t`` and integer timesteps, so no sigma conversion is needed
    (``x_VP = x_comfy / sqrt(1 + sigma^2)``, ``t`` is ModelSamplingDiscrete's timestep).
    Context lengths: prompts over 77 tokens give longer contexts; like ComfyUI's
    CONDCrossAttn.concat every context is repeated to a common length, which leaves
    cross-attention unchanged. ``prompts`` names every prompt the run will encode.
    Construct it (which encodes every prompt with CLIP) before :func:`load_for_compute`, so
    ComfyUI never unloads part of the UNet to make room for CLIP after it was loaded for
    compute; run it inside :func:`autograd_enabled`.
    """

    def __init__(self, model, clip, width: int, height: int, prompts: Sequence[str] = ()) -> None:
        check_inputs(model, clip, width, height)
        self.model, self.clip = model, clip
        self.unet = diffusion_model(model)
        self.alphas_cumprod = alphas_cumprod(model)
        self.latent_shape = (int(model.model.latent_format.latent_channels), height // 8, width // 8)
        self.prediction = model.model.model_type.name
        self.dtype = self.compute_dtype = compute_dtype(model)
        self._cache: dict[str, Tensor] = {}
        lengths = [self._encode_one(p).shape[1] for p in {"", *prompts}]
        self.context_length = math.lcm(*lengths)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward (:func:`set_gradient_checkpointing`)."""
        set_gradient_checkpointing(self.unet, enabled)

    def eps(self, x_t: Tensor, t: Tensor, context: Tensor) -> Tensor:
        return self.predict(x_t, t, context)[0]

    def predict(self, x_t: Tensor, t: Tensor, context: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(eps, x0)``: x0 division-free for v-prediction (spare_core.denoiser.eps_and_x0),
        None for eps models."""
        dev = self.device
        x = x_t.to(dev, self.dtype)
        out = self.unet(x, t.to(dev).float(), context=context.to(dev, self.dtype),
                        control=None, transformer_options={})
        if self.prediction == "V_PREDICTION":
            return v_to_eps_and_x0(out, x, self.alphas_cumprod, t)
        return out, None

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Tensor:
        conds = [self._encode_one(p) for p in prompts]
        for p, c in zip(prompts, conds):
            if self.context_length % c.shape[1]:
                raise RuntimeError(f"prompt {p!r} was not announced to the denoiser; "
                                   "pass every prompt of the run as prompts=")
        return torch.cat([c.repeat(1, self.context_length // c.shape[1], 1) for c in conds])

    def _encode_one(self, prompt: str) -> Tensor:
        if prompt not in self._cache:
            with torch.inference_mode(False), torch.no_grad():
                cond = self.clip.encode_from_tokens(self.clip.tokenize(prompt))
            if isinstance(cond, (tuple, list)):
                cond = cond[0]
            self._cache[prompt] = cond.detach().float().cpu()
        return self._cache[prompt]


def encode_images(model, vae, images: Tensor) -> Tensor:
    """IMAGE ``[B, H, W, C]`` in ``[0, 1]`` -> the latents the MODEL's UNet denoises,
    ``[B, 4, H/8, W/8]`` float32 on the CPU: ``VAE.encode`` (as the VAEEncode node calls it, RGB
    only) then ``BaseModel.process_latent_in`` (the latent format's scaling, as samplers apply)."""
    if vae is None:
        raise ValueError("the VAE input is empty: connect the VAE output of the checkpoint loader")
    if images.ndim != 4 or images.shape[-1] not in (3, 4):
        raise ValueError(f"expected an IMAGE batch [B, H, W, 3], got shape {list(images.shape)}")
    with torch.inference_mode(False), torch.no_grad():
        latent = vae.encode(images[:, :, :, :3])
        return model.model.process_latent_in(latent).detach().float().cpu().clone()


# ---------------------------------------------------------------- files under models/loras
def loras_dir() -> str:
    """The first ``loras`` folder (models/loras by default)."""
    import folder_paths
    return os.path.abspath(folder_paths.get_folder_paths("loras")[0])


def list_adapters() -> list[str]:
    """Native adapter files (``*.spare.safetensors``) in the loras folders, as relative names."""
    import folder_paths
    return sorted(f for f in folder_paths.get_filename_list("loras") if f.endswith(NATIVE_SUFFIX))


def adapter_path(name: str) -> str:
    """Full path of a listed adapter; ValueError naming the fix if it is gone."""
    import folder_paths
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise ValueError(f"adapter file {name!r} is not in the loras folder ({loras_dir()}); "
                         "save one with SaveUnlearnAdapter or refresh the list")
    return path


def next_save_paths(prefix: str) -> tuple[str, str, str]:
    """``(lora_path, native_path, lora_name)`` for a new save: ``<prefix>_00001_.safetensors``
    (ComfyUI LoRA, listed by LoraLoader) and its native sibling, counter as in SaveImage."""
    import folder_paths
    if not prefix or not prefix.strip():
        raise ValueError("filename prefix is empty: type a name such as 'spare/erased_concept'")
    root = loras_dir()
    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(prefix.strip(), root)
    stem = f"{filename}_{counter:05}_"
    lora = os.path.join(folder, stem + ".safetensors")
    native = os.path.join(folder, stem + NATIVE_SUFFIX)
    return lora, native, os.path.relpath(lora, root).replace(os.sep, "/")
