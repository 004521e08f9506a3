"""What the rectified-flow families (SD3, Flux, digits-dit) share: the forward process built
from a ``FlowMatchEulerDiscreteScheduler``'s config, and a diffusers-transformer backend whose
subclasses only say how to call their network and how to encode prompts."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..conditioning import Context
from ..denoiser import check_compute_dtype
from ..process import ForwardProcess


def flow_process(scheduler, image_seq_len: int | None = None,
                 model_t_scale: float = 1000.0) -> ForwardProcess:
    """The model's training sigmas as a :class:`ForwardProcess` over T =
    ``num_train_timesteps`` indices: ``s_i = (i + 1) / T`` shifted as the scheduler shifts them
    (static ``shift``, or Flux's resolution-dependent ``mu`` when ``use_dynamic_shifting``, for
    ``image_seq_len`` image tokens); the network is fed ``model_t_scale * s``."""
    cfg = scheduler.config
    T = int(cfg.num_train_timesteps)
    s = torch.arange(1, T + 1, dtype=torch.float64) / T
    if getattr(cfg, "use_dynamic_shifting", False):
        if image_seq_len is None:
            raise ValueError("this scheduler shifts sigmas by resolution: give image_seq_len")
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        mu = calculate_shift(image_seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len,
                             cfg.base_shift, cfg.max_shift)
        s = scheduler.time_shift(mu, 1.0, s)
    else:
        shift = float(cfg.shift)
        s = shift * s / (1 + (shift - 1) * s)
    return ForwardProcess.flow(s, (s * model_t_scale).float())


class FlowTransformerDenoiser:
    """Base of the diffusers DiT backends: ``pred`` is the velocity, ``eps`` the noise derived
    from it (``x_t + alpha v``), ``predict`` gives both with ``x0 = x_t - sigma v``.

    Subclasses set ``unet`` (the transformer), ``process``, ``latent_shape``, ``compute_dtype``
    and ``_encode`` (prompts -> :class:`Context`), and implement ``_forward``."""

    unet: nn.Module
    process: ForwardProcess
    latent_shape: tuple[int, int, int]
    compute_dtype: torch.dtype
    _encode: Callable[[Sequence[str]], Context]

    def _setup_dtype(self, compute_dtype: torch.dtype | None) -> None:
        storage = next(self.unet.parameters()).dtype
        self.compute_dtype = check_compute_dtype(compute_dtype or storage, storage)

    def _forward(self, x: Tensor, model_t: Tensor, ctx: Context) -> Tensor:
        raise NotImplementedError

    def pred(self, x_t: Tensor, t: Tensor, context: Context) -> Tensor:
        """Velocity ``[B, C, H, W]`` at step indices ``t`` ``[B]``."""
        x = x_t.to(self.compute_dtype)
        mt = self.process.model_t.to(x.device)[t.to(x.device).long()].to(self.compute_dtype)
        return self._forward(x, mt, context.to(x.device, self.compute_dtype))

    def eps(self, x_t: Tensor, t: Tensor, context: Context) -> Tensor:
        return self.predict(x_t, t, context)[0]

    def predict(self, x_t: Tensor, t: Tensor, context: Context) -> tuple[Tensor, Tensor]:
        """``(eps, x0)`` from the velocity, division-free."""
        return self.process.eps_and_x0(self.pred(x_t, t, context), x_t.to(self.compute_dtype), t)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Context:
        return self._encode(list(prompts))

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute the transformer's activations in backward (diffusers' own switch)."""
        if enabled:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()
