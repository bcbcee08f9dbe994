"""Stage 2 core: leave-one-out training of the Body-Condition Module, callable in-process.

This module knows nothing about config files or model folders (``training/stage2.py`` is that front end); it
works on in-memory components, so experiments can drive it directly::

    from training.stage2_core import (Stage2Components, Stage2Identity, Stage2Data, SamplingConfig,
                                      LossConfig, Stage2TrainingConfig, train_stage2_loop)

    components = Stage2Components(
        unet=unet,                      # diffusers UNet2DConditionModel (frozen; SDXL: addition_embed_type text_time)
        noise_scheduler=DDPMScheduler(...),   # its prediction_type ("epsilon" | "v_prediction") picks the target
        vae=vae_or_None,                # None = pixel-space model: samples are images in [-1, 1], x0 is the image
        encode_text=fn,                 # list[str] -> (embeds [B, L, ctx], pooled [B, P] | None); used to cache
        pose_net=fn_or_None,            # images [B, 3, H, W] in 0..1 -> (xy [B, 17, 2] pixels, conf [B, 17])
        clip_image=fn_or_None,          # images [B, 3, H, W] in 0..1 -> embeddings [B, E] (differentiable)
        clip_text=fn_or_None)           # list[str] -> embeddings [B, E] (cached per caption, no grad)
    identities = [Stage2Identity(name, samples=[latent or image per view, [C, h, w]], captions=[...],
                                 body_mu=[n, d], body_logvar=[n, d], body_weights=[n],
                                 face=[n, 512] or None, face_valid=[n] bool or None,
                                 keypoints=[n, 17, 3] in each view's training-image pixels,
                                 time_ids=[n, 6] or None (SDXL))]
    data = Stage2Data(identities, SamplingConfig(...), components=components)  # caches text embeddings
    result = train_stage2_loop(components, adapter, data, Stage2TrainingConfig(...), LossConfig(...),
                               output_dir=None or Path, resume=None)

``body_mu``/``body_logvar`` are the frozen Body-ID encoder's per-view posteriors (``BodyEncoder.encode_views``);
c_body for a sample is :func:`bolid.body_encoder.aggregate_views` over the context views, which equals
``BodyEncoder.encode`` on those views exactly, so the encoder itself never runs during training. Experiments
that only have one c_body per view can pass it as ``body_mu`` with a very negative ``body_logvar``.

The pieces are usable alone too: :meth:`Stage2Data.batch` (deterministic leave-one-out batches),
:class:`Stage2Model` (``forward(batch, noise, timesteps) -> loss dict``, the training step's maths) and
:func:`validation_images` (sampling with the trained adapter).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bolid.adapter import BoLIDAdapter
from bolid.adapter_io import BODY_ENCODER_HASH_KEY, export_ip_adapter, save_adapter
from bolid.body_encoder import aggregate_views
from bolid.diffusers_integration import BoLIDDiffusers
from bolid.errors import BoLIDError
from bolid.identity import no_identity, no_identity_like
from bolid.losses import ID_LOSS_MODES, clip_alignment_loss, keypoint_identity_loss, proportion_identity_loss
from bolid.proportions import aggregate_proportions, body_proportions
from training.common import (  # noqa: F401 (CHECKPOINT_PREFIX, STATE_FILE, list_checkpoints are re-exported)
    CHECKPOINT_PREFIX,
    STATE_FILE,
    check_distributed_launch,
    learning_rate_at,
    list_checkpoints,
    noise_generator,
    resolve_resume,
    resumed_step,
    save_checkpoint,
)
from training.lightning_branch import LightningConfig, lightning_x0, train_timesteps

logger = logging.getLogger("bolid")

FACE_SOURCES = ("other", "same", "mean_others")

EncodeText = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor | None]]
PoseNet = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Stage2Error(BoLIDError):
    """Stage-2 inputs are inconsistent (components, identities, configs)."""


# ----------------------------------------------------------------------------------------------- components


@dataclass
class Stage2Components:
    """The frozen models of stage 2 (nothing here is trained). See the module docstring."""

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
            for module in _modules_of(obj):
                module.requires_grad_(False)
                module.eval()


def _modules_of(obj: Any) -> list[nn.Module]:
    """nn.Modules reachable from a component (the module itself, or the modules a wrapper object holds)."""
    if obj is None:
        return []
    if isinstance(obj, nn.Module):
        return [obj]
    found = [v for v in vars(obj).values() if isinstance(v, nn.Module)] if hasattr(obj, "__dict__") else []
    owner = getattr(obj, "__self__", None)  # a bound method of a module or wrapper
    if owner is not None:
        found += _modules_of(owner)
    return found


# ----------------------------------------------------------------------------------------------- data


@dataclass
class Stage2Identity:
    """One person's cached views. ``samples``: VAE latents (already scaled) or, for a pixel-space model, images in
    [-1, 1], each [C, h, w]; views with equal shapes form one aspect-ratio bucket."""

    name: str
    samples: list[torch.Tensor]
    captions: list[str]
    body_mu: torch.Tensor
    body_logvar: torch.Tensor
    body_weights: torch.Tensor
    keypoints: torch.Tensor
    face: torch.Tensor | None = None
    face_valid: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    proportions: torch.Tensor = field(init=False)
    proportion_confidence: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        n = len(self.samples)
        if n == 0 or len(self.captions) != n:
            raise Stage2Error(f"identity {self.name}: {n} samples but {len(self.captions)} captions")
        for label, t in (("body_mu", self.body_mu), ("body_logvar", self.body_logvar),
                         ("body_weights", self.body_weights), ("keypoints", self.keypoints)):
            if t.shape[0] != n:
                raise Stage2Error(f"identity {self.name}: {label} has {t.shape[0]} rows, expected {n} (one per view)")
        if self.face is not None:
            if self.face.shape != (n, self.face.shape[-1]):
                raise Stage2Error(f"identity {self.name}: face must be [{n}, 512], got {tuple(self.face.shape)}")
            if self.face_valid is None:
                self.face_valid = torch.ones(n, dtype=torch.bool)
        else:
            self.face_valid = torch.zeros(n, dtype=torch.bool)
        self.face_valid = self.face_valid.bool()
        if self.time_ids is not None and self.time_ids.shape != (n, 6):
            raise Stage2Error(f"identity {self.name}: time_ids must be [{n}, 6], got {tuple(self.time_ids.shape)}")
        props, conf = body_proportions(self.keypoints.double())
        self.proportions, self.proportion_confidence = props.float(), conf.float()

    @property
    def num_views(self) -> int:
        return len(self.samples)


@dataclass(frozen=True)
class SamplingConfig:
    """Leave-one-out sampling and condition dropout.

    max_context_views: c_body aggregates 1..this many of the OTHER photos. face_source: "other" (the face
    embedding of another photo of the same person, the default), "same" (the target's own face) or "mean_others"
    (normalised mean over all other photos). id_reference: "context" (L_id's reference proportions are aggregated
    over the same context views as c_body) or "all" (over every view of the identity). Dropout probabilities are
    exclusive events per sample: text only, face only, body only, everything.
    """

    max_context_views: int = 4
    face_source: str = "other"
    id_reference: str = "context"
    drop_text: float = 0.05
    drop_face: float = 0.05
    drop_body: float = 0.05
    drop_all: float = 0.05
    prior_expert: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.face_source not in FACE_SOURCES:
            raise Stage2Error(f"face_source must be one of {FACE_SOURCES}, got {self.face_source!r}")
        if self.id_reference not in ("context", "all"):
            raise Stage2Error(f"id_reference must be 'context' or 'all', got {self.id_reference!r}")
        probs = (self.drop_text, self.drop_face, self.drop_body, self.drop_all)
        if min(probs) < 0 or sum(probs) > 1:
            raise Stage2Error(f"dropout probabilities must be >= 0 and sum to <= 1, got {probs}")
        if self.max_context_views < 1:
            raise Stage2Error("max_context_views must be >= 1")


DROP_KINDS = ("none", "text", "face", "body", "all")


class Stage2Data:
    """Deterministic leave-one-out batches: ``batch(index, batch_size)`` depends only on (seed, index).

    A batch is drawn from one aspect-ratio bucket (views with the same sample shape), picked with probability
    proportional to its number of usable targets. Text embeddings of every caption (and of the empty caption used
    when text is dropped) are cached once, with ``components.encode_text`` unless ``text_cache`` already has them.
    """

    def __init__(self, identities: Sequence[Stage2Identity], sampling: SamplingConfig | None = None,
                 components: Stage2Components | None = None,
                 text_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None) -> None:
        self.sampling = sampling or SamplingConfig()
        usable = [ident for ident in identities if ident.num_views >= 2]
        if not usable:
            raise Stage2Error("no identity has 2 or more views: leave-one-out needs a held-out target per identity")
        dropped = [ident.name for ident in identities if ident.num_views < 2]
        if dropped:
            logger.warning("BoLID stage 2: identities with a single view are not used: %s", dropped)
        self.identities = list(usable)
        self.text_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = dict(text_cache or {})
        captions = sorted({c for ident in self.identities for c in ident.captions} | {""})
        missing = [c for c in captions if c not in self.text_cache]
        if missing:
            if components is None or components.encode_text is None:
                raise Stage2Error(f"{len(missing)} captions have no cached text embedding and no encode_text was "
                                  f"given (e.g. {missing[0]!r})")
            self.cache_text(missing, components.encode_text)
        buckets: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        for i, ident in enumerate(self.identities):
            for j, s in enumerate(ident.samples):
                buckets.setdefault(tuple(s.shape), []).append((i, j))
        self.bucket_keys = sorted(buckets)
        self.buckets = [buckets[k] for k in self.bucket_keys]
        sizes = np.array([len(b) for b in self.buckets], dtype=np.float64)
        self.bucket_probs = sizes / sizes.sum()

    @torch.no_grad()
    def cache_text(self, captions: Sequence[str], encode_text: EncodeText, chunk: int = 16) -> None:
        captions = list(captions)
        for start in range(0, len(captions), chunk):
            part = captions[start:start + chunk]
            embeds, pooled = encode_text(part)
            for k, c in enumerate(part):
                self.text_cache[c] = (embeds[k].detach().cpu(), None if pooled is None else pooled[k].detach().cpu())

    @property
    def num_views(self) -> int:
        return sum(ident.num_views for ident in self.identities)

    def describe(self) -> dict[str, Any]:
        return {"identities": len(self.identities), "views": self.num_views,
                "buckets": {"x".join(str(d) for d in k): len(b) for k, b in zip(self.bucket_keys, self.buckets,
                                                                                 strict=True)}}

    def _drop_kind(self, rng: np.random.Generator) -> str:
        s = self.sampling
        u = rng.random()
        for kind, p in zip(DROP_KINDS[1:], (s.drop_text, s.drop_face, s.drop_body, s.drop_all), strict=True):
            if u < p:
                return kind
            u -= p
        return "none"

    def _face(self, ident: Stage2Identity, target: int, rng: np.random.Generator) -> tuple[torch.Tensor | None, int]:
        """(face embedding, source view index or -1)."""
        if ident.face is None:
            return None, -1
        valid = ident.face_valid
        src = self.sampling.face_source
        if src == "same":
            return (ident.face[target], target) if valid[target] else (None, -1)
        others = [k for k in range(ident.num_views) if k != target and bool(valid[k])]
        if not others:
            return None, -1
        if src == "mean_others":
            return F.normalize(ident.face[others].float().mean(0), dim=-1), -1
        k = others[int(rng.integers(len(others)))]
        return ident.face[k], k

    def sample(self, rng: np.random.Generator, bucket: int) -> dict[str, Any]:
        """One leave-one-out sample from ``bucket`` (tensors of one row, plus the indices used)."""
        i, j = self.buckets[bucket][int(rng.integers(len(self.buckets[bucket])))]
        ident = self.identities[i]
        n = ident.num_views
        others = [k for k in range(n) if k != j]
        k = int(rng.integers(1, min(self.sampling.max_context_views, n - 1) + 1))
        context = sorted(int(c) for c in rng.choice(others, size=k, replace=False))
        mu, _ = aggregate_views(ident.body_mu[context].float(), ident.body_logvar[context].float(),
                                ident.body_weights[context].float(), self.sampling.prior_expert)
        face, face_index = self._face(ident, j, rng)
        ref_rows = context if self.sampling.id_reference == "context" else list(range(n))
        ref_props, ref_conf = aggregate_proportions(ident.proportions[ref_rows], ident.proportion_confidence[ref_rows])
        drop = self._drop_kind(rng)
        caption = ident.captions[j]
        text_key = "" if drop in ("text", "all") else caption
        embeds, pooled = self.text_cache[text_key]
        face_dim = ident.face.shape[-1] if ident.face is not None else 512
        face_t = no_identity(face_dim) if face is None or drop in ("face", "all") else face.float()
        body_t = no_identity_like(mu) if drop in ("body", "all") else mu
        return {"sample": ident.samples[j], "text_embeds": embeds, "pooled": pooled,
                "time_ids": None if ident.time_ids is None else ident.time_ids[j],
                "face": face_t, "body": body_t, "caption": caption, "drop": drop,
                "ref_keypoints": ident.keypoints[j].float(), "ref_props": ref_props, "ref_prop_conf": ref_conf,
                "identity_index": i, "target_index": j, "context_indices": context, "face_index": face_index}

    def batch(self, index: int, batch_size: int) -> dict[str, Any]:
        """Batch number ``index`` (a pure function of (seed, index))."""
        rng = np.random.default_rng([self.sampling.seed, int(index)])
        bucket = int(rng.choice(len(self.buckets), p=self.bucket_probs))
        rows = [self.sample(rng, bucket) for _ in range(batch_size)]
        return collate(rows)


def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in rows[0].items():
        if isinstance(value, torch.Tensor):
            out[key] = torch.stack([r[key] for r in rows])
        elif value is None:
            out[key] = None
        else:
            out[key] = [r[key] for r in rows]
    lengths = {r["text_embeds"].shape[0] for r in rows}
    if len(lengths) > 1:
        raise Stage2Error(f"cached text embeddings have different lengths {sorted(lengths)}; pad captions to one length")
    out["body_present"] = torch.tensor([r["drop"] not in ("body", "all") for r in rows])
    out["text_present"] = torch.tensor([r["drop"] not in ("text", "all") and bool(r["caption"]) for r in rows])
    return out


# ----------------------------------------------------------------------------------------------- model / losses


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

    def __post_init__(self) -> None:
        if self.id_mode not in ID_LOSS_MODES:
            raise Stage2Error(f"id_mode must be one of {ID_LOSS_MODES}, got {self.id_mode!r}")
        if self.id_weight < 0 or self.clip_weight < 0:
            raise Stage2Error("loss weights must be >= 0")


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


class Stage2Model(nn.Module):
    """The trainable adapter plus (as plain attributes, not submodules) the frozen components.

    ``forward(batch, noise, timesteps)`` returns {"loss", "diff", "id", "clip", "id_rows", "clip_rows"}. Only the
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
        l_diff = F.mse_loss(pred.float(), target.float())
        zero = l_diff.new_zeros(())
        out = {"diff": l_diff, "id": zero, "clip": zero, "id_rows": zero, "clip_rows": zero}
        loss = l_diff
        id_rows = clip_rows = torch.zeros(len(timesteps), dtype=torch.bool, device=device)
        if lc.id_weight > 0:
            id_rows = batch["body_present"].to(device) & (branch or timesteps < lc.id_max_timestep)
        if lc.clip_weight > 0:
            clip_rows = batch["text_present"].to(device) & (branch or timesteps < lc.clip_max_timestep)
        if branch:
            keep = (id_rows | clip_rows) & (branch_noise is not None)
            if self.lightning.max_rows:
                keep &= keep.cumsum(0) <= self.lightning.max_rows
            id_rows, clip_rows = id_rows & keep, clip_rows & keep
        need = id_rows | clip_rows
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


# ----------------------------------------------------------------------------------------------- training loop


@dataclass(frozen=True)
class Stage2TrainingConfig:
    """Optimisation, checkpointing and logging of the stage-2 loop (the ``[training]`` table)."""

    max_steps: int = 10000
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 500
    lr_schedule: str = "cosine"  # "cosine" | "constant" | "linear" (after the linear warm-up)
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16": autocast; frozen UNet/VAE cast to it (not a force_upcast VAE)
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0  # 0 = off; e.g. 0.999 (the export then holds the EMA weights)
    checkpointing_steps: int = 1000
    checkpoints_total_limit: int = 3
    log_every: int = 10
    report_to: str = "tensorboard"  # "tensorboard" | "none"
    validation_steps: int = 0  # 0 = no validation grids
    validation_inference_steps: int = 20
    validation_guidance: float = 5.0
    validation_identities: int = 2
    export_name: str = "bolid_adapter.safetensors"
    export_ip_adapter: bool = True

    def __post_init__(self) -> None:
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise Stage2Error(f"[training] mixed_precision must be no/fp16/bf16, got {self.mixed_precision!r}")
        if self.lr_schedule not in ("cosine", "constant", "linear"):
            raise Stage2Error(f"[training] lr_schedule must be cosine/constant/linear, got {self.lr_schedule!r}")
        if self.report_to not in ("tensorboard", "none"):
            raise Stage2Error(f"[training] report_to must be tensorboard/none, got {self.report_to!r}")
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "checkpointing_steps", "log_every"):
            if getattr(self, name) < 1:
                raise Stage2Error(f"[training] {name} must be >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise Stage2Error("[training] ema_decay must be in [0, 1)")


class AdapterEMA:
    """Exponential moving average of the adapter's weights (checkpointed with accelerate)."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        # frozen parameters keep their exact values (decay*v + (1-decay)*v need not round back to v)
        frozen = {k for k, p in module.named_parameters() if not p.requires_grad}
        for k, v in module.state_dict().items():
            if k not in frozen:
                self.shadow[k].mul_(self.decay).add_(v.detach().float(), alpha=1.0 - self.decay)

    def copy_to(self, module: nn.Module) -> None:
        module.load_state_dict({k: v.to(module.state_dict()[k].dtype) for k, v in self.shadow.items()})

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}


def training_metadata(components: Stage2Components, data: Stage2Data, tc: Stage2TrainingConfig, lc: LossConfig,
                      step: int, extra: dict[str, Any] | None = None, lightning: LightningConfig | None = None
                      ) -> dict[str, str]:
    """What goes into the exported file besides the adapter's config."""
    lightning = lightning or LightningConfig()
    info = {"stage": 2, "base_model": components.base_model, "step": step, "loss": asdict(lc),
            "lightning": asdict(lightning),
            "training": asdict(tc), "sampling": asdict(data.sampling), "dataset": data.describe(),
            "prediction_type": components.prediction_type, **(extra or {})}
    out = {BODY_ENCODER_HASH_KEY: str(extra["body_encoder_hash"])} if extra and extra.get("body_encoder_hash") else {}
    return {**out, "bolid_training": json.dumps(info, sort_keys=True, default=str),
            "bolid_base_model": components.base_model,
            "bolid_training_steps": str(step), "bolid_loss_weights": json.dumps(
                {"diff": 1.0, "id": lc.id_weight, "clip": lc.clip_weight, "id_mode": lc.id_mode,
                 "x0_source": lightning.x0_source}),
            "bolid_dataset_size": json.dumps({"identities": len(data.identities), "views": data.num_views})}


def export_adapter(adapter: BoLIDAdapter, path: Path, metadata: dict[str, str], ip_adapter: bool = True) -> list[Path]:
    """The BoLID file (ComfyUI loader) plus, optionally, one stock IP-Adapter file per branch (diffusers)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_adapter(adapter, path, metadata)
    written = [path]
    if ip_adapter:
        for branch in ("face", "body"):
            p = path.with_name(f"{path.stem}.{branch}_ip_adapter.safetensors")
            export_ip_adapter(adapter, branch, p)
            written.append(p)
    return written


def _vae_needs_fp32(vae: Any) -> bool:
    """A VAE whose config sets force_upcast (SDXL's) overflows in fp16: it stays in float32."""
    return vae is not None and bool(getattr(getattr(vae, "config", None), "force_upcast", False))


def _cast_frozen(components: Stage2Components, device: torch.device, dtype: torch.dtype) -> None:
    keep_vae_fp32 = _vae_needs_fp32(components.vae)
    for obj in (components.unet, components.vae, components.pose_net, components.clip_image, components.clip_text):
        for module in _modules_of(obj):
            if dtype != torch.float32 and (module is components.unet
                                           or (module is components.vae and not keep_vae_fp32)):
                module.to(device=device, dtype=dtype)
            else:
                module.to(device)


def freeze_unused_branches(adapter: BoLIDAdapter, lc: LossConfig, also: Sequence[str] = ()) -> list[str]:
    """Freeze the parameters of a branch whose weight (``weight_face`` / ``weight_body``) is 0, and of ``also``.

    Such a branch is skipped in the UNet, so its parameters get no gradient, which DDP (several GPUs) refuses;
    frozen, they are simply not trained (they keep their initial values in the export). ``also`` names branches
    frozen on purpose (a face branch imported from IP-Adapter FaceID). Returns the frozen branches.
    """
    frozen = [b for b, w in (("face", lc.weight_face), ("body", lc.weight_body)) if w == 0 or b in also]
    for branch in frozen:
        adapter.projection(branch).requires_grad_(False)
        for index in range(len(adapter.layers)):
            for proj in adapter.layer(index).projections(branch):
                proj.requires_grad_(False)
    if frozen:
        logger.warning("BoLID stage 2: the %s branch is frozen (not trained)", " and ".join(frozen))
    return frozen


def train_stage2_loop(components: Stage2Components, adapter: BoLIDAdapter, data: Stage2Data,
                      tc: Stage2TrainingConfig, lc: LossConfig | None = None, output_dir: Path | None = None,
                      resume: str | None = None, seed: int = 0, metadata: dict[str, Any] | None = None,
                      on_step: Callable[[int, dict[str, float]], None] | None = None,
                      accelerator: Any = None, freeze: Sequence[str] = (), lightning: LightningConfig | None = None
                      ) -> dict[str, Any]:
    """Train ``adapter`` in place; returns {"step", "losses" (list of per-step dicts), "export" (paths or [])}.

    ``lightning`` (:mod:`training.lightning_branch`): the x0 of L_id / L_CLIP (one-step or a K-step generation) and
    L_diff's timesteps; its noise is seeded like the training noise, so resume and several processes still follow
    the uninterrupted one-process run.

    With ``output_dir``: accelerate checkpoints every ``checkpointing_steps`` (``resume="latest"`` continues from
    the newest), tensorboard logs, validation grids, and the export at the end. Without it: nothing is written
    (an in-process experiment). Batches come from ``data.batch(global index)`` and noise from a generator seeded by
    (seed, step, micro-batch index in the global batch), so a resumed run follows the uninterrupted one and N
    processes follow one process with N times the accumulation.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from tqdm.auto import tqdm

    lc = lc or LossConfig()
    lightning = lightning or LightningConfig()
    out = Path(output_dir) if output_dir is not None else None
    report = tc.report_to if out is not None else "none"
    if accelerator is None:
        project = ProjectConfiguration(project_dir=str(out) if out else None,
                                       logging_dir=str(out / "logs") if out else None)
        accelerator = Accelerator(mixed_precision=tc.mixed_precision, project_config=project,
                                  log_with=None if report == "none" else report)
    check_distributed_launch(accelerator, Stage2Error, "BoLID stage 2")
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(tc.mixed_precision, torch.float32)
    components.freeze()
    _cast_frozen(components, device, weight_dtype)
    if tc.gradient_checkpointing and hasattr(components.unet, "enable_gradient_checkpointing"):
        components.unet.enable_gradient_checkpointing()
    adapter.to(device=device, dtype=torch.float32).train()
    adapter.requires_grad_(True)
    freeze_unused_branches(adapter, lc, freeze)
    model = Stage2Model(adapter, components, lc, lightning)
    model.set_uncond_text(data.text_cache[""])
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=tc.learning_rate, weight_decay=tc.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = AdapterEMA(adapter, tc.ema_decay) if tc.ema_decay > 0 else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    step = 0
    ckpt = resolve_resume(out, resume, Stage2Error, "BoLID stage 2")
    if ckpt is not None:
        accelerator.load_state(str(ckpt))  # accelerate's files are pickles: resume only your own checkpoints
        step = resumed_step(ckpt)
        logger.info("BoLID stage 2: resumed from %s at step %d", ckpt, step)
    if report != "none":
        hparams = {**{f"training/{k}": v for k, v in asdict(tc).items()},
                   **{f"loss/{k}": v for k, v in asdict(lc).items()},
                   **{f"lightning/{k}": v for k, v in asdict(lightning).items()}, "seed": seed,
                   "identities": len(data.identities), "views": data.num_views}
        accelerator.init_trackers("bolid_stage2", config=hparams)
    logger.info("BoLID stage 2: %s, %d processes, batch %d x %d accumulation", data.describe(),
                accelerator.num_processes, tc.batch_size, tc.gradient_accumulation_steps)
    logger.info("BoLID stage 2: %s", lightning.summary())

    def export_now(path: Path, at_step: int) -> list[Path]:
        target = accelerator.unwrap_model(model).adapter
        if ema is not None:
            target = _copy_adapter(target)
            ema.copy_to(target)
        return export_adapter(target, path, training_metadata(components, data, tc, lc, at_step, metadata, lightning),
                              tc.export_ip_adapter)

    nproc, rank = accelerator.num_processes, accelerator.process_index
    progress = tqdm(total=tc.max_steps, initial=step, desc="stage 2", disable=not accelerator.is_local_main_process)
    history: list[dict[str, float]] = []
    raw_model = accelerator.unwrap_model(model)
    sched = components.noise_scheduler
    num_t = int(sched.config.num_train_timesteps)
    model.train()
    while step < tc.max_steps:
        window: list[dict[str, torch.Tensor]] = []
        lr = learning_rate_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        accum = tc.gradient_accumulation_steps
        for micro in range(accum):
            index = (step * accum + micro) * nproc + rank
            batch = data.batch(index, tc.batch_size)
            # noise is seeded by the micro-batch's place in the global batch, like the data index: N processes
            # follow the 1-process run with N x the accumulation
            gen = noise_generator(seed, step, micro * nproc + rank, 0, torch.device("cpu"), offset=17)
            shape = batch["sample"].shape
            noise = torch.randn(shape, generator=gen).to(device)
            timesteps = train_timesteps(lightning, num_t, shape[0], gen).to(device)
            branch_noise = None
            if lightning.runs_at(step):  # its own generator: the training noise stays what it was without it
                bgen = noise_generator(seed, step, micro * nproc + rank, 0, torch.device("cpu"), offset=29)
                branch_noise = torch.randn(shape, generator=bgen).to(device)
            # gradients are summed locally over the micro-batches and all-reduced on the last one only
            sync = contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(model)
            with sync:
                with accelerator.autocast():
                    losses = model(batch, noise, timesteps, branch_noise)
                accelerator.backward(losses["loss"] / accum)
            window.append({k: v.detach().float() for k, v in losses.items()})
        if tc.max_grad_norm > 0:
            accelerator.clip_grad_norm_(adapter.parameters(), tc.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if ema is not None:
            ema.update(raw_model.adapter)
        logs = {k: accelerator.reduce(torch.stack([w[k] for w in window]).mean(), "mean").item() for k in window[0]}
        logs["lr"] = lr
        history.append(logs)
        progress.update(1)
        progress.set_postfix({k: f"{logs[k]:.4f}" for k in ("loss", "diff", "id", "clip")
                              if k == "loss" or k == "diff" or (k == "id" and lc.id_weight > 0)
                              or (k == "clip" and lc.clip_weight > 0)})
        if report != "none" and (step % tc.log_every == 0 or step == 1):
            accelerator.log({f"train/{k}": v for k, v in logs.items()}, step=step)
        if out is not None and tc.validation_steps > 0 and step % tc.validation_steps == 0 \
                and accelerator.is_main_process:
            _log_validation(raw_model, data, tc, out, step, accelerator if report != "none" else None, seed)
        if out is not None and (step % tc.checkpointing_steps == 0 or step == tc.max_steps):
            save_checkpoint(accelerator, out, step, 2, lambda folder, at=step: export_now(folder / tc.export_name, at),
                            tc.checkpoints_total_limit, "BoLID stage 2")
        if on_step is not None and accelerator.is_main_process:
            on_step(step, logs)
    progress.close()
    accelerator.wait_for_everyone()
    exported: list[Path] = []
    if out is not None and accelerator.is_main_process:
        exported = export_now(out / tc.export_name, step)
        logger.info("BoLID stage 2: exported %s", ", ".join(str(p) for p in exported))
    raw_model.detach_unet()
    accelerator.end_training()
    return {"step": step, "losses": history, "export": exported,
            "adapter": raw_model.adapter, "ema": None if ema is None else ema.shadow}


def _copy_adapter(adapter: BoLIDAdapter) -> BoLIDAdapter:
    copy = BoLIDAdapter(adapter.config)
    copy.load_state_dict(adapter.state_dict())
    return copy


# ----------------------------------------------------------------------------------------------- validation


def identity_condition(ident: Stage2Identity, prior_expert: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(mean face embedding or None, c_body over all views) of an identity, for validation and inference."""
    mu, _ = aggregate_views(ident.body_mu.float(), ident.body_logvar.float(), ident.body_weights.float(),
                            prior_expert)
    face = None
    if ident.face is not None and bool(ident.face_valid.any()):
        face = F.normalize(ident.face[ident.face_valid].float().mean(0), dim=-1)
    return face, mu


@torch.no_grad()
def validation_images(model: Stage2Model, data: Stage2Data, identities: Sequence[int], steps: int = 20,
                      guidance: float = 5.0, seed: int = 0) -> torch.Tensor:
    """[N, 2, 3, H, W] in 0..1: per identity, its first view (decoded) and a sample generated from that view's
    caption with the identity's face and body (DDIM, classifier-free guidance against no text and no identity)."""
    from diffusers import DDIMScheduler

    comp = model.components
    scheduler = DDIMScheduler.from_config(comp.noise_scheduler.config)
    scheduler.set_timesteps(steps)
    device = next(model.adapter.parameters()).device
    was_training = model.adapter.training
    model.adapter.eval()
    out = []
    for n, i in enumerate(identities):
        ident = data.identities[i]
        face, body = identity_condition(ident, data.sampling.prior_expert)
        ref = ident.samples[0][None].to(device)
        face_dim = ident.face.shape[-1] if ident.face is not None else model.adapter.config.face_embed_dim
        face = no_identity(face_dim) if face is None else face
        cond = {"text_embeds": data.text_cache[ident.captions[0]][0], "pooled": data.text_cache[ident.captions[0]][1]}
        uncond = {"text_embeds": data.text_cache[""][0], "pooled": data.text_cache[""][1]}
        t_ids = None if ident.time_ids is None else ident.time_ids[0]
        batch = {"text_embeds": torch.stack([uncond["text_embeds"], cond["text_embeds"]]),
                 "pooled": None if cond["pooled"] is None else torch.stack([uncond["pooled"], cond["pooled"]]),
                 "time_ids": None if t_ids is None else torch.stack([t_ids, t_ids])}
        faces = torch.stack([no_identity_like(face), face]).to(device)
        bodies = torch.stack([no_identity_like(body), body]).to(device)
        gen = torch.Generator().manual_seed(seed + n)
        x = torch.randn(ref.shape, generator=gen).to(device) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(torch.cat([x, x]), t)
            ts = torch.full((2,), int(t), device=device, dtype=torch.long)
            pred = model.unet_forward(inp, ts, batch, faces, bodies).float()
            pred = pred[0:1] + guidance * (pred[1:2] - pred[0:1])
            x = scheduler.step(pred, t, x).prev_sample
        images = model.images_from_x0(torch.cat([ref.float(), x])).clamp(0, 1).cpu()
        out.append(images)
    model.adapter.train(was_training)
    return torch.stack(out)


def _log_validation(model: Stage2Model, data: Stage2Data, tc: Stage2TrainingConfig, out: Path, step: int,
                    accelerator: Any, seed: int) -> None:
    from torchvision.utils import make_grid, save_image

    ids = list(range(min(tc.validation_identities, len(data.identities))))
    images = validation_images(model, data, ids, tc.validation_inference_steps, tc.validation_guidance, seed)
    grid = make_grid(images.flatten(0, 1), nrow=2, padding=2)
    folder = out / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    save_image(grid, folder / f"step_{step:08d}.png")
    if accelerator is not None:
        tracker = accelerator.get_tracker("tensorboard", unwrap=True)
        if hasattr(tracker, "add_image"):
            tracker.add_image("validation/reference_vs_generated", grid, step)
