"""Stage 2's validation: samples generated with the adapter being trained (:func:`validation_images`) and the
reference | generated grids written to ``validation/`` and tensorboard during training (:func:`log_validation`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bolid.identity import no_identity, no_identity_like
from training.stage2_model import Stage2Model
from training.stage2_sampling import Stage2Data, identity_condition

if TYPE_CHECKING:  # stage2_loop imports this module
    from training.stage2_loop import Stage2TrainingConfig


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


def log_validation(model: Stage2Model, data: Stage2Data, tc: Stage2TrainingConfig, out: Path, step: int,
                    accelerator: Any, seed: int) -> None:
    """Write the reference | generated grid of the first ``tc.validation_identities`` identities for ``step`` to
    ``out/validation/`` and, with an ``accelerator`` that logs to tensorboard, to tensorboard."""
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
