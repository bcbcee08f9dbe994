"""The experiment's moving parts: render the world, train stage 1 and the adapters of every arm, generate.

Every adapter is trained by the same recipe (:func:`train_adapter`, stage 2's own loop) with the same seed; the
arms differ only in what is fed as the body condition: c_body from the stage-1 encoder (BoLID), the true
identity vector (oracle), or c_body of a different training person (shuffled control).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bolid.appearance import image_appearance
from bolid.body_encoder import BodyEncoder, aggregate_views
from bolid.body_encoder_io import load_body_encoder
from bolid.body_views import crop_person
from bolid.diffusers_integration import BoLIDDiffusers, adapter_config_for_unet, init_adapter_from_unet
from bolid.identity import no_identity_like
from bolid.synthetic import SyntheticIdentity, SyntheticPhoto, make_identity
from training.stage2_sampling import SamplingConfig, Stage2Data, Stage2Identity

from .conditions import BodySource, TrainingBody
from .config import ExperimentConfig
from .readout import WorldPose, person_from_keypoints
from .world_models import (
    IMAGE_SIZE,
    CaptionEncoder,
    WorldPoseNet,
    load_module,
    make_base_unet,
    make_sample_scheduler,
    make_train_scheduler,
    render_world_photo,
    to_model_range,
    to_uint8,
)

logger = logging.getLogger("bolid.experiment")
ORACLE_LOGVAR = -9.0  # the oracle vector as a per-view posterior with almost no variance: aggregation keeps it


@dataclass
class HeldOut:
    identity: SyntheticIdentity
    references: list[SyntheticPhoto]
    targets: list[SyntheticPhoto]


@dataclass
class World:
    train: dict[str, list[SyntheticPhoto]]
    heldout: dict[str, HeldOut]


def load_world_models(assets: Path) -> tuple[torch.nn.Module, CaptionEncoder, WorldPose]:
    unet, text, pose = make_base_unet(), CaptionEncoder(), WorldPoseNet()
    load_module(unet, assets / "base_unet.safetensors", "world_base_unet")
    load_module(text, assets / "caption_encoder.safetensors", "world_caption_encoder")
    load_module(pose, assets / "pose_net.safetensors", "world_pose_net")
    for m in (unet, text, pose):
        m.eval().requires_grad_(False)
    return unet, text, WorldPose(pose)


def render_world(cfg: ExperimentConfig) -> World:
    w, seed = cfg.world, cfg.seed
    train = {f"train_{i:03d}": [render_world_photo(make_identity(seed, i), seed * 7919 + j)
                                for j in range(w.photos_per_identity)] for i in range(w.train_identities)}
    held = {}
    n_ref, n_tgt = w.heldout_reference_photos, w.heldout_target_photos
    for k in range(w.heldout_identities):
        ident = make_identity(seed, w.heldout_first_index + k)
        photos = [render_world_photo(ident, seed * 7919 + 500 + j) for j in range(n_ref + n_tgt)]
        held[f"heldout_{k:03d}"] = HeldOut(ident, photos[:n_ref], photos[n_ref:])
    return World(train, held)


def write_identity_folders(train: dict[str, list[SyntheticPhoto]], root: Path) -> None:
    from PIL import Image

    for name, photos in train.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for j, p in enumerate(photos):
            Image.fromarray(p.image).save(folder / f"{j:02d}.png")
            (folder / f"{j:02d}.txt").write_text(p.caption, encoding="utf-8")


# ----------------------------------------------------------------------------------------------- stage 1


def run_stage1(cfg: ExperimentConfig, world: World, pose: WorldPose) -> tuple[BodyEncoder, list[float]]:
    from training.stage1 import Stage1Config, train_stage1

    root = cfg.output_dir / "data" / "train"
    write_identity_folders(world.train, root)
    s1 = cfg.stage1
    raw = {"stage": 1, "output_dir": str(cfg.output_dir / "stage1"), "seed": cfg.seed, "model": s1.model(),
           "dataset": {"cache_dir": str(cfg.output_dir / "stage1_cache"), "min_resolution": IMAGE_SIZE,
                       "crop_size": s1.crop_size, "max_context_views": 4, "subsets": [{"root": str(root)}]},
           "training": {"warmup_steps": 20, "kl_warmup_steps": 50, "num_workers": 0, "report_to": "none",
                        "checkpointing_steps": 10**9, "checkpoints_total_limit": 1, **s1.training()}}
    result = train_stage1(Stage1Config.from_dict(raw), pose_runner=pose)
    logger.info("stage 1: %d steps, last losses %s", result["step"], result["losses"][-3:])
    return load_body_encoder(result["export"])[0], result["losses"]


def view_posteriors(encoder: BodyEncoder, photos: list[SyntheticPhoto], pose: WorldPose
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """Per-view (mu, logvar), weights and pose-model keypoints (image pixels), as encode_body would see them."""
    images = [p.image for p in photos]
    kps = pose.keypoints(images)
    crops, crop_kps = [], []
    for im, kp in zip(images, kps, strict=True):
        c, ck = crop_person(im, person_from_keypoints(kp), encoder.config.crop_size, encoder.config.crop_margin)
        crops.append(c)
        crop_kps.append(ck)
    crop_t = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        mu, logvar = encoder.encode_views(crop_t, torch.from_numpy(np.stack(crop_kps)))
    weights = torch.from_numpy(kps[:, 5:, 2].mean(1)).float()
    return mu, logvar, weights, kps


def body_of(encoder: BodyEncoder, photos: list[SyntheticPhoto], pose: WorldPose) -> torch.Tensor:
    """c_body of a photo set (the posterior mean over its views), exactly as encode_body computes it."""
    mu, logvar, weights, _ = view_posteriors(encoder, photos, pose)
    c, _ = aggregate_views(mu, logvar, weights, encoder.config.prior_expert)
    return c


def heldout_body(source: BodySource, person: HeldOut, encoder: BodyEncoder | None, pose: WorldPose
                 ) -> torch.Tensor:
    """A held-out person's body condition read from their reference photos (multi-view or the first photo), or
    their true identity vector (oracle; no encoder needed). Stored and sampled bodies go through a file or a
    draw: see ``run.heldout_bodies``."""
    if source is BodySource.ORACLE:
        return torch.from_numpy(person.identity.oracle_vector())
    if source is BodySource.MULTI:
        return body_of(encoder, person.references, pose)
    if source is BodySource.SINGLE:
        return body_of(encoder, person.references[:1], pose)
    raise ValueError(f"heldout_body reads the oracle, multi-view or single-photo body, not {source.value!r}: a "
                     "stored or sampled body needs its file or a draw (run.heldout_bodies)")


# ----------------------------------------------------------------------------------------------- stage 2


def stage2_identities(world: World, pose: WorldPose, encoder: BodyEncoder | None, seed: int,
                      body: TrainingBody = TrainingBody.BOLID, views: dict[str, tuple] | None = None) -> list[Any]:
    """The training identities for stage 2, with the body condition of one arm.

    body: BOLID (per-view posteriors of the encoder), ORACLE (the true identity vector, standardised; no encoder
    needed), or SHUFFLED (the encoder's posteriors of another training person: a fixed random derangement).
    ``views`` caches :func:`view_posteriors` per person across arms (the BoLID and shuffled arms read the same
    people)."""
    views = {} if views is None else views

    def posteriors(name: str) -> tuple:
        if name not in views:
            views[name] = view_posteriors(encoder, world.train[name], pose)
        return views[name]

    names = list(world.train)
    donors = names
    if body is TrainingBody.SHUFFLED:
        rng = np.random.default_rng([seed, 77])
        perm = rng.permutation(len(names))
        while np.any(perm == np.arange(len(names))):  # nobody keeps their own body
            perm = rng.permutation(len(names))
        donors = [names[i] for i in perm]
    out = []
    for name, donor in zip(names, donors, strict=True):
        photos = world.train[name]
        if body is TrainingBody.ORACLE:
            kps = pose.keypoints([p.image for p in photos])
            vec = torch.from_numpy(make_identity(seed, photos[0].identity).oracle_vector())
            mu = vec.expand(len(photos), -1).clone()
            logvar = torch.full_like(mu, ORACLE_LOGVAR)
            weights = torch.ones(len(photos))
        else:
            kps = posteriors(name)[3]
            mu, logvar, weights, _ = posteriors(donor)
        samples = list(to_model_range(np.stack([p.image for p in photos])))
        keypoints = torch.from_numpy(kps)
        appearance, appearance_conf = image_appearance(torch.stack(samples) * 0.5 + 0.5, keypoints)
        out.append(Stage2Identity(name=name, samples=samples, captions=[p.caption for p in photos], body_mu=mu,
                                  body_logvar=logvar, body_weights=weights, keypoints=keypoints,
                                  appearance=appearance, appearance_confidence=appearance_conf))
    return out


class TargetInContext(Stage2Data):
    """Stage-2 data whose body condition also aggregates the target view itself (the ablation of leave-one-out)."""

    def body_views(self, context: list[int], target: int) -> list[int]:
        return sorted({*context, target})


def train_adapter(cfg: ExperimentConfig, identities: list[Any], body_dim: int, unet: torch.nn.Module,
                  text: CaptionEncoder, pose: WorldPose, id_weight: float | None = None,
                  target_in_context: bool = False, lightning: Any = None) -> tuple[Any, list[dict]]:
    """One adapter by stage 2's recipe; the face branch (off in generation) is frozen (weight_face = 0).
    ``lightning``: a :class:`training.lightning_branch.LightningConfig` (None: the one-step x0 of stage 2's default)."""
    from training.stage2_components import Stage2Components
    from training.stage2_loop import Stage2TrainingConfig, train_stage2_loop
    from training.stage2_model import LossConfig

    s2 = cfg.stage2
    components = Stage2Components(unet=unet, noise_scheduler=make_train_scheduler(), vae=None,
                                  encode_text=lambda caps: (text(list(caps)), None), pose_net=pose.pose_net,
                                  base_model="synthetic-world-base")
    sampling = SamplingConfig(max_context_views=s2.max_context_views, seed=cfg.seed, drop_text=s2.drop_text,
                              drop_face=0.0, drop_body=s2.drop_body, drop_all=s2.drop_all)
    data = (TargetInContext if target_in_context else Stage2Data)(identities, sampling, components=components)
    torch.manual_seed(cfg.seed)
    adapter = init_adapter_from_unet(unet, adapter_config_for_unet(unet, body_dim=body_dim,
                                                                   body_tokens=s2.body_tokens, face_tokens=1))
    tc = Stage2TrainingConfig(max_steps=s2.max_steps, batch_size=s2.batch_size, learning_rate=s2.learning_rate,
                              warmup_steps=s2.warmup_steps, lr_schedule="cosine", report_to="none",
                              export_ip_adapter=False)
    lc = LossConfig(id_weight=s2.id_weight if id_weight is None else id_weight, id_max_timestep=s2.id_max_timestep,
                    weight_face=0.0, weight_body=1.0, snr_gamma=s2.snr_gamma,
                    min_timestep=s2.min_timestep, appearance_weight=s2.appearance_weight,
                    appearance_max_timestep=s2.appearance_max_timestep)
    result = train_stage2_loop(components, adapter, data, tc, lc, output_dir=None, seed=cfg.seed, lightning=lightning)
    return result["adapter"].eval().requires_grad_(False), result["losses"]


# ----------------------------------------------------------------------------------------------- sampling


def initial_noise(seeds: list[int]) -> torch.Tensor:
    return torch.stack([torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds])


def img2img_start_step(strength: float, steps: int) -> int:
    """Index of the first of the sampler's ``steps`` timesteps an img2img start at ``strength`` runs (diffusers'
    rule: the last ``round(strength * steps)`` of them, at least one); 0 for strength 1, pure noise."""
    return steps - min(steps, max(1, int(round(strength * steps))))


@torch.no_grad()
def generate(unet: torch.nn.Module, text: CaptionEncoder, captions: list[str], seeds: list[int],
             adapter: Any = None, bodies: torch.Tensor | None = None, steps: int = 20, guidance: float = 3.0,
             batch: int = 128, body_guidance: float | None = None, init_images: np.ndarray | None = None,
             strength: float = 1.0) -> np.ndarray:
    """DDIM with classifier-free guidance; the unconditional branch has no text and (with an adapter) a zero
    body, as in training's condition dropout. Same seed -> same initial noise in every arm.

    ``init_images`` (uint8 [N, H, W, 3], one per caption) with ``strength`` in (0, 1] starts from those images
    noised to the first of the last ``round(strength * steps)`` timesteps (img2img / SDEdit, diffusers' rule), with
    the same seeded noise; strength 1 ignores them (pure noise, the text-to-image sampler).

    ``body_guidance`` (with an adapter; None: one guidance for text and body together, the experiment's sampler)
    guides the body on its own, from a third pass with the caption but no body:
    uncond + guidance * (text - uncond) + body_guidance * (text and body - text)."""
    if body_guidance is not None and adapter is None:
        raise ValueError("body_guidance needs an adapter")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if init_images is not None and len(init_images) != len(captions):
        raise ValueError(f"{len(init_images)} init_images for {len(captions)} captions: give one image per caption")
    if strength < 1.0 and init_images is None:
        raise ValueError("strength < 1 needs init_images (the photos to start from)")
    start_step = img2img_start_step(strength, steps)
    passes = 2 if body_guidance is None else 3
    out = []
    empty = text([""])
    noise = initial_noise(seeds)
    for start in range(0, len(captions), batch):
        caps = captions[start : start + batch]
        n = len(caps)
        sched = make_sample_scheduler()
        sched.set_timesteps(steps)
        timesteps = sched.timesteps[start_step:]
        cond = text(caps)
        ctx = torch.cat([empty.expand(n, -1, -1), *[cond] * (passes - 1)])
        x = noise[start : start + batch].clone()
        if start_step > 0:
            x0 = to_model_range(init_images[start : start + batch])
            x = sched.add_noise(x0, x, timesteps[:1].repeat(n))
        controller = None
        if adapter is not None:
            controller = BoLIDDiffusers.attach(unet, adapter, weight_face=0.0, weight_body=1.0)
            b = bodies[start : start + batch].float()
            controller.set_identity(None, torch.cat([*[no_identity_like(b)] * (passes - 1), b]))
        try:
            for t in timesteps:
                pred = unet(torch.cat([x] * passes), t, ctx).sample
                if body_guidance is None:
                    pred = pred[:n] + guidance * (pred[n:] - pred[:n])
                else:
                    uncond, caption, both = pred[:n], pred[n : 2 * n], pred[2 * n :]
                    pred = uncond + guidance * (caption - uncond) + body_guidance * (both - caption)
                x = sched.step(pred, t, x).prev_sample
        finally:
            if controller is not None:
                controller.detach()
        out.append(to_uint8(x))
    return np.concatenate(out)


@torch.no_grad()
def body_branch_response(unet: torch.nn.Module, text: CaptionEncoder, adapter: Any, images: np.ndarray,
                         captions: list[str], own: torch.Tensor, swapped: torch.Tensor, seed: int,
                         timestep: int = 500) -> dict[str, np.ndarray]:
    """Does the body branch read its input at all, and how strongly does it act? Per image, at one fixed x_t (same
    noise everywhere), with f the model output:

    * ``swap_vs_remove`` = ||f(own) - f(swapped)|| / ||f(own) - f(no body)||. 0: the branch adds the same thing
      whatever the body (it ignores c_body); ~1 or more: swapping the person changes the output as much as
      removing the body.
    * ``body_vs_caption`` = ||f(own) - f(no body)|| / ||f(caption, no body) - f(no caption, no body)||: the body
      branch's whole effect against the caption's. Near 0: the branch is too weak to draw anything.
    """
    sched = make_train_scheduler()
    x0 = to_model_range(images)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    t = torch.full((len(images),), timestep, dtype=torch.long)
    xt = sched.add_noise(x0, noise, t)
    ctx = text(captions)
    outs = {}
    for label, body in (("own", own), ("swapped", swapped), ("none", no_identity_like(own))):
        controller = BoLIDDiffusers.attach(unet, adapter, weight_face=0.0, weight_body=1.0)
        try:
            controller.set_identity(None, body.float())
            outs[label] = unet(xt, t, ctx).sample
        finally:
            controller.detach()
    controller = BoLIDDiffusers.attach(unet, adapter, weight_face=0.0, weight_body=1.0)
    try:
        controller.set_identity(None, no_identity_like(own).float())
        no_caption = unet(xt, t, text([""] * len(captions))).sample
    finally:
        controller.detach()

    def norm(d: torch.Tensor) -> torch.Tensor:
        return d.flatten(1).norm(dim=1)

    remove = norm(outs["own"] - outs["none"])
    return {"swap_vs_remove": (norm(outs["own"] - outs["swapped"]) / remove.clamp_min(1e-12)).numpy(),
            "body_vs_caption": (remove / norm(outs["none"] - no_caption).clamp_min(1e-12)).numpy()}
