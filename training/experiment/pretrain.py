"""Train the synthetic world's pose model and base text-to-image model once (their weights are committed).

    python -m training.experiment.pretrain --out training/experiment_assets --only pose   # keypoints + readouts
    python -m training.experiment.pretrain --out training/experiment_assets --only appearance  # reader only
    python -m training.experiment.pretrain --out training/experiment_assets --only base --threads 2  # both stages
    python -m training.experiment.pretrain --out training/experiment_assets --only describe --threads 2  # 2nd only

Everything trains on photos rendered on the fly from identities 0 .. 49_999 of world seed 0 (the experiment's
held-out identities are drawn from indices >= 1_000_000, never seen here). The pose model learns keypoints,
caption attributes and render quality (a quarter of each batch is broken on purpose, see ``render_check``), then
its appearance reader (skin, hair, build) is trained on top of the frozen keypoint network; ``--only
appearance`` retrains just that part of a saved pose model. The base model trains in two stages: first on the
experiment's captions (pose, clothing, background), then on captions that also name skin, hair and proportions
(``train_described``), which gives it a route from a word to those traits; the experiment's captions never name
them. ``--only describe`` runs the second stage on a saved first stage. Writes ``pose_net.safetensors``,
``base_unet.safetensors``, ``caption_encoder.safetensors`` (fp16) and ``pretrain_log.json`` (settings, loss
curves, run time) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bolid.synthetic import make_identity

from .config import PRETRAINING_IDENTITIES
from .render_check import TRAINED_BREAKS, break_photo
from .world_models import (
    ATTRIBUTES,
    BUILD_SLICE,
    IMAGE_SIZE,
    UNET_CONFIG,
    CaptionEncoder,
    WorldPoseNet,
    described_caption,
    load_module,
    make_base_unet,
    make_train_scheduler,
    render_world_photo,
    save_module,
    to_model_range,
)

logger = logging.getLogger("bolid.experiment")
TRAIN_IDENTITIES = PRETRAINING_IDENTITIES


def render_batch(rng: np.random.Generator, batch: int, world_seed: int = 0) -> list:
    out = []
    for _ in range(batch):
        ident = make_identity(world_seed, int(rng.integers(TRAIN_IDENTITIES)))
        out.append(render_world_photo(ident, int(rng.integers(2**31))))
    return out


def degrade(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Blur, noise and colour jitter so the pose model also reads the (blurrier) generated images."""
    b = x.shape[0]
    sigma = torch.from_numpy(rng.uniform(0.0, 0.9, b)).float()
    k = torch.arange(-2, 3).float()
    kern = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kern = kern / kern.sum(1, keepdim=True)
    xs = []
    for i in range(b):
        kx = kern[i].view(1, 1, 1, 5).expand(3, 1, 1, 5)
        ky = kern[i].view(1, 1, 5, 1).expand(3, 1, 5, 1)
        y = F.conv2d(F.pad(x[i : i + 1], (2, 2, 0, 0), mode="replicate"), kx, groups=3)
        y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="replicate"), ky, groups=3)
        xs.append(y)
    x = torch.cat(xs)
    x = x * torch.from_numpy(rng.uniform(0.85, 1.15, (b, 3, 1, 1))).float()
    x = x + torch.from_numpy(rng.normal(0, 1, x.shape) * rng.uniform(0, 0.08, (b, 1, 1, 1))).float()
    return x.clamp(-1, 1)


def gaussian_heatmaps(kp: torch.Tensor, size: int, sigma: float = 1.0) -> torch.Tensor:
    c = torch.arange(size).float() + 0.5
    gx = torch.exp(-((c.view(1, 1, size) - kp[..., 0:1]) ** 2) / (2 * sigma**2))
    gy = torch.exp(-((c.view(1, 1, size) - kp[..., 1:2]) ** 2) / (2 * sigma**2))
    h = gy.unsqueeze(-1) * gx.unsqueeze(-2)
    return h / h.flatten(2).sum(-1).clamp_min(1e-8)[..., None, None]


def partly_broken_batch(rng: np.random.Generator, batch: int, broken_fraction: float
                        ) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
    """Rendered photos, their images with about ``broken_fraction`` of them broken on purpose, which were broken,
    and which of those are blank backgrounds (no person at all)."""
    photos = render_batch(rng, batch)
    images = np.stack([p.image for p in photos])
    broken = rng.random(batch) < broken_fraction
    blank = np.zeros(batch, dtype=bool)
    for i in np.nonzero(broken)[0]:
        kind = TRAINED_BREAKS[int(rng.integers(len(TRAINED_BREAKS)))]
        blank[i] = kind == "blank"
        images[i] = break_photo(photos[i], kind, rng, other=photos[(i + 1) % batch])
    return photos, images, broken, blank


def train_pose(steps: int, batch: int, lr: float, seed: int, broken_fraction: float = 0.25
               ) -> tuple[WorldPoseNet, list[float]]:
    """Keypoints, caption attributes, appearance (skin, hair, build) and render quality. A quarter of each batch
    is broken on purpose (:data:`render_check.TRAINED_BREAKS`): those images teach the quality head (and, when
    blank, the keypoint confidence) and carry no keypoint or appearance targets."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = WorldPoseNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    losses = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / steps)))
        photos, images, broken, blank = partly_broken_batch(rng, batch, broken_fraction)
        x = degrade(to_model_range(images), rng)
        kp = torch.from_numpy(np.stack([p.keypoints for p in photos]))
        good = torch.from_numpy(~broken)
        out = net(x)
        m = good.float()[:, None, None].expand(batch, 17, 1)
        coord = (torch.abs(out["keypoints"][..., :2] - kp[..., :2]) * m).sum() / m.sum().clamp_min(1) / 2
        target = gaussian_heatmaps(kp, IMAGE_SIZE)
        heat = -(target * torch.log(out["heatmaps"] + 1e-8)).sum((2, 3))
        heat = (heat * good.float()[:, None]).sum() / (good.float().sum() * 17).clamp_min(1)
        conf_rows = torch.from_numpy(~broken | blank)  # clean (confidence 1) or blank (confidence 0)
        conf_target = torch.from_numpy(~blank).float()[:, None].expand(batch, 17)
        bce = F.binary_cross_entropy(out["keypoints"][conf_rows][..., 2].clamp(1e-6, 1 - 1e-6), conf_target[conf_rows])
        quality = F.binary_cross_entropy_with_logits(out["quality"], good.float())
        attr = F.cross_entropy(out["background"], torch.tensor(  # every image, blank ones too, shows a background
            [ATTRIBUTES["background"].index(p.attributes["background"]) for p in photos]))
        if good.any():
            for name, values in ATTRIBUTES.items():
                if name != "background":
                    labels = torch.tensor([values.index(p.attributes[name]) for p in photos])
                    attr = attr + F.cross_entropy(out[name][good], labels[good])
            idents = [make_identity(0, p.identity) for p in photos]
            skin = torch.tensor([i.skin_index for i in idents])
            hair = torch.tensor([i.hair_index for i in idents])
            build = torch.from_numpy(np.stack([i.oracle_vector()[BUILD_SLICE] for i in idents]))
            attr = attr + F.cross_entropy(out["skin"][good], skin[good]) + F.cross_entropy(out["hair"][good], hair[good])
            attr = attr + 0.5 * F.mse_loss(out["build"][good], build[good])
        loss = coord + 0.2 * heat + 0.5 * bce + 0.5 * quality + 0.3 * attr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(coord))
        if step % 50 == 0 or step == steps - 1:
            logger.info("pose %d/%d: coord L1 %.3f px, heat %.3f, quality %.3f, attr %.3f", step, steps, float(coord),
                        float(heat), float(quality), float(attr))
    return net.eval(), losses


def train_appearance(net: WorldPoseNet, steps: int, batch: int, lr: float, seed: int,
                     broken_fraction: float = 0.25) -> tuple[WorldPoseNet, list[float]]:
    """Train only the appearance reader and the quality head, on top of the frozen keypoint network."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 5)
    net.requires_grad_(False)
    params = [*net.appearance.parameters(), *net.quality.parameters()]
    for prm in params:
        prm.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    losses = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / steps)))
        photos, images, broken, _ = partly_broken_batch(rng, batch, broken_fraction)
        out = net(degrade(to_model_range(images), rng))
        good = torch.from_numpy(~broken)
        idents = [make_identity(0, p.identity) for p in photos]
        skin = torch.tensor([i.skin_index for i in idents])
        hair = torch.tensor([i.hair_index for i in idents])
        build = torch.from_numpy(np.stack([i.oracle_vector()[BUILD_SLICE] for i in idents]))
        app = F.cross_entropy(out["skin"][good], skin[good]) + F.cross_entropy(out["hair"][good], hair[good]) \
            + 0.5 * F.mse_loss(out["build"][good], build[good])
        quality = F.binary_cross_entropy_with_logits(out["quality"], good.float())
        loss = app + quality
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(app))
        if step % 50 == 0 or step == steps - 1:
            logger.info("appearance %d/%d: appearance %.3f, quality %.3f", step, steps, float(app), float(quality))
    return net.eval(), losses


def _fit_base(unet: torch.nn.Module, text: CaptionEncoder, steps: int, batch: int, lr: float,
              rng: np.random.Generator, warmup: int, drop: float, caption_of: Callable[[Any], str],
              ema_decay: Callable[[int], float], on_step: Callable[[int, dict, dict], None] | None = None,
              label: str = "base") -> list[float]:
    """The base model's training loop (v-prediction L_diff, caption dropout ``drop``, warmup then cosine to a
    tenth, gradient clipping, EMA), shared by the first pretraining stage and the identity-word stage. Leaves the
    EMA weights in ``unet`` and ``text``."""
    sched = make_train_scheduler()
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    ema_text = {k: v.detach().clone() for k, v in text.state_dict().items()}
    losses: list[float] = []
    for step in range(steps):
        for g in opt.param_groups:  # warmup, then cosine to a tenth
            g["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / steps)))
        photos = render_batch(rng, batch)
        x0 = to_model_range(np.stack([p.image for p in photos]))
        caps = [caption_of(p) if rng.random() >= drop else "" for p in photos]
        noise = torch.randn_like(x0)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,))
        xt = sched.add_noise(x0, noise, t)
        pred = unet(xt, t, text(caps)).sample
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(x0, noise, t)
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = ema_decay(step)
        with torch.no_grad():
            for src, dst in ((unet.state_dict(), ema), (text.state_dict(), ema_text)):
                for k, v in src.items():
                    if v.dtype.is_floating_point:
                        dst[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
                    else:
                        dst[k].copy_(v)
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == steps - 1:
            logger.info("%s %d/%d: loss %.4f (mean of last 50: %.4f)", label, step, steps, losses[-1],
                        float(np.mean(losses[-50:])))
        if on_step is not None:
            on_step(step, ema, ema_text)
    unet.load_state_dict(ema)
    text.load_state_dict(ema_text)
    return losses


def train_base(steps: int, batch: int, lr: float, seed: int, drop: float = 0.1, snapshot: Path | None = None,
               snapshot_every: int = 500) -> tuple[torch.nn.Module, CaptionEncoder, list[float]]:
    """First stage: the base model and caption encoder from scratch, on the experiment's own captions (pose,
    clothing, background; the vocabulary without identity words)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    unet, text = make_base_unet(), CaptionEncoder(identity_words=False)

    def save_snapshot(step: int, ema: dict, ema_text: dict) -> None:
        if snapshot is None or (step + 1) % snapshot_every != 0 or step + 1 >= steps:
            return
        # the EMA weights so far, for looking at the model while it trains (not the final result)
        snap_u, snap_t = make_base_unet(), CaptionEncoder(identity_words=False)
        snap_u.load_state_dict(ema)
        snap_t.load_state_dict(ema_text)
        save_module(snap_u, snapshot / "base_unet.snapshot.safetensors", "world_base_unet", {"steps": step + 1})
        save_module(snap_t, snapshot / "caption_encoder.snapshot.safetensors", "world_caption_encoder",
                    {"steps": step + 1})

    losses = _fit_base(unet, text, steps, batch, lr, rng, warmup=200, drop=drop, caption_of=lambda p: p.caption,
                       ema_decay=lambda step: min(0.999, (1 + step) / (10 + step)), on_step=save_snapshot)
    return unet.eval(), text.eval(), losses


def with_identity_words(text: CaptionEncoder) -> CaptionEncoder:
    """A caption encoder whose vocabulary adds the identity words, every known word keeping its trained embedding
    (the new words start from the encoder's random initialisation)."""
    wider = CaptionEncoder(identity_words=True)
    state = text.state_dict()
    embed = wider.embed.weight.detach().clone()
    for word, i in text.index.items():
        embed[wider.index[word]] = state["embed.weight"][i]
    state["embed.weight"] = embed
    wider.load_state_dict(state)
    return wider


def train_described(unet: torch.nn.Module, text: CaptionEncoder, steps: int, batch: int, lr: float, seed: int,
                    probability: float, plain: float = 0.0, drop: float = 0.1
                    ) -> tuple[torch.nn.Module, CaptionEncoder, list[float]]:
    """Second stage: go on training the first stage's model on captions that also name skin, hair and proportions
    (:func:`world_models.described_caption`), so the base learns a route from a word to those traits, as SD
    learns one from web captions; a share ``plain`` of captions stays plain, so the plain captions stay in
    distribution. The experiment's captions never name the traits: text only stays identity-free."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 7)
    text = with_identity_words(text).train()
    unet.train().requires_grad_(True)
    text.requires_grad_(True)

    def caption_of(photo: Any) -> str:
        return described_caption(photo.caption, make_identity(0, photo.identity), rng, probability, plain)

    losses = _fit_base(unet, text, steps, batch, lr, rng, warmup=50, drop=drop, caption_of=caption_of,
                       ema_decay=lambda step: 0.995, label="describe")
    return unet.eval(), text.eval(), losses


def load_first_stage(folder: Path) -> tuple[torch.nn.Module, CaptionEncoder]:
    """The saved first pretraining stage (before the identity words), to run the second on."""
    from bolid.errors import BoLIDError

    unet, text = make_base_unet(), CaptionEncoder(identity_words=False)
    load_module(unet, folder / "base_unet.safetensors", "world_base_unet")
    try:  # an encoder that already has the identity words has a larger vocabulary and does not load here
        load_module(text, folder / "caption_encoder.safetensors", "world_caption_encoder")
    except RuntimeError as exc:
        raise BoLIDError(f"{folder / 'caption_encoder.safetensors'} is not a first-stage caption encoder ({exc}); "
                         "run `--only base` to train both stages") from exc
    return unet, text


def loss_curve(losses: list[float], every: int, digits: int) -> list[float]:
    """The mean loss of each run of ``every`` steps, for the log."""
    return [round(float(np.mean(losses[i:i + every])), digits) for i in range(0, len(losses), every)]


def unet_prediction_type() -> str:
    return str(make_train_scheduler().config.prediction_type)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="training/experiment_assets")
    p.add_argument("--pose-steps", type=int, default=4000)  # 800 pulled people towards the mean skeleton
    p.add_argument("--pose-batch", type=int, default=64)
    p.add_argument("--base-steps", type=int, default=3500)
    p.add_argument("--base-batch", type=int, default=32)
    p.add_argument("--base-lr", type=float, default=1.5e-3)
    p.add_argument("--snapshot-dir", default=None, help="write EMA snapshots here every 500 steps (not committed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--appearance-steps", type=int, default=600)
    p.add_argument("--describe-steps", type=int, default=3000)
    p.add_argument("--describe-lr", type=float, default=1e-3)
    p.add_argument("--describe-probability", type=float, default=1.0,
                   help="chance that a described caption names each trait (skin, hair, each proportion word)")
    p.add_argument("--describe-plain", type=float, default=0.2,
                   help="share of second-stage captions left plain (no identity words at all); with a probability "
                        "below 1 a caption whose every draw failed is plain too, and caption dropout empties a tenth")
    p.add_argument("--only", choices=("pose", "appearance", "base", "describe", "both"), default="both",
                   help="appearance: retrain only the pose model's appearance reader and quality head; base: both "
                        "stages of the base model; describe: only its second stage, on the saved first stage")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default); 1 is much faster on a busy machine")
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    p_threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(p_threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "pretrain_log.json"

    def read_log() -> dict:  # re-read before each write: a pose and a base run may share the folder
        log = json.loads(log_path.read_text()) if log_path.is_file() else {}
        return {k: v for k, v in log.items() if k in ("pose", "appearance", "base", "describe")}

    def write_log(log: dict) -> None:
        from bolid.safetensors_io import atomic_write_text

        atomic_write_text(log_path, json.dumps(log, indent=1))

    log: dict = {}
    if args.only in ("pose", "both"):
        t0 = time.time()
        net, losses = train_pose(args.pose_steps, args.pose_batch, 2e-3, args.seed)
        save_module(net, out / "pose_net.safetensors", "world_pose_net", {"steps": args.pose_steps})
        log = read_log()
        log["pose"] = {"steps": args.pose_steps, "batch": args.pose_batch, "seconds": round(time.time() - t0, 1),
                       "final_coord_l1_px": float(np.mean(losses[-50:])), "threads": torch.get_num_threads(),
                       "coord_l1_px_every_50_steps": loss_curve(losses, 50, 4)}
        write_log(log)
    if args.only in ("pose", "appearance", "both"):
        t0 = time.time()
        if args.only == "appearance":  # on the saved keypoint network
            net = WorldPoseNet()
            load_module(net, out / "pose_net.safetensors", "world_pose_net", strict=False)
        net, losses = train_appearance(net, args.appearance_steps, args.pose_batch, 2e-3, args.seed)
        save_module(net, out / "pose_net.safetensors", "world_pose_net", {"steps": args.pose_steps,
                                                                          "appearance_steps": args.appearance_steps})
        log = read_log()
        log["appearance"] = {"steps": args.appearance_steps, "batch": args.pose_batch,
                             "seconds": round(time.time() - t0, 1), "final_loss": float(np.mean(losses[-50:])),
                             "loss_every_50_steps": loss_curve(losses, 50, 4)}
        write_log(log)
    if args.only in ("base", "both"):
        t0 = time.time()
        unet, text, losses = train_base(args.base_steps, args.base_batch, args.base_lr, args.seed,
                                        snapshot=Path(args.snapshot_dir) if args.snapshot_dir else None)
        save_module(unet, out / "base_unet.safetensors", "world_base_unet", {"steps": args.base_steps})
        save_module(text, out / "caption_encoder.safetensors", "world_caption_encoder", {"steps": args.base_steps})
        log = read_log()
        log["base"] = {"steps": args.base_steps, "batch": args.base_batch, "lr": args.base_lr,
                       "seconds": round(time.time() - t0, 1), "final_loss": float(np.mean(losses[-100:])),
                       "threads": torch.get_num_threads(), "prediction_type": unet_prediction_type(),
                       "unet_config": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CONFIG.items()},
                       "loss_every_100_steps": loss_curve(losses, 100, 5)}
        write_log(log)
    if args.only in ("base", "describe", "both"):
        t0 = time.time()
        if args.only == "describe":  # otherwise unet and text are the first stage just trained
            unet, text = load_first_stage(out)
        unet, text, losses = train_described(unet, text, args.describe_steps, args.base_batch, args.describe_lr,
                                             args.seed, args.describe_probability, args.describe_plain)
        extra = {"steps": args.base_steps, "describe_steps": args.describe_steps, "identity_words": True}
        save_module(unet, out / "base_unet.safetensors", "world_base_unet", extra)
        save_module(text, out / "caption_encoder.safetensors", "world_caption_encoder", extra)
        log = read_log()
        log["describe"] = {"steps": args.describe_steps, "batch": args.base_batch, "lr": args.describe_lr,
                           "probability": args.describe_probability,
                           "plain": args.describe_plain, "seconds": round(time.time() - t0, 1),
                           "final_loss": float(np.mean(losses[-100:])), "threads": torch.get_num_threads(),
                           "loss_every_100_steps": loss_curve(losses, 100, 5)}
        write_log(log)
    logger.info("pretrain done: %s", log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
