"""Tiny stage-2 components and synthetic identities for CPU tests (random weights, seeded, nothing downloaded)."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler
from test_stage1_training import identity_params, pose_keypoints
from tiny_unets import CTX, tiny_sd15_unet, tiny_sdxl_unet
from torch import nn

from bolid.diffusers_integration import adapter_config_for_unet, init_adapter_from_unet
from training.stage2_components import Stage2Components
from training.stage2_sampling import Stage2Identity

BODY_DIM = 16
TEXT_LEN = 7
POOLED = 8


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """Latent factor 2: an 8x8 latent decodes to a 16x16 image."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=16)
    return vae.eval().requires_grad_(False)


class TinyPoseNet(nn.Module):
    """Differentiable stand-in for a pose network: 17 heatmaps, soft-argmax positions, sigmoid confidences."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 17, 3, padding=1))
        self.calls = 0

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        b, _, h, w = images.shape
        logits = self.net(images).flatten(2) * 4.0
        prob = logits.softmax(-1)
        ys, xs = torch.meshgrid(torch.arange(h, dtype=prob.dtype), torch.arange(w, dtype=prob.dtype), indexing="ij")
        xy = torch.stack([(prob * xs.flatten()).sum(-1), (prob * ys.flatten()).sum(-1)], -1)
        return xy, torch.sigmoid(logits.amax(-1) - logits.mean(-1))


class TinyClip(nn.Module):
    """clip_image: a conv + pool to 16 dims; clip_text: a fixed embedding per caption (hash-seeded)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.image_calls = 0
        self.text_calls = 0

    def image(self, images: torch.Tensor) -> torch.Tensor:
        self.image_calls += 1
        return self.conv(images).mean((-2, -1))

    def text(self, captions: list[str]) -> torch.Tensor:
        self.text_calls += 1
        return torch.stack([_seeded(c, (16,)) for c in captions])


def _seeded(text: str, shape: tuple[int, ...]) -> torch.Tensor:
    seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def encode_text_fn(pooled: bool):
    calls = []

    def encode(captions: list[str]):
        calls.append(list(captions))
        embeds = torch.stack([_seeded("e" + c, (TEXT_LEN, CTX)) for c in captions])
        return embeds, (torch.stack([_seeded("p" + c, (POOLED,)) for c in captions]) if pooled else None)

    encode.calls = calls
    return encode


def components(layout: str = "sd15", vae: bool = True, prediction_type: str = "epsilon", pose: bool = True,
               clip: bool = True) -> Stage2Components:
    unet = tiny_sd15_unet() if layout == "sd15" else tiny_sdxl_unet()
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    tiny_clip = TinyClip() if clip else None
    return Stage2Components(unet=unet, noise_scheduler=scheduler, vae=tiny_vae() if vae else None,
                            encode_text=encode_text_fn(layout == "sdxl"), pose_net=TinyPoseNet() if pose else None,
                            clip_image=tiny_clip.image if clip else None, clip_text=tiny_clip.text if clip else None,
                            base_model=f"tiny-{layout}")


def adapter_for(comp: Stage2Components, seed: int = 0):
    torch.manual_seed(seed)
    config = adapter_config_for_unet(comp.unet, body_dim=BODY_DIM, face_tokens=2, body_tokens=2)
    return init_adapter_from_unet(comp.unet, config)


def identities(n: int = 4, views: int = 5, channels: int = 4, shapes: tuple[tuple[int, int], ...] = ((8, 8),),
               image_scale: int = 2, time_ids: bool = False, seed: int = 0, face_missing: int = 0,
               appearance: bool = False) -> list[Stage2Identity]:
    """Identities whose samples carry an identity-specific pattern (so the conditions are informative).

    View k of every identity uses shape ``shapes[k % len(shapes)]``; keypoints are stick-figure poses in the
    view's image pixels (latent size times ``image_scale``). The first ``face_missing`` views have no face.
    ``appearance``: per-view colour descriptors (an identity colour plus noise) for L_id's appearance term.
    """
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        pattern = torch.randn(channels, 1, 1, generator=gen)
        body = torch.randn(BODY_DIM, generator=gen)
        face = F.normalize(torch.randn(512, generator=gen), dim=-1)
        params = identity_params(rng)
        samples, kps, tids = [], [], []
        for k in range(views):
            h, w = shapes[k % len(shapes)]
            samples.append((pattern + 0.3 * torch.randn(channels, h, w, generator=gen)).clamp(-3, 3))
            ih, iw = h * image_scale, w * image_scale
            kps.append(torch.from_numpy(pose_keypoints(params, rng, (iw / 2, ih * 0.55), ih * 0.3)))
            tids.append(torch.tensor([ih, iw, 0, 0, ih, iw], dtype=torch.float32))
        valid = torch.ones(views, dtype=torch.bool)
        valid[:face_missing] = False
        out.append(Stage2Identity(
            name=f"person_{i}", samples=samples, captions=[f"a photo of person {i} view {k}" for k in range(views)],
            body_mu=body + 0.1 * torch.randn(views, BODY_DIM, generator=gen),
            body_logvar=torch.full((views, BODY_DIM), -2.0), body_weights=torch.rand(views, generator=gen) + 0.5,
            keypoints=torch.stack(kps), face=face + 0.05 * torch.randn(views, 512, generator=gen),
            face_valid=valid, time_ids=torch.stack(tids) if time_ids else None,
            appearance=(torch.rand(1, 12, generator=gen) + 0.05 * torch.randn(views, 12, generator=gen)
                        if appearance else None),
            appearance_confidence=torch.ones(views, 12) if appearance else None))
    return out
