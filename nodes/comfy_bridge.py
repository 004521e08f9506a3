"""The one module of the pack that touches ComfyUI (``comfy.*`` and ``folder_paths``).

Every ComfyUI import happens inside a function, so the pack (and spare_core) imports without a
ComfyUI on the path; node modules call only what is defined here. What each piece uses:

- MODEL (``comfy.model_patcher.ModelPatcher``): ``.model`` (its class name, ``BaseModel`` /
  ``SDXL`` / ``SDXLRefiner`` / ``SD3`` / ``Flux``, says the family), ``.model.diffusion_model``
  (the UNet or DiT whose Linear/Conv2d weights the engine edits), ``.model.model_type``,
  ``.model.latent_format``, ``.model.get_dtype()`` / ``.model.manual_cast_dtype``,
  ``.model.encode_adm(...)`` (SDXL's pooled text + size vector), ``.get_model_object(
  "model_sampling")`` (``.sigmas`` of ModelSamplingDiscrete, or of ModelSamplingDiscreteFlow /
  ModelSamplingFlux with ``.timestep(sigma)``), ``.backup`` (original weights while another
  clone's patches are in the shared module), ``.patches_uuid`` (a clone keeps it, every new
  patch or weight wrapper renews it: whether two MODELs sample alike), ``.clone()``, ``.add_patches()`` with
  ``("diff", (delta,))``, and for weights stored narrower than they compute in (fp8)
  ``.add_weight_wrapper(key, fn)`` (comfy/model_patcher.py: at load, ``fn`` joins the layer's
  ``weight_function`` list, which comfy/ops.py ``cast_bias_weight`` applies to the cast weight;
  ``fn.move_to(device=)`` is called with the model's device).
- CLIP (``comfy.sd.CLIP``): ``.tokenize(text)``, ``.encode_from_tokens(tokens,
  return_pooled=True)`` (as CLIPTextEncode: the sequence and the pooled vector); for UCE's token
  pairing ``.tokenize(text, return_word_ids=True)`` (comfy/sd1_clip.py
  SDTokenizer.tokenize_with_weights: ``(token, weight, word_id)``, word id 0 for the start, end
  and padding tokens), one token list per chunk under each encoder's key. For the prompt
  attack (SD1.x/SD2.x only): ``.cond_stage_model`` (comfy/sd1_clip.py SD1ClipModel, or
  comfy/text_encoders/sd2_clip.py SD2ClipModel: ``.clip`` names the SDClipModel attribute,
  ``clip_l`` / ``clip_h``, ``.clip_name`` the key of ``tokenize``'s dict, ``l`` / ``h``), that
  SDClipModel's ``.special_tokens`` and ``.transformer.get_input_embeddings()`` (the token
  embedding, called once per chunk row by ``SDClipModel.process_tokens``), and ``.tokenizer``
  (SD1Tokenizer / SD2Tokenizer: its SDTokenizer at the same ``.clip`` attribute, which wraps a
  transformers ``CLIPTokenizer`` at ``.tokenizer``).
- ``.model.process_latent_out(x)``: the LATENT a KSampler outputs from the network's latents.
- ``comfy.model_management``: ``load_models_gpu([model], force_full_load=True)`` (as TrainLoraNode),
  ``throw_exception_if_processing_interrupted()`` (the interrupt button),
  ``get_free_memory(device)`` (to refuse a full-weight run that cannot fit, before any work).
- ``comfy.utils.ProgressBar``: the node's progress bar.
- ``folder_paths``: ``get_folder_paths("loras")``, ``get_full_path``, ``get_filename_list``,
  ``get_save_image_path`` (the counter-suffixed names SaveImage and SaveLoRA use).
"""
from __future__ import annotations

import copy
import hashlib
import math
import numbers
import os
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from spare_core.conditioning import Context
from spare_core.denoiser import TRAIN_DTYPES, v_to_eps_and_x0
from spare_core.families.unet import adaptable_modules
from spare_core.probe.text import prefix_injected, whole_word_ids, with_placeholders
from spare_core.process import ForwardProcess

NATIVE_SUFFIX = ".spare.safetensors"
"""Adapters in spare_core's native format sit next to their ComfyUI LoRA with this suffix."""

SUPPORTED_MODEL_TYPES = ("EPS", "V_PREDICTION")
"""Prediction types of the VP families (SD1.x/SD2.x, SDXL) over ModelSamplingDiscrete."""

SUPPORTED = "SD1.x, SD2.x, SDXL, SD3 and Flux"

FAMILIES = {
    # ComfyUI model class (comfy/model_base.py) -> (family, model types it may have)
    "BaseModel": ("sd", SUPPORTED_MODEL_TYPES),
    "SDXL": ("sdxl", SUPPORTED_MODEL_TYPES),
    "SDXLRefiner": ("sdxl", SUPPORTED_MODEL_TYPES),
    "SD3": ("sd3", ("FLOW",)),
    "Flux": ("flux", ("FLUX", "FLOW")),  # dev: FLUX (ModelSamplingFlux); schnell: FLOW
}
"""Families the bridge drives; every other MODEL class is refused naming these."""

FLOW_FAMILIES = ("sd3", "flux")

FLUX_GUIDANCE = 3.5
"""Flux's distilled-guidance value when none is given (the FluxGuidance node's default)."""


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


_SCOPES: list[list[tuple[dict, str, Tensor, Tensor]]] = []  # aliases made in each open scope


@contextmanager
def autograd_enabled() -> Iterator[None]:
    """ComfyUI runs every node under ``torch.inference_mode()``; training needs it off. The
    trainable aliases that :func:`load_for_compute` puts in place of inference weights during
    the scope are taken out at its end: every module gets back its own Parameter and buffer
    objects, so whatever holds them (a model compiled by TorchCompileModel, another extension)
    never sees a stale one."""
    made: list[tuple[dict, str, Tensor, Tensor]] = []
    _SCOPES.append(made)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        del _SCOPES[next(i for i, s in enumerate(_SCOPES) if s is made)]  # by identity
        for table, name, original, alias in reversed(made):
            if table.get(name) is alias:  # the host may have put a patched weight there since
                table[name] = original


# ---------------------------------------------------------------- the MODEL
def diffusion_model(model) -> nn.Module:
    """The UNet module of a MODEL (shared by all its clones)."""
    return model.model.diffusion_model


def model_family(model) -> str:
    """``"sd"`` (SD1.x/SD2.x), ``"sdxl"``, ``"sd3"`` or ``"flux"`` from the MODEL's ComfyUI class
    and prediction type; ValueError naming the supported families for any other MODEL."""
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "diffusion_model"):
        raise ValueError("the MODEL input is not a ComfyUI diffusion model; connect the MODEL "
                         "output of a checkpoint loader")
    cls = type(base).__name__
    kind = getattr(getattr(base, "model_type", None), "name", str(getattr(base, "model_type", "?")))
    if cls not in FAMILIES:
        raise ValueError(f"this MODEL is a {cls} model ({kind}); the SPARE nodes support "
                         f"{SUPPORTED}: load one of those checkpoints")
    family, kinds = FAMILIES[cls]
    if kind not in kinds:
        what = {"sd": "SD1.x/SD2.x UNets with eps and v-prediction",
                "sdxl": "SDXL with eps and v-prediction (not EDM: Playground v2.5, CosXL)",
                "sd3": "SD3 as rectified flow", "flux": "Flux as rectified flow"}[family]
        raise ValueError(f"this {cls} MODEL predicts {kind}; the SPARE nodes support {what} "
                         f"({SUPPORTED}): load one of those checkpoints")
    if family == "sd" and getattr(base.diffusion_model, "num_classes", None) is not None:
        raise ValueError("this MODEL needs class/ADM conditioning that SD1.x/SD2.x UNets do not "
                         f"have; the SPARE nodes support {SUPPORTED}")
    return family


def check_supported(model) -> None:
    """ValueError unless MODEL is one of the supported families (:func:`model_family`) over the
    sampling it was trained with, computed in a dtype the engine trains in."""
    family = model_family(model)
    sampling = model.get_model_object("model_sampling")
    sigmas = getattr(sampling, "sigmas", None)
    if sigmas is None:
        raise ValueError(f"{type(sampling).__name__} has no discrete sigmas; the SPARE nodes need "
                         f"the model's own discrete schedule ({SUPPORTED})")
    if family in FLOW_FAMILIES:
        s = sigmas.detach().float().cpu()
        if (not hasattr(sampling, "timestep") or s.dim() != 1 or float(s[0]) <= 0
                or float(s[-1]) > 1 + 1e-6 or not bool((s[1:] >= s[:-1]).all())):
            raise ValueError(f"{type(sampling).__name__} is not a rectified-flow schedule "
                             "(ascending sigmas in (0, 1]); remove the sampling patch (e.g. a "
                             "ModelSampling node) feeding this MODEL")
    compute_dtype(model)


def check_inputs(model, clip, width: int, height: int) -> None:
    """Everything ComfyDenoiser needs, checked before any loading or generation."""
    check_supported(model)
    if clip is None:
        raise ValueError("the CLIP input is empty: connect the CLIP output of the checkpoint "
                         "loader (this checkpoint has no text encoder)")
    if width % 8 or height % 8 or width < 8 or height < 8:
        raise ValueError(f"width and height must be positive multiples of 8, got {width}x{height}")


def flow_process(model) -> ForwardProcess:
    """The rectified flow of an SD3/Flux MODEL: ``x_t = (1 - s) x0 + s noise`` over its
    sampling's ascending ``sigmas`` (ModelSamplingDiscreteFlow / ModelSamplingFlux, shift
    included), the network fed ``timestep(s)`` (``1000 s`` for SD3, ``s`` for Flux)."""
    sampling = model.get_model_object("model_sampling")
    sigmas = sampling.sigmas.detach().float().cpu()
    return ForwardProcess.flow(sigmas, model_t=sampling.timestep(sigmas).detach().float().cpu())


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
    """Wrap (or unwrap) the forward of each of the network's outermost blocks in
    ``torch.utils.checkpoint`` (non-reentrant), as TrainLoraNode does, each block running on
    copies of its tensor inputs (:func:`_fresh`); idempotent."""
    import torch.utils.checkpoint as ckpt

    for m in highest_children_with_forward(unet):
        wrapped = "_spare_forward" in m.__dict__
        if enabled and not wrapped:
            original = m.forward

            def forward(*args, _f=original, **kwargs):
                if not torch.is_grad_enabled():  # teacher / sampling: nothing to save
                    return _f(*args, **kwargs)
                return ckpt.checkpoint(lambda a, k: _f(*_fresh(a), **dict(zip(k, _fresh(k.values())))),
                                       args, kwargs, use_reentrant=False)

            m._spare_forward = original
            m._spare_own_forward = "forward" in m.__dict__  # set on the instance by someone else
            m.forward = forward
        elif not enabled and wrapped:
            if m.__dict__.pop("_spare_own_forward"):
                m.forward = m._spare_forward  # the instance's own forward, as it was
            else:
                del m.forward  # back to the class's forward
            del m._spare_forward


def _fresh(values) -> list:
    """Copies of the tensors among ``values``: some blocks update an input in place (ComfyUI's
    Flux DoubleStreamBlock: ``txt += ...``), which would change the inputs checkpointing keeps for
    the recomputation, and whether they need gradients, so the recomputed graph would differ."""
    return [v.clone() if isinstance(v, Tensor) else v for v in values]


def load_for_compute(model) -> nn.Module:
    """Put MODEL (with its own patches, e.g. a LoRA) into the shared UNet as TrainLoraNode does,
    and make its parameters usable by autograd. Call inside :func:`autograd_enabled`."""
    import comfy.model_management as mm
    mm.load_models_gpu([model], force_full_load=True)
    unet = diffusion_model(model)
    _normalize_inference_params(unet)
    return unet


def _normal_alias(t: Tensor) -> Tensor:
    """A normal (not inference) tensor on ``t``'s own storage: no copy. An inference tensor
    cannot become a normal one in place (``.data =`` keeps the inference impl) and torch has no
    public view that changes the mode, hence ``set_`` on the storage."""
    alias = torch.empty(0, dtype=t.dtype, device=t.device)
    return alias.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


def _normalize_inference_params(module: nn.Module) -> None:
    """Checkpoints load under inference mode, so their weights are inference tensors, which
    autograd can't save for backward. Put a normal alias of each in its place (same storage,
    so no memory and bit-identical outputs; idempotent); inside :func:`autograd_enabled`, which
    puts the originals back at its end."""
    made = _SCOPES[-1] if _SCOPES else []
    for m in module.modules():
        for table, param in ((m._parameters, True), (m._buffers, False)):
            for name, t in list(table.items()):
                if t is None or not t.is_inference():
                    continue
                alias = _normal_alias(t)
                if param:
                    alias = nn.Parameter(alias, requires_grad=t.requires_grad)
                table[name] = alias
                made.append((table, name, t, alias))


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


def sampling_identity(model, checkpoint: str | None = None) -> str:
    """What a MODEL samples with: its checkpoint's weights (:func:`fingerprint`, or
    ``checkpoint`` where the caller has it already) and its own patches
    (ModelPatcher.patches_uuid, which a clone keeps and every new patch or weight wrapper
    renews). Two MODELs with the same identity generate the same images."""
    return f"{checkpoint or fingerprint(model)}/{getattr(model, 'patches_uuid', '')}"


class AfterCastDelta:
    """A ComfyUI weight wrapper: the layer's weight *after* ComfyUI's manual cast, plus
    ``strength`` x the adapter's delta, in the cast weight's dtype. For weights stored in fp8 a
    'diff' patch would be rounded back to fp8 with the weight (a small erasure survives only as
    rounding noise); this applies it at compute precision, as training computed it. The delta
    module (a LoRA's factors, or a masked dense delta) is kept as trained and formed per call,
    so a LoRA costs its factors' memory, not a dense copy of the layer."""

    def __init__(self, delta: nn.Module, strength: float) -> None:
        self.delta, self.strength = delta, float(strength)

    def move_to(self, device=None) -> int:
        """ComfyUI's hook when the model moves; the bytes now held on ``device``."""
        if device is not None:
            self.delta = self.delta.to(device)
        return sum(t.numel() * t.element_size()
                   for t in (*self.delta.parameters(), *self.delta.buffers()))

    def __call__(self, weight: Tensor) -> Tensor:
        with torch.no_grad():
            d = self.delta.to(weight.device).delta()
        return weight + (self.strength * d).to(weight.dtype)


def patched_clone(model, adapter, strength: float):
    """A clone of MODEL whose UNet weights get ``W + strength * adapter strength * delta``: a
    ComfyUI 'diff' patch where the weight is stored in a dtype that holds the sum, an
    :class:`AfterCastDelta` weight wrapper where it is stored narrower (fp8). The input MODEL and
    its other clones keep their own weights."""
    adapter.check_compatible(diffusion_model(model))  # every module there, same shapes
    narrow = {n for n in adapter.names if _base_weight(model, n).dtype not in TRAIN_DTYPES}
    scale = float(strength) * float(adapter.strength)
    wide = [n for n in adapter.names if n not in narrow]
    patches = {f"diffusion_model.{n}.weight": ("diff", (d.float().cpu(),))
               for n, d in adapter.merged(wide).items()}
    clone = model.clone()
    done = set(clone.add_patches(patches, float(strength)))
    missing = [k for k in patches if k not in done]
    if missing:  # the module exists, but the host keys its weight otherwise
        raise ValueError(f"ComfyUI has no weight {missing[0]!r} in this MODEL; connect the "
                         "checkpoint the adapter was trained on")
    for n in narrow:
        delta = copy.deepcopy(adapter[n]).float().cpu().requires_grad_(False)
        clone.add_weight_wrapper(f"diffusion_model.{n}.weight", AfterCastDelta(delta, scale))
    return clone


class ComfyDenoiser:
    """spare_core's Denoiser over a ComfyUI MODEL + CLIP: SD1.x/SD2.x, SDXL, SD3 and Flux.

    The network is called as ``BaseModel.apply_model`` calls it, on the engine's forward process
    at integer step indices ``t``, so no sigma conversion is needed:

    - SD1.x/SD2.x and SDXL (VP): the variance-preserving input ``x_t`` (``x_VP = x_comfy /
      sqrt(1 + sigma^2)``) and ModelSamplingDiscrete's timestep ``t``; v-prediction is converted
      to eps. ``encode`` gives the text sequence (a tensor); SDXL adds ``y``, the ADM vector
      ``BaseModel.encode_adm`` makes from the pooled text and the image size (as the sampler
      does for CLIPTextEncode's conditioning: size and target size = the latent's, crop 0),
      in a :class:`~spare_core.conditioning.Context`.
    - SD3 and Flux (rectified flow, :func:`flow_process`): ``x_t = (1 - s) x0 + s noise`` is
      ComfyUI's own input for CONST models, the timestep fed is ``model_sampling.timestep(s)``,
      and the raw output is the velocity ``noise - x0`` (ComfyUI's denoised is ``x - s * out``):
      :meth:`pred`. Context extras: ``y`` (pooled text) and, for Flux, ``guidance`` (``guidance``,
      the FluxGuidance value, 3.5 by default).

    Context lengths: prompts over one chunk give longer sequences. For the UNets (SD, SDXL)
    every sequence is repeated to a common length, as ComfyUI's CONDCrossAttn.concat does, which
    leaves cross-attention unchanged. SD3/Flux attend jointly over text and image tokens, so
    ComfyUI never batches conditionings of different lengths for them (CONDRegular); here they
    are zero-padded to the longest, each sample carries its true length (extra ``tokens``) and
    :meth:`pred` runs each length as its own batch, on the unpadded sequence.
    ``prompts`` names every prompt the run will encode. Construct it (which encodes every prompt
    with CLIP) before :func:`load_for_compute`, so ComfyUI never unloads part of the network to
    make room for CLIP after it was loaded for compute; run it inside :func:`autograd_enabled`.
    """

    def __init__(self, model, clip, width: int, height: int, prompts: Sequence[str] = (),
                 guidance: float = FLUX_GUIDANCE) -> None:
        check_inputs(model, clip, width, height)
        self.model, self.clip = model, clip
        self.family = model_family(model)
        self.width, self.height = int(width), int(height)
        self.guidance = float(guidance)
        self.unet = diffusion_model(model)
        self.latent_shape = (int(model.model.latent_format.latent_channels), height // 8, width // 8)
        self.prediction = model.model.model_type.name
        if self.family in FLOW_FAMILIES:
            self.process = flow_process(model)
        else:
            self.alphas_cumprod = alphas_cumprod(model)
            self.process = ForwardProcess.vp(self.alphas_cumprod)
        self.dtype = self.compute_dtype = compute_dtype(model)
        self._cache: dict[str, tuple[Tensor, dict[str, Tensor]]] = {}
        lengths = [self._encode_one(p).shape[1] for p in {"", *prompts}]
        self.context_length = (max(lengths) if self.family in FLOW_FAMILIES
                               else math.lcm(*lengths))

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward (:func:`set_gradient_checkpointing`)."""
        set_gradient_checkpointing(self.unet, enabled)

    def eps(self, x_t: Tensor, t: Tensor, context) -> Tensor:
        return self.predict(x_t, t, context)[0]

    def predict(self, x_t: Tensor, t: Tensor, context) -> tuple[Tensor, Tensor | None]:
        """``(eps, x0)``: x0 division-free for v-prediction (spare_core.denoiser.eps_and_x0) and
        for flow models (``x_t - s v``), None for eps models."""
        dev = self.device
        x = x_t.to(dev, self.dtype)
        if self.family in FLOW_FAMILIES:
            return self.process.eps_and_x0(self.pred(x_t, t, context), x, t)
        if self.family == "sdxl":
            c = context.to(dev, self.dtype)
            out = self.unet(x, t.to(dev).float(), context=c.seq, y=c.field("y"),
                            control=None, transformer_options={})
        else:
            out = self.unet(x, t.to(dev).float(), context=context.to(dev, self.dtype),
                            control=None, transformer_options={})
        if self.prediction == "V_PREDICTION":
            return v_to_eps_and_x0(out, x, self.alphas_cumprod, t)
        return out, None

    def pred(self, x_t: Tensor, t: Tensor, context) -> Tensor:
        """The network's prediction in its process's space: the velocity for SD3/Flux (the raw
        output, as ``BaseModel._apply_model`` gets it before ``calculate_denoised``), the noise
        for the VP families."""
        if self.family not in FLOW_FAMILIES:
            return self.eps(x_t, t, context)
        dev = self.device
        x = x_t.to(dev, self.dtype)
        mt = self.process.model_t[t.long().cpu()].to(dev)  # float32, as apply_model feeds it
        c = context.to(dev, self.dtype)
        tokens = c.field("tokens")
        lengths = tokens.unique().tolist()
        if len(lengths) == 1:
            return self._flow_forward(x, mt, c, int(lengths[0]))
        out = torch.empty_like(x)
        for n in lengths:  # ComfyUI runs conditionings of different lengths as separate batches
            idx = (tokens == n).nonzero().flatten()
            out = out.index_put((idx,), self._flow_forward(x[idx], mt[idx], c[idx], int(n)))
        return out

    def _flow_forward(self, x: Tensor, mt: Tensor, c: Context, length: int) -> Tensor:
        kwargs = {"guidance": c.field("guidance")} if self.family == "flux" else {}
        return self.unet(x, mt, context=c.seq[:, :length], y=c.field("y"), control=None,
                         transformer_options={}, **kwargs)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]):
        """SD1.x/SD2.x: the text sequences ``[B, L, D]``; SDXL, SD3, Flux: a Context with the
        fields named in the class docstring."""
        encoded = [self._encoded(p) for p in prompts]
        flow = self.family in FLOW_FAMILIES
        for p, (seq, _) in zip(prompts, encoded):
            n = seq.shape[1]
            if (n > self.context_length) if flow else (self.context_length % n):
                raise RuntimeError(f"prompt {p!r} was not announced to the denoiser; "
                                   "pass every prompt of the run as prompts=")
        if flow:
            L = self.context_length
            seq = torch.cat([torch.nn.functional.pad(s, (0, 0, 0, L - s.shape[1]))
                             for s, _ in encoded])
        else:
            seq = torch.cat([s.repeat(1, self.context_length // s.shape[1], 1) for s, _ in encoded])
        if self.family == "sd":
            return seq
        extras = {k: torch.cat([e[k] for _, e in encoded]) for k in encoded[0][1]}
        return Context(seq, extras)

    def _encode_one(self, prompt: str) -> Tensor:
        """The text sequence ``[1, L, D]`` of one prompt, float32 on the CPU (cached with its
        extras: :meth:`_encoded`)."""
        return self._encoded(prompt)[0]

    def _encoded(self, prompt: str) -> tuple[Tensor, dict[str, Tensor]]:
        """``(sequence [1, L, D], extras)`` of one prompt, float32 on the CPU (cached)."""
        if prompt not in self._cache:
            with torch.inference_mode(False), torch.no_grad():
                tokens = self.clip.tokenize(prompt)
                if self.family == "sd":
                    cond, pooled = self.clip.encode_from_tokens(tokens), None
                else:
                    cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
                if isinstance(cond, (tuple, list)):
                    cond = cond[0]
                extras = self._extras(cond, pooled)
            self._cache[prompt] = (cond.detach().float().cpu(), extras)
        return self._cache[prompt]

    def last_word_index(self, prompt: str) -> int | None:
        """Position of the prompt's last word token in the sequence :meth:`encode` gives it (the
        start token at 0; the empty prompt's is 0), counted as CLIPTextEncode tokenizes:
        ``CLIP.tokenize(prompt, return_word_ids=True)``, chunks laid end to end, the last token
        with a word id. Where :meth:`encode` repeats the sequence to the run's length, the
        position is in the last repetition, so the tail from it is the prompt's own. SDXL's two
        encoders (keys ``l``, ``g``) share positions, their sequences joined along features;
        None for SD3/Flux, whose encoders are joined along tokens."""
        if self.family in FLOW_FAMILIES:
            return None
        found = {}
        for key, chunks in self.clip.tokenize(prompt, return_word_ids=True).items():
            flat = [tok for chunk in chunks for tok in chunk]
            if any(len(tok) < 3 for tok in flat):
                raise ValueError(f"this CLIP's tokenizer gives no word ids for {key!r}; connect "
                                 "the CLIP output of a checkpoint loader")
            found[key] = max((i for i, tok in enumerate(flat) if tok[2]), default=0)
        if len(set(found.values())) != 1:
            raise ValueError(f"this CLIP's encoders put the last word of {prompt!r} at different "
                             f"positions ({found}); connect the CLIP of the same checkpoint")
        index = next(iter(found.values()))
        length = self._encoded(prompt)[0].shape[1]
        return (self.context_length // length - 1) * length + index

    def _extras(self, cond: Tensor, pooled: Tensor | None) -> dict[str, Tensor]:
        if self.family == "sd":
            return {}
        if pooled is None:
            raise ValueError("this CLIP gives no pooled output, which this MODEL needs; connect "
                             "the CLIP of the same checkpoint (or the matching CLIP loader)")
        pooled = pooled.detach().float().cpu()
        if self.family == "sdxl":
            w, h = self.width, self.height
            adm = self.model.model.encode_adm(pooled_output=pooled, width=w, height=h,
                                              crop_w=0, crop_h=0, target_width=w,
                                              target_height=h)
            return {"y": adm.detach().float().cpu()}
        extras = {"y": pooled, "tokens": torch.tensor([cond.shape[1]])}
        if self.family == "flux":
            extras["guidance"] = torch.tensor([self.guidance])
        return extras

    def prompt_access(self) -> "ComfyPromptAccess":
        """spare_core.probe's differentiable prompt access over this CLIP (SD1.x/SD2.x only:
        :func:`check_prompt_attack`), contexts shaped as :meth:`encode` gives them."""
        check_prompt_attack(self.model)
        return ComfyPromptAccess(self.clip, self.context_length, self.model)


# ---------------------------------------------------------------- the prompt attack's CLIP
PROBE_SUPPORTED = "the adversarial probe supports SD1.x/SD2.x checkpoints (one CLIP)"


def check_prompt_attack(model, clip=None, prompts: Sequence[str] = (), tokens: int = 0) -> None:
    """ValueError, before any work, unless the prompt attack can run: an SD1.x/SD2.x MODEL (one
    CLIP text encoder; SDXL, SD3 and Flux condition on several), and with ``clip``, a CLIP laid
    out as ComfyUI's SD1.x/SD2.x one whose first chunk holds each prompt plus ``tokens``."""
    family = model_family(model)
    if family != "sd":
        raise ValueError(f"this MODEL is {type(model.model).__name__} ({family}); "
                         f"{PROBE_SUPPORTED}; SDXL, SD3 and Flux read several text encoders: "
                         "probe an SD1.x/SD2.x checkpoint (the erasure nodes themselves take "
                         f"{SUPPORTED})")
    if clip is not None:
        access = ComfyPromptAccess(clip)
        for p in prompts:
            access.tokens(p, tokens)


@contextmanager
def _inputs_copied(module: nn.Module) -> Iterator[None]:
    """While open, every leaf module of ``module`` runs on copies of its tensor inputs that need
    gradients. ComfyUI's CLIP layers add their residuals in place (comfy/clip_model.py
    CLIPLayer: ``x += self.self_attn(self.layer_norm1(x), ...)``), which changes the input the
    LayerNorm saved for backward; on a copy, backward gets what the forward saw."""
    def copy(value):
        return value.clone() if isinstance(value, Tensor) and value.requires_grad else value

    def hook(_module, args, kwargs):
        return tuple(copy(a) for a in args), {k: copy(v) for k, v in kwargs.items()}

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True)
               for m in module.modules() if next(m.children(), None) is None]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class ComfyPromptAccess:
    """spare_core.probe.text.PromptAccess over ComfyUI's SD1.x (CLIP-L) / SD2.x (OpenCLIP-H)
    CLIP: the token table is the SDClipModel's input embedding; ``encode`` tokenizes as
    CLIPTextEncode does, puts ``k`` placeholders (the start token) right after the start token
    of the first chunk (77 tokens kept: the last ``k`` pads drop out; a prompt that would lose
    tokens is refused), and encodes with ``CLIP.encode_from_tokens`` (clip skip, weights and
    embeddings as ComfyUI applies them) while a hook on the embedding puts the prefix in place
    of the placeholders (and the layers run on copies of their inputs: :func:`_inputs_copied`).
    Gradients reach the prefix, never the CLIP's weights (frozen). With ``model`` (the MODEL
    whose network computes on these contexts: the attack runs inside training), its full load is
    re-asserted after every encode: ComfyUI loads CLIP for ``encode_from_tokens`` and may unload
    part of the network to make room (a no-op when nothing was unloaded)."""

    def __init__(self, clip, context_length: int | None = None, model=None) -> None:
        stage = getattr(clip, "cond_stage_model", None)
        name = getattr(stage, "clip", None)
        encoder = getattr(stage, name, None) if isinstance(name, str) else None
        tokenizer = getattr(getattr(clip, "tokenizer", None), name or "", None)
        if encoder is None or tokenizer is None or name not in ("clip_l", "clip_h"):
            raise ValueError(f"this CLIP is not the one CLIP of an SD1.x/SD2.x checkpoint; "
                             f"{PROBE_SUPPORTED}: connect the CLIP output of the same "
                             "checkpoint loader as the MODEL")
        self.clip, self.key, self.encoder, self.model = clip, stage.clip_name, encoder, model
        self.embedding = encoder.transformer.get_input_embeddings()
        self.tokenizer = tokenizer.tokenizer
        self.special = dict(encoder.special_tokens)
        self.context_length = context_length

    def table(self) -> tuple[Tensor, Tensor]:
        """The embedding ``[V, D]`` and the whole-word tokens (``whole_word_ids``: the found
        prompt then types back to the attacked tokens), start/end/pad left out."""
        weight = self.embedding.weight.detach()
        special = {int(self.special[k]) for k in ("start", "end", "pad") if k in self.special}
        ids = [i for i in whole_word_ids(self.tokenizer, weight.shape[0]).tolist()
               if i not in special]
        return weight, torch.tensor(ids, dtype=torch.long, device=weight.device)

    def tokens(self, prompt: str, k: int) -> dict:
        """``CLIP.tokenize(prompt)`` with ``k`` placeholders after the start token (one chunk)."""
        tokens = self.clip.tokenize(prompt)
        chunks = tokens[self.key]
        row = chunks[0]
        if len(chunks) > 1:
            raise ValueError(f"prompt {prompt!r} fills more than one {len(row)}-token CLIP "
                             f"chunk; the attack puts its {k} tokens into the first: use a "
                             "shorter prompt")
        end = self.special.get("end", self.special.get("pad"))
        n = next((i + 1 for i, (t, *_) in enumerate(row)
                  if i and isinstance(t, numbers.Integral) and int(t) == end), len(row))
        try:
            order = with_placeholders(torch.arange(len(row))[None], k, torch.tensor([n]), len(row))
        except ValueError as e:
            raise ValueError(f"prompt {prompt!r}: {e}") from None
        return {**tokens, self.key: [[row[i] for i in order[0].tolist()]]}

    def encode(self, prefix: Tensor, prompts: Sequence[str]) -> Tensor:
        k, start = prefix.shape[1], int(self.special["start"])
        out = []
        with torch.inference_mode(False), torch.enable_grad():
            _normalize_inference_params(self.encoder)  # CLIP loads under inference mode too
            for i, p in enumerate(prompts):
                row = prefix[i:i + 1] if prefix.shape[0] > 1 else prefix
                tokens = self.tokens(p, k)
                # only rows holding the placeholders (the start id): process_tokens embeds every
                # chunk row in its own call, including the empty-prompt row that
                # ClipTokenWeightEncoder adds for a prompt with (word:1.2) weights
                with prefix_injected(self.embedding, row, 1, start), _inputs_copied(self.encoder):
                    cond = self.clip.encode_from_tokens(tokens)
                out.append((cond[0] if isinstance(cond, (tuple, list)) else cond).float())
            seq = torch.cat(out)
            if self.model is not None:  # CLIP was loaded for that: the network comes back whole
                load_for_compute(self.model)
        if self.context_length:  # as ComfyDenoiser.encode: repeated to the run's length
            seq = seq.repeat(1, self.context_length // seq.shape[1], 1)
        return seq

    def token_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    @property
    def end_id(self) -> int:
        return int(self.special.get("end", self.special.get("pad")))

    def text(self, ids: Sequence[int]) -> str:
        """The tokens' words as ComfyUI reads a typed prompt: parentheses escaped (``\\(``), which
        CLIPTextEncode would otherwise take for ``(word:weight)`` emphasis."""
        words = self.tokenizer.decode([int(i) for i in ids]).strip()
        return words.replace("(", "\\(").replace(")", "\\)")


def latent_output(model, latents: Tensor) -> dict:
    """The LATENT a KSampler on MODEL would output for the network's latents ``[B, C, H, W]``
    (``BaseModel.process_latent_out``: the latent format's scaling undone), on the CPU."""
    with torch.inference_mode(False), torch.no_grad():
        samples = model.model.process_latent_out(latents.detach().float().cpu())
        return {"samples": samples.clone()}


def encode_images(model, vae, images: Tensor) -> Tensor:
    """IMAGE ``[B, H, W, C]`` in ``[0, 1]`` -> the latents the MODEL's network denoises,
    ``[B, C, H/8, W/8]`` (C = 4, or 16 for SD3/Flux) float32 on the CPU: ``VAE.encode`` (as the VAEEncode node calls it, RGB
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
