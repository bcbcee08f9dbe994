"""Stage 2's frozen models (:class:`Stage2Components`: nothing here is trained), its error type, and how the frozen
modules are frozen and moved to the training device and precision."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bolid.errors import BoLIDError

EncodeText = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor | None]]
PoseNet = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Stage2Error(BoLIDError):
    """Stage-2 inputs are inconsistent (components, identities, configs)."""


@dataclass
class Stage2Components:
    """The frozen models of stage 2 (nothing here is trained). See :mod:`training.stage2_loop` for each field."""

    unet: nn.Module
    noise_scheduler: Any
    vae: nn.Module | None = None
    encode_text: EncodeText | None = None
    pose_net: PoseNet | None = None
    clip_image: Callable[[torch.Tensor], torch.Tensor] | None = None
    clip_text: Callable[[list[str]], torch.Tensor] | None = None
    base_model: str = "in-memory"

    @property
    def prediction_type(self) -> str:
        kind = self.noise_scheduler.config.prediction_type
        if kind not in ("epsilon", "v_prediction"):
            raise Stage2Error(f"noise scheduler prediction_type {kind!r} is not supported (epsilon, v_prediction)")
        return kind

    @property
    def needs_added_cond(self) -> bool:
        return getattr(self.unet.config, "addition_embed_type", None) == "text_time"

    def freeze(self) -> None:
        """requires_grad False and eval mode on every module component."""
        for obj in (self.unet, self.vae, self.pose_net, self.clip_image, self.clip_text, self.encode_text):
            for module in modules_of(obj):
                module.requires_grad_(False)
                module.eval()


def modules_of(obj: Any) -> list[nn.Module]:
    """nn.Modules reachable from a component (the module itself, or the modules a wrapper object holds)."""
    if obj is None:
        return []
    if isinstance(obj, nn.Module):
        return [obj]
    found = [v for v in vars(obj).values() if isinstance(v, nn.Module)] if hasattr(obj, "__dict__") else []
    owner = getattr(obj, "__self__", None)  # a bound method of a module or wrapper
    if owner is not None:
        found += modules_of(owner)
    return found


def _vae_needs_fp32(vae: Any) -> bool:
    """A VAE whose config sets force_upcast (SDXL's) overflows in fp16: it stays in float32."""
    return vae is not None and bool(getattr(getattr(vae, "config", None), "force_upcast", False))


def cast_frozen(components: Stage2Components, device: torch.device, dtype: torch.dtype) -> None:
    """Move the frozen modules to ``device``; the UNet and VAE also to ``dtype`` (mixed precision), except a
    force_upcast VAE."""
    keep_vae_fp32 = _vae_needs_fp32(components.vae)
    for obj in (components.unet, components.vae, components.pose_net, components.clip_image, components.clip_text):
        for module in modules_of(obj):
            if dtype != torch.float32 and (module is components.unet
                                           or (module is components.vae and not keep_vae_fp32)):
                module.to(device=device, dtype=dtype)
            else:
                module.to(device)

