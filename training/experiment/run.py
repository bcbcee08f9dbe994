"""The CPU experiment: does BoLID transfer body identity in the synthetic-people world?

    python -m training.experiment --config training/configs/experiment.toml

Steps (all in-process, on the committed world models of ``training/experiment_assets``, see ``pretrain.py``):

1. Render the world (:mod:`bolid.synthetic`): training identities (photos + captions) and HELD-OUT identities
   (never seen by stage 1, stage 2, the base model or the pose model), each with reference photos and target
   photos whose captions drive the generation.
2. Stage 1 (:func:`training.stage1.train_stage1`): the Body-ID VAE on the training identities; the dataset is
   prepared through the world's pose model (not the renderer's exact keypoints).
3. Stage 2 (:func:`training.stage2_core.train_stage2_loop`): the adapter on the frozen base model, leave-one-out
   (the default), and a second adapter trained on the target itself (the target view is among the context
   views: ``target_in_context``), for the comparison the paper's design argues about.
4. Generate for every held-out (identity, target caption, seed) under each condition with the same noise, and
   evaluate with :mod:`training.evaluate` / :mod:`bolid.metrics`: body error (proportions through the pose model
   vs the identity's reference photos), body found, caption-attribute accuracy (the world's CLIP-T stand-in: the
   pose model's attribute heads read pose/view/clothes/background back), FID in pose-model feature space.
   Paired differences against text only (same caption, same noise) come with their standard errors.

Writes ``results.{md,csv,json}``, ``results_*.png`` plots and ``grid.png`` into the output folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from bolid.body_encoder import BodyEncoder, crop_person, encode_body, load_body_encoder
from bolid.body_id_io import load_body_id, save_body_id
from bolid.diffusers_integration import BoLIDDiffusers, adapter_config_for_unet, init_adapter_from_unet
from bolid.keypoints import PersonPose
from bolid.synthetic import SyntheticPhoto, make_identity, render_photo

from ..evaluate import evaluate_condition, identity_references, write_report
from .world_models import (
    ATTRIBUTES,
    IMAGE_SIZE,
    CaptionEncoder,
    WorldPoseNet,
    load_module,
    make_base_unet,
    make_sample_scheduler,
    make_train_scheduler,
    to_model_range,
    to_uint8,
)

logger = logging.getLogger("bolid.experiment")
HELDOUT_OFFSET = 1_000_000  # held-out identity indices start here (pretraining uses 0 .. 49_999)
REPO_ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------- config


@dataclass
class ExperimentConfig:
    output_dir: Path
    assets: Path
    seed: int = 0
    threads: int = 0
    world: dict[str, Any] = field(default_factory=dict)
    stage1: dict[str, Any] = field(default_factory=dict)
    stage2: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
        path = Path(path).resolve()
        with open(path, "rb") as f:
            raw = tomllib.load(f)
        for key, value in (overrides or {}).items():
            raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
        base = path.parent
        known = {"output_dir", "assets", "seed", "threads", "world", "stage1", "stage2", "sampling"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(known)}")
        return cls(output_dir=(base / raw["output_dir"]).resolve(), assets=(base / raw["assets"]).resolve(),
                   seed=int(raw.get("seed", 0)), threads=int(raw.get("threads", 0)), world=dict(raw["world"]),
                   stage1=dict(raw["stage1"]), stage2=dict(raw["stage2"]), sampling=dict(raw["sampling"]))


# ----------------------------------------------------------------------------------------------- world models


class WorldPose:
    """The world's pose model as everything BoLID wants: a pose runner (PersonPose), a keypoint function for the
    metrics, and a differentiable pose net for L_id."""

    fingerprint = "world-pose-net"

    def __init__(self, net: WorldPoseNet) -> None:
        self.net = net.eval().requires_grad_(False)

    @torch.no_grad()
    def keypoints(self, images: list[np.ndarray] | np.ndarray, batch: int = 128) -> np.ndarray:
        out = []
        arr = np.stack(list(images))
        for i in range(0, len(arr), batch):
            out.append(self.net(to_model_range(arr[i : i + batch]))["keypoints"].numpy())
        return np.concatenate(out).astype(np.float32)

    @torch.no_grad()
    def attributes(self, images: list[np.ndarray] | np.ndarray) -> list[dict[str, str]]:
        arr = np.stack(list(images))
        return self.net.predict_attributes(to_model_range(arr))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> pooled features (FID in the pose model's feature space)."""
        return self.net(images.float() / 127.5 - 1.0)["features"]

    def detect(self, images: list[np.ndarray]) -> list[list[PersonPose]]:
        kp = self.keypoints(images)
        return [[person_from_keypoints(k)] if k[5:, 2].mean() > 0.3 else [] for k in kp]

    def pose_net(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage-2 L_id: images [B, 3, H, W] in 0..1 -> (xy [B, 17, 2] pixels, confidence [B, 17])."""
        kp = self.net(images * 2.0 - 1.0)["keypoints"]
        return kp[..., :2], kp[..., 2]


def person_from_keypoints(kp: np.ndarray, pad: float = 2.0) -> PersonPose:
    lo, hi = kp[:, :2].min(0) - pad, kp[:, :2].max(0) + pad
    return PersonPose(box=np.concatenate([lo, hi]), score=float(kp[:, 2].mean()), keypoints=kp)


class _FeatureModule(torch.nn.Module):
    def __init__(self, pose: WorldPose) -> None:
        super().__init__()
        self.pose = pose

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pose.features(x)


def load_world(assets: Path) -> tuple[torch.nn.Module, CaptionEncoder, WorldPose]:
    unet, text, pose = make_base_unet(), CaptionEncoder(), WorldPoseNet()
    load_module(unet, assets / "base_unet.safetensors", "world_base_unet")
    load_module(text, assets / "caption_encoder.safetensors", "world_caption_encoder")
    load_module(pose, assets / "pose_net.safetensors", "world_pose_net")
    for m in (unet, text, pose):
        m.eval().requires_grad_(False)
    return unet, text, WorldPose(pose)


# ----------------------------------------------------------------------------------------------- data


def render_world(cfg: ExperimentConfig) -> dict[str, Any]:
    w = cfg.world
    seed = cfg.seed
    train = {}
    for i in range(int(w["train_identities"])):
        ident = make_identity(seed, i)
        train[f"train_{i:03d}"] = [render_photo(ident, seed * 7919 + j, size=IMAGE_SIZE)
                                   for j in range(int(w["photos_per_identity"]))]
    held = {}
    n_ref, n_tgt = int(w["heldout_reference_photos"]), int(w["heldout_target_photos"])
    for k in range(int(w["heldout_identities"])):
        ident = make_identity(seed, HELDOUT_OFFSET + k)
        photos = [render_photo(ident, seed * 7919 + 500 + j, size=IMAGE_SIZE) for j in range(n_ref + n_tgt)]
        held[f"heldout_{k:03d}"] = {"identity": ident, "references": photos[:n_ref], "targets": photos[n_ref:]}
    return {"train": train, "heldout": held}


def write_identity_folders(train: dict[str, list[SyntheticPhoto]], root: Path) -> None:
    from PIL import Image

    for name, photos in train.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for j, p in enumerate(photos):
            Image.fromarray(p.image).save(folder / f"{j:02d}.png")
            (folder / f"{j:02d}.txt").write_text(p.caption, encoding="utf-8")


# ----------------------------------------------------------------------------------------------- stage 1


def run_stage1(cfg: ExperimentConfig, world: dict[str, Any], pose: WorldPose) -> BodyEncoder:
    from training.stage1 import Stage1Config, train_stage1

    root = cfg.output_dir / "data" / "train"
    write_identity_folders(world["train"], root)
    s1 = dict(cfg.stage1)
    model = {k: s1.pop(k) for k in ("latent_dim", "crop_size", "decoder_size", "width", "hidden") if k in s1}
    raw = {"stage": 1, "output_dir": str(cfg.output_dir / "stage1"), "seed": cfg.seed, "model": model,
           "dataset": {"cache_dir": str(cfg.output_dir / "stage1_cache"), "min_resolution": IMAGE_SIZE,
                       "crop_size": model.get("crop_size", 32), "max_context_views": 4,
                       "subsets": [{"root": str(root)}]},
           "training": {"warmup_steps": 20, "kl_warmup_steps": 50, "num_workers": 0, "report_to": "none",
                        "checkpointing_steps": 10**9, "checkpoints_total_limit": 1, **s1}}
    result = train_stage1(Stage1Config.from_dict(raw), pose_runner=pose)
    logger.info("stage 1: %d steps, last losses %s", result["step"], result["losses"][-3:])
    return load_body_encoder(result["export"])


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


# ----------------------------------------------------------------------------------------------- stage 2


def run_stage2(cfg: ExperimentConfig, world: dict[str, Any], encoder: BodyEncoder, unet: torch.nn.Module,
               text: CaptionEncoder, pose: WorldPose, target_in_context: bool) -> tuple[Any, list[dict]]:
    from training.stage2_core import (
        LossConfig,
        SamplingConfig,
        Stage2Components,
        Stage2Data,
        Stage2Identity,
        Stage2TrainingConfig,
        train_stage2_loop,
    )

    s2 = cfg.stage2
    identities = []
    for name, photos in world["train"].items():
        mu, logvar, weights, kps = view_posteriors(encoder, photos, pose)
        samples = [t for t in to_model_range(np.stack([p.image for p in photos]))]
        identities.append(Stage2Identity(name=name, samples=samples, captions=[p.caption for p in photos],
                                         body_mu=mu, body_logvar=logvar, body_weights=weights,
                                         keypoints=torch.from_numpy(kps)))
    components = Stage2Components(unet=unet, noise_scheduler=make_train_scheduler(), vae=None,
                                  encode_text=lambda caps: (text(list(caps)), None), pose_net=pose.pose_net,
                                  base_model="synthetic-world-base")
    sampling = SamplingConfig(max_context_views=int(s2.get("max_context_views", 4)), seed=cfg.seed,
                              drop_text=float(s2.get("drop_text", 0.05)), drop_face=0.0,
                              drop_body=float(s2.get("drop_body", 0.05)), drop_all=float(s2.get("drop_all", 0.05)))
    data = Stage2Data(identities, sampling, components=components)
    if target_in_context:
        data = _TargetInContext(data)
    adapter = init_adapter_from_unet(unet, adapter_config_for_unet(
        unet, body_dim=encoder.latent_dim, body_tokens=int(s2.get("body_tokens", 4)), face_tokens=1))
    tc = Stage2TrainingConfig(max_steps=int(s2["max_steps"]), batch_size=int(s2["batch_size"]),
                              learning_rate=float(s2["learning_rate"]), warmup_steps=int(s2.get("warmup_steps", 20)),
                              lr_schedule="cosine", report_to="none", export_ip_adapter=False)
    lc = LossConfig(id_weight=float(s2.get("id_weight", 0.0)), id_max_timestep=int(s2.get("id_max_timestep", 400)))
    result = train_stage2_loop(components, adapter, data, tc, lc, output_dir=None, seed=cfg.seed)
    return result["adapter"].eval().requires_grad_(False), result["losses"]


class _TargetInContext:
    """Stage2Data whose context views always include the target itself ("training on the target"), the
    counterpart of leave-one-out: c_body may then carry the target photo's own appearance."""

    def __init__(self, data: Any) -> None:
        self._data = data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._data, name)

    def batch(self, index: int, batch_size: int) -> dict[str, Any]:
        from bolid.body_encoder import aggregate_views

        batch = self._data.batch(index, batch_size)
        bodies = []
        for r in range(batch_size):
            ident = self._data.identities[batch["identity_index"][r]]
            ctx = sorted({*batch["context_indices"][r], batch["target_index"][r]})
            mu, _ = aggregate_views(ident.body_mu[ctx].float(), ident.body_logvar[ctx].float(),
                                    ident.body_weights[ctx].float(), self._data.sampling.prior_expert)
            bodies.append(mu if bool(batch["body_present"][r]) else torch.zeros_like(mu))
        batch["body"] = torch.stack(bodies)
        return batch


# ----------------------------------------------------------------------------------------------- sampling


@torch.no_grad()
def generate(unet: torch.nn.Module, text: CaptionEncoder, captions: list[str], seeds: list[int],
             adapter: Any = None, bodies: torch.Tensor | None = None, steps: int = 20, guidance: float = 3.0,
             batch: int = 64) -> np.ndarray:
    """DDIM with classifier-free guidance; the unconditional branch has no text and (with an adapter) a zero
    body, as in training's condition dropout. Same seed -> same initial noise in every condition."""
    out = []
    empty = text([""])
    for start in range(0, len(captions), batch):
        caps = captions[start : start + batch]
        n = len(caps)
        sched = make_sample_scheduler()
        sched.set_timesteps(steps)
        cond = text(caps)
        ctx = torch.cat([empty.expand(n, -1, -1), cond])
        x = torch.stack([torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(int(s)))
                         for s in seeds[start : start + batch]])
        controller = None
        if adapter is not None:
            controller = BoLIDDiffusers.attach(unet, adapter, weight_face=0.0, weight_body=1.0)
            b = bodies[start : start + batch].float()
            controller.set_identity(None, torch.cat([torch.zeros_like(b), b]))
        try:
            for t in sched.timesteps:
                pred = unet(torch.cat([x, x]), t, ctx).sample
                pred = pred[:n] + guidance * (pred[n:] - pred[:n])
                x = sched.step(pred, t, x).prev_sample
        finally:
            if controller is not None:
                controller.detach()
        out.append(to_uint8(x))
    return np.concatenate(out)


# ----------------------------------------------------------------------------------------------- evaluation


def attribute_accuracy(pred: list[dict[str, str]], truth: list[dict[str, str]]) -> np.ndarray:
    """Per image: fraction of caption attributes the pose model reads back from the image."""
    return np.array([np.mean([p[k] == t[k] for k in ATTRIBUTES]) for p, t in zip(pred, truth, strict=True)])


def own_minus_others(keypoints: np.ndarray, identities: list[str],
                     references: dict[str, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Per image: body error against its own identity minus the mean error against the other held-out
    identities. Negative = the generated body is closer to its own identity than to other people (identity-
    specific); ~0 = no identity information, whatever the absolute error."""
    from bolid.metrics import body_consistency

    names = sorted(references)
    errs = np.stack([body_consistency(keypoints, references[n][0], references[n][1]).errors for n in names], 1)
    own = np.array([names.index(i) for i in identities])
    mask = np.ones_like(errs, dtype=bool)
    mask[np.arange(len(own)), own] = False
    others = np.where(mask, errs, np.nan)
    return errs[np.arange(len(own)), own] - np.nanmean(others, 1)


def _paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    ok = np.isfinite(a) & np.isfinite(b)
    d = a[ok] - b[ok]
    if len(d) < 2:
        return float("nan"), float("nan")
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def grid_image(rows: list[list[np.ndarray]], labels: list[str], path: Path, scale: int = 3) -> None:
    """A labelled PNG grid: one row per held-out identity, one column per condition."""
    from PIL import Image, ImageDraw

    cell = IMAGE_SIZE * scale
    pad = 4
    head = 28
    w = len(labels) * (cell + pad) + pad
    h = head + len(rows) * (cell + pad) + pad
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(labels):
        x = pad + c * (cell + pad)
        for k, part in enumerate(label.split("\n")[:2]):
            draw.text((x, 2 + 12 * k), part[:16], fill=(0, 0, 0))
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            tile = Image.fromarray(im).resize((cell, cell), Image.Resampling.NEAREST)
            canvas.paste(tile, (pad + c * (cell + pad), head + pad + r * (cell + pad)))
    canvas.save(path)


def run(cfg: ExperimentConfig) -> dict[str, Any]:
    t_start = time.time()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def lap(name: str, t0: float) -> None:
        timings[name] = round(time.time() - t0, 1)
        logger.info("experiment: %s done in %.1f s", name, timings[name])

    t0 = time.time()
    unet, text, pose = load_world(cfg.assets)
    world = render_world(cfg)
    lap("world", t0)

    t0 = time.time()
    encoder = run_stage1(cfg, world, pose)
    lap("stage1", t0)

    t0 = time.time()
    adapter_loo, losses_loo = run_stage2(cfg, world, encoder, unet, text, pose, target_in_context=False)
    lap("stage2_leave_one_out", t0)
    adapter_self = None
    if cfg.stage2.get("compare_target_in_context", True):
        t0 = time.time()
        adapter_self, _ = run_stage2(cfg, world, encoder, unet, text, pose, target_in_context=True)
        lap("stage2_target_in_context", t0)

    # ---------------------------------------------------------------- conditions on held-out identities
    t0 = time.time()
    smp = cfg.sampling
    steps, guidance = int(smp["steps"]), float(smp["guidance"])
    n_seeds = int(smp.get("seeds_per_caption", 1))
    held = world["heldout"]
    names = sorted(held)
    ids_dir = out / "body_ids"
    ids_dir.mkdir(exist_ok=True)
    ref_kp, multi, single, stored, truth_attrs = {}, {}, {}, {}, []
    for name in names:
        refs = held[name]["references"]
        images = [p.image for p in refs]
        poses = [person_from_keypoints(k) for k in pose.keypoints(images)]
        ref_kp[name] = np.stack([p.keypoints for p in poses])
        res = encode_body(encoder, images, poses, names=[f"{name}/{j}" for j in range(len(images))])
        multi[name] = res.body_id.c_body
        single[name] = encode_body(encoder, images[:1], poses[:1]).body_id.c_body
        path = save_body_id(res.body_id, ids_dir / f"{name}.safetensors", overwrite=True)
        stored[name] = load_body_id(path).c_body  # text-only mode: the identity comes back from its file
    references = identity_references(ref_kp)
    rows_id, captions, seeds, targets = [], [], [], []
    for k, name in enumerate(names):
        for j, tgt in enumerate(held[name]["targets"]):
            for s in range(n_seeds):
                rows_id.append(name)
                captions.append(tgt.caption)
                seeds.append(cfg.seed * 100_003 + k * 1000 + j * 10 + s)
                targets.append(tgt)
                truth_attrs.append(tgt.attributes)
    wrong = {name: multi[names[(i + 1) % len(names)]] for i, name in enumerate(names)}

    def stack(table: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([table[n] for n in rows_id])

    conditions: list[tuple[str, Any, torch.Tensor | None]] = [
        ("text only (base model)", None, None),
        ("BoLID, multi-view Body ID", adapter_loo, stack(multi)),
        ("BoLID, single photo", adapter_loo, stack(single)),
        ("BoLID, stored Body ID (file, text-only mode)", adapter_loo, stack(stored)),
        ("BoLID, another person's Body ID (control)", adapter_loo, stack(wrong)),
    ]
    if adapter_self is not None:
        conditions.append(("BoLID trained on the target itself, multi-view", adapter_self, stack(multi)))
    generated = {"real held-out photos (pose-model floor)": np.stack([t.image for t in targets])}
    for label, adapter, bodies in conditions:
        generated[label] = generate(unet, text, captions, seeds, adapter, bodies, steps, guidance)
    lap("generation", t0)

    # ---------------------------------------------------------------- metrics
    t0 = time.time()
    real_pool = np.stack([p.image for ps in world["train"].values() for p in ps])
    feature = _FeatureModule(pose)
    rows = []
    base_errors = None
    for label, images in generated.items():
        row = evaluate_condition(list(images), rows_id, captions, references, pose.keypoints,
                                 fid_extractor=feature, real_images=real_pool)
        acc = attribute_accuracy(pose.attributes(images), truth_attrs)
        row["attributes"], row["attributes_sem"] = float(acc.mean()), float(acc.std(ddof=1) / math.sqrt(len(acc)))
        errs = np.asarray(row["per_image"]["body_error"])
        if label.startswith("text only"):
            base_errors = errs
        if base_errors is not None and not label.startswith("real"):
            row["delta_vs_text"], row["delta_vs_text_sem"] = _paired(errs, base_errors)
        row["per_image"]["attributes"] = acc.tolist()
        gap = own_minus_others(pose.keypoints(images), rows_id, references)
        row["own_vs_others"], row["own_vs_others_sem"] = float(np.nanmean(gap)), _paired(gap, np.zeros_like(gap))[1]
        row["per_image"]["own_vs_others"] = gap.tolist()
        rows.append({"condition": label, **row})
    same = np.abs(generated["BoLID, stored Body ID (file, text-only mode)"].astype(int)
                  - generated["BoLID, multi-view Body ID"].astype(int)).max()
    # diagnostics: does c_body hold the body (stage 1)? does the adapter change the images at all (stage 2)?
    truth = np.stack([held[n]["identity"].proportion_vector() for n in names])
    with torch.no_grad():
        predicted = encoder.predict_proportions(torch.stack([multi[n] for n in names])).double().numpy()
    train_mean = np.mean([make_identity(cfg.seed, i).proportion_vector()
                          for i in range(int(cfg.world["train_identities"]))], axis=0)
    mv = generated["BoLID, multi-view Body ID"].astype(np.float64)
    diagnostics = {
        "encoder_proportion_rmse_vs_truth": float(np.sqrt(np.mean((predicted - truth) ** 2))),
        "population_mean_proportion_rmse_vs_truth": float(np.sqrt(np.mean((train_mean - truth) ** 2))),
        "mean_abs_pixel_change_bolid_vs_text_only": float(np.abs(mv - generated["text only (base model)"]).mean()),
        "mean_abs_pixel_change_own_vs_other_body_id": float(np.abs(
            mv - generated["BoLID, another person's Body ID (control)"]).mean()),
    }
    true_spread = float(np.mean([np.sqrt(np.mean((held[a]["identity"].proportion_vector()
                                                  - held[b]["identity"].proportion_vector()) ** 2))
                                 for a in names for b in names if a != b]))
    lap("metrics", t0)

    titles = {"attributes": "caption attrs ↑", "delta_vs_text": "Δ body err vs text", "fid": "FID (pose feats) ↓",
              "own_vs_others": "own − others ↓"}
    columns = ["body_error", "delta_vs_text", "own_vs_others", "body_detected", "attributes", "fid"]
    timings["total"] = round(time.time() - t_start, 1)
    extra = {"timings_s": timings, "diagnostics": diagnostics, "stored_vs_multiview_max_pixel_diff": int(same),
             "heldout_identities": names, "images_per_condition": len(captions),
             "mean_true_proportion_rms_between_heldout_identities": true_spread,
             "stage2_final_losses": losses_loo[-5:], "config": {k: v for k, v in vars(cfg).items()
                                                                if k not in ("output_dir", "assets")},
             "face_ablations": "skipped: the synthetic world has no faces (heads without facial features)"}
    paths = write_report(rows, out, columns, titles, plot_metrics=["body_error", "attributes"], extra=extra)

    # ---------------------------------------------------------------- grid: one row per held-out identity
    labels = ["reference", "target photo", "text only", "BoLID\nmulti-view", "BoLID\nsingle photo",
              "other person's\nBody ID"] + (["trained on\ntarget"] if adapter_self is not None else [])
    keys = ["text only (base model)", "BoLID, multi-view Body ID", "BoLID, single photo",
            "BoLID, another person's Body ID (control)"] + \
        (["BoLID trained on the target itself, multi-view"] if adapter_self is not None else [])
    grid_rows = []
    for name in names:
        first = rows_id.index(name)
        grid_rows.append([held[name]["references"][0].image, targets[first].image]
                         + [generated[k][first] for k in keys])
    grid_image(grid_rows, labels, out / "grid.png")
    summary = {"rows": [{k: v for k, v in r.items() if k != "per_image"} for r in rows], **extra,
               "files": {k: str(v) for k, v in paths.items()} | {"grid": str(out / "grid.png")}}
    logger.info("experiment finished in %.1f s; results in %s", timings["total"], paths["md"])
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="BoLID CPU experiment on the synthetic-people world")
    p.add_argument("--config", default=str(REPO_ROOT / "training" / "configs" / "experiment.toml"))
    p.add_argument("--output-dir", default=None, help="overrides the config's output_dir")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    cfg = ExperimentConfig.load(args.config)
    if args.output_dir:
        cfg.output_dir = Path(args.output_dir).resolve()
    summary = run(cfg)
    print((Path(summary["files"]["md"])).read_text(encoding="utf-8"))
    print(json.dumps({k: summary[k] for k in ("timings_s", "diagnostics", "stored_vs_multiview_max_pixel_diff",
                                              "mean_true_proportion_rms_between_heldout_identities")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
