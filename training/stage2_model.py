"""Stage 2's model and losses: L = L_diff + id_weight * L_id + clip_weight * L_CLIP (:class:`LossConfig`), computed
by :class:`Stage2Model` (the trainable adapter attached to the frozen UNet) from a batch of
:mod:`training.stage2_sampling`, its noise and timesteps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr
from torch import nn
from torch.utils.checkpoint import checkpoint

from bolid.adapter import BoLIDAdapter
from bolid.diffusers_integration import BoLIDDiffusers
from bolid.losses import (
    ID_LOSS_MODES,
    appearance_identity_loss,
    clip_alignment_loss,
    keypoint_identity_loss,
    proportion_identity_loss,
)
from training.lightning_branch import LightningConfig, lightning_x0
from training.stage2_components import Stage2Components, Stage2Error


@dataclass(frozen=True)
class LossConfig:
    """L = L_diff + id_weight * L_id + clip_weight * L_CLIP.

    L_id runs the pose network on the image decoded from x0_hat, only for rows with t < id_max_timestep whose
    body condition was not dropped. L_CLIP runs on rows with t < clip_max_timestep whose caption was kept. A
    weight of 0 skips the term entirely (no decode, no pose/CLIP call). ``vae_checkpointing`` recomputes the VAE
    decode in the backward pass instead of storing its activations.
    """

    id_weight: float = 0.0
    id_mode: str = "proportions"
    id_max_timestep: int = 400
    clip_weight: float = 0.0
    clip_max_timestep: int = 400
    vae_checkpointing: bool = True
    weight_face: float = 1.0
    weight_body: float = 1.0
    snr_gamma: float = 0.0
    min_timestep: int = 0
    appearance_weight: float = 0.0
    appearance_max_timestep: int = 1000

    def __post_init__(self) -> None:
        if self.id_mode not in ID_LOSS_MODES:
            raise Stage2Error(f"id_mode must be one of {ID_LOSS_MODES}, got {self.id_mode!r}")
        for name in ("id_weight", "clip_weight", "appearance_weight", "snr_gamma", "min_timestep"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise Stage2Error(f"[loss] {name} must be a finite number >= 0, got {value!r}")
        for name, weight in (("id_max_timestep", self.id_weight), ("clip_max_timestep", self.clip_weight),
                             ("appearance_max_timestep", self.appearance_weight)):
            if weight > 0 and getattr(self, name) <= self.min_timestep:
                raise Stage2Error(f"[loss] {name} ({getattr(self, name)}) must be above min_timestep "
                                  f"({self.min_timestep}): no training timestep would reach that term")


def predicted_x0(scheduler: Any, noisy: torch.Tensor, model_out: torch.Tensor, timesteps: torch.Tensor,
                 prediction_type: str) -> torch.Tensor:
    """x0_hat from the model output (epsilon or v) at ``timesteps``."""
    ac = scheduler.alphas_cumprod.to(device=noisy.device, dtype=torch.float32)[timesteps]
    shape = (-1,) + (1,) * (noisy.ndim - 1)
    a, s = ac.sqrt().view(shape), (1 - ac).sqrt().view(shape)
    x, out = noisy.float(), model_out.float()
    if prediction_type == "epsilon":
        return (x - s * out) / a
    return a * x - s * out


def diffusion_target(scheduler: Any, samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                     prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    return scheduler.get_velocity(samples, noise, timesteps)


def diffusion_loss(scheduler: Any, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                   prediction_type: str, snr_gamma: float = 0.0) -> torch.Tensor:
    """L_diff: the MSE, or with ``snr_gamma`` > 0 its Min-SNR-gamma weighted row mean (weight min(SNR, gamma)/SNR
    for epsilon, min(SNR, gamma)/(SNR + 1) for v, as in diffusers' training scripts)."""
    if snr_gamma <= 0:
        return F.mse_loss(pred.float(), target.float())
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=snr_gamma)
    # a zero-terminal-SNR schedule has SNR 0 at its last step: weight 0 there, not 0/0
    weight = clipped / snr.clamp_min(1e-12) if prediction_type == "epsilon" else clipped / (snr + 1)
    per_row = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    return (per_row * weight).mean()


class Stage2Model(nn.Module):
    """The trainable adapter plus (as plain attributes, not submodules) the frozen components.

    ``forward(batch, noise, timesteps)`` returns {"loss", "diff", "id", "clip", "id_rows", "clip_rows"} (and
    "appearance", "appearance_rows" when that term is on). Only the
    adapter is a submodule, so ``parameters()``/``state_dict()`` (and accelerate's checkpoints) hold exactly what
    trains; wrapping this module with DDP synchronises the adapter's gradients.
    """

    def __init__(self, adapter: BoLIDAdapter, components: Stage2Components, losses: LossConfig | None = None,
                 lightning: LightningConfig | None = None) -> None:
        super().__init__()
        self.adapter = adapter
        object.__setattr__(self, "components", components)
        object.__setattr__(self, "loss_config", losses or LossConfig())
        object.__setattr__(self, "lightning", lightning or LightningConfig())
        object.__setattr__(self, "uncond_text", None)
        object.__setattr__(self, "controller", BoLIDDiffusers.attach(components.unet, adapter,
                                                                     self.loss_config.weight_face,
                                                                     self.loss_config.weight_body))
        object.__setattr__(self, "_clip_text_cache", {})
        lc = self.loss_config
        if lc.id_weight > 0 and components.pose_net is None:
            raise Stage2Error("id_weight > 0 needs a pose network (components.pose_net)")
        if lc.clip_weight > 0 and (components.clip_image is None or components.clip_text is None):
            raise Stage2Error("clip_weight > 0 needs components.clip_image and components.clip_text")
        if lc.appearance_weight > 0 and self.lightning.branch:
            raise Stage2Error("appearance_weight > 0 reads colours at the training view's keypoints, which an image "
                              "the Lightning branch generates from noise does not share: use [lightning] "
                              "x0_source = \"one_step\" or appearance_weight = 0")

    def detach_unet(self) -> None:
        self.controller.detach()

    def set_uncond_text(self, text: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        """The empty caption's (embeds, pooled): the unconditional pass of the Lightning branch's guidance."""
        object.__setattr__(self, "uncond_text", text)

    def images_from_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """Decoded image in ~[0, 1] (not clamped, so gradients flow everywhere), differentiable in x0."""
        vae = self.components.vae
        if vae is None:
            return x0 * 0.5 + 0.5
        cfg = vae.config
        z = x0 / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        dtype = next(vae.parameters()).dtype
        z = z.to(dtype)

        def decode(latents: torch.Tensor) -> torch.Tensor:
            if dtype != torch.float32:
                return vae.decode(latents).sample
            # a float32 VAE (force_upcast) decodes in float32 under fp16/bf16 autocast too
            with torch.autocast(device_type=latents.device.type, enabled=False):
                return vae.decode(latents).sample

        if self.loss_config.vae_checkpointing and torch.is_grad_enabled():
            image = checkpoint(decode, z, use_reentrant=False)
        else:
            image = decode(z)
        return image.float() * 0.5 + 0.5

    def _clip_text(self, captions: list[str], device: torch.device) -> torch.Tensor:
        cache = self._clip_text_cache
        todo = sorted({c for c in captions if c not in cache})
        if todo:
            with torch.no_grad():
                embeds = self.components.clip_text(todo)
            for c, e in zip(todo, embeds, strict=True):
                cache[c] = e.detach().float().cpu()
        return torch.stack([cache[c] for c in captions]).to(device)

    def unet_forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, batch: dict[str, Any],
                     face: torch.Tensor | None, body: torch.Tensor | None) -> torch.Tensor:
        comp = self.components
        unet = comp.unet
        dtype = next(unet.parameters()).dtype
        device = noisy.device
        self.controller.set_identity(face, body)
        added = None
        if comp.needs_added_cond:
            if batch.get("pooled") is None or batch.get("time_ids") is None:
                raise Stage2Error("this UNet needs SDXL size conditioning: the batch lacks pooled text embeds or "
                                  "time_ids")
            added = {"text_embeds": batch["pooled"].to(device, dtype), "time_ids": batch["time_ids"].to(device, dtype)}
        return unet(noisy.to(dtype), timesteps, encoder_hidden_states=batch["text_embeds"].to(device, dtype),
                    added_cond_kwargs=added).sample

    def forward(self, batch: dict[str, Any], noise: torch.Tensor, timesteps: torch.Tensor,
                branch_noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """With the Lightning branch (``lightning.x0_source == "lightning"``), L_id / L_CLIP are computed on the image
        generated from ``branch_noise`` (any timestep; none at all when ``branch_noise`` is None), otherwise on the
        one-step x0 of the rows below the timestep thresholds."""
        comp, lc = self.components, self.loss_config
        branch = self.lightning.branch
        kind = comp.prediction_type
        samples = batch["sample"].to(noise.device, torch.float32)
        noisy = comp.noise_scheduler.add_noise(samples, noise, timesteps)
        device = noise.device
        pred = self.unet_forward(noisy, timesteps, batch, batch["face"].to(device), batch["body"].to(device))
        target = diffusion_target(comp.noise_scheduler, samples, noise, timesteps, kind)
        l_diff = diffusion_loss(comp.noise_scheduler, pred, target, timesteps, kind, lc.snr_gamma)
        zero = l_diff.new_zeros(())
        out = {"diff": l_diff, "id": zero, "clip": zero, "id_rows": zero, "clip_rows": zero}
        if lc.appearance_weight > 0:
            out.update({"appearance": zero, "appearance_rows": zero})
        loss = l_diff
        id_rows = clip_rows = app_rows = torch.zeros(len(timesteps), dtype=torch.bool, device=device)
        if lc.id_weight > 0:
            id_rows = batch["body_present"].to(device) & (branch or timesteps < lc.id_max_timestep)
        if lc.clip_weight > 0:
            clip_rows = batch["text_present"].to(device) & (branch or timesteps < lc.clip_max_timestep)
        if lc.appearance_weight > 0:
            app_rows = batch["body_present"].to(device) & (timesteps < lc.appearance_max_timestep)
        if branch:
            keep = (id_rows | clip_rows) & (branch_noise is not None)
            if self.lightning.max_rows:
                keep &= keep.cumsum(0) <= self.lightning.max_rows
            id_rows, clip_rows = id_rows & keep, clip_rows & keep
        need = id_rows | clip_rows | app_rows
        if bool(need.any()):
            rows = torch.nonzero(need).flatten()
            if branch:
                x0 = lightning_x0(self, batch, rows, branch_noise[rows].to(device), self.lightning, self.uncond_text)
            else:
                x0 = predicted_x0(comp.noise_scheduler, noisy[rows], pred[rows], timesteps[rows], kind)
            images = self.images_from_x0(x0)
            if bool(id_rows.any()):
                sel = torch.nonzero(id_rows[rows]).flatten()
                l_id = self._id_loss(images[sel], batch, rows[sel].cpu())
                out["id"], out["id_rows"] = l_id, zero + len(sel)
                loss = loss + lc.id_weight * l_id
            if bool(app_rows.any()):
                sel = torch.nonzero(app_rows[rows]).flatten()
                r = rows[sel].cpu()
                l_app = appearance_identity_loss(images[sel], batch["ref_keypoints"][r].to(device),
                                                 batch["ref_appearance"][r].to(device),
                                                 batch["ref_app_conf"][r].to(device))
                out["appearance"], out["appearance_rows"] = l_app, zero + len(sel)
                loss = loss + lc.appearance_weight * l_app
            if bool(clip_rows.any()):
                sel = torch.nonzero(clip_rows[rows]).flatten()
                img_emb = self.components.clip_image(images[sel])
                captions = [batch["caption"][int(r)] for r in rows[sel].cpu()]
                l_clip = clip_alignment_loss(img_emb, self._clip_text(captions, device))
                out["clip"], out["clip_rows"] = l_clip, zero + len(sel)
                loss = loss + lc.clip_weight * l_clip
        out["loss"] = loss
        return out

    def _id_loss(self, images: torch.Tensor, batch: dict[str, Any], rows: torch.Tensor) -> torch.Tensor:
        xy, conf = self.components.pose_net(images)
        xy, conf = xy.float(), conf.float()
        device = xy.device
        if self.loss_config.id_mode == "keypoints":
            ref = batch["ref_keypoints"][rows].to(device)
            return keypoint_identity_loss(xy, conf, ref[..., :2], ref[..., 2])
        return proportion_identity_loss(xy, conf, batch["ref_props"][rows].to(device),
                                        batch["ref_prop_conf"][rows].to(device))

