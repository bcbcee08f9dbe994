"""How the world's base model should be sampled: text-only quality over guidance scales and DDIM step counts.

    python -m training.experiment.sampling_sweep --config training/configs/experiment.toml \\
        --out training/experiment_assets/results/sampling_sweep.json

Same held-out captions, seeds and measurements as the experiment's text-only arm (failed renders, caption
attributes against the real-photo floor, FID in the pose model's feature space against real photos). The
experiment's ``[sampling]`` defaults are chosen from this table: the committed world model breaks most figures
at the guidance scale usual for Stable Diffusion, so the choice is measured, not assumed.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from bolid.metrics import fid_from_features
from bolid.safetensors_io import atomic_write_text

from . import stats
from .analysis import generation_rows, measure, references_of
from .config import ExperimentConfig
from .stages import generate, load_world_models, render_world

logger = logging.getLogger("bolid.experiment")
DEFAULT_GUIDANCE = (1.0, 1.25, 1.5, 2.0, 3.0)
DEFAULT_STEPS = (10, 20)


def sweep(cfg: ExperimentConfig, guidances: tuple[float, ...], step_counts: tuple[int, ...]) -> dict:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    unet, text, pose = load_world_models(cfg.assets)
    world = render_world(cfg)
    rows = generation_rows(cfg, world, sorted(world.heldout))
    train_features = pose.read(np.stack([p.image for ps in world.train.values() for p in ps])).features

    refs = references_of(world, pose, cfg.seed)

    def quality(images: np.ndarray) -> dict:
        read = pose.read(images)
        m = measure(read, rows.person, refs, rows.truth_attributes)  # the experiment's own per-image measures
        kw = {"n_boot": cfg.stats.n_boot, "ci": cfg.stats.ci, "seed": cfg.seed}
        return {"failed_render": stats.summarise(m["failed_render"], rows.person, **kw)["mean"],
                "caption_attributes": float(m["caption_attributes"].mean()),
                "fid_pose_features": fid_from_features(train_features, read.features)}

    real = quality(np.stack(rows.target_images))
    table = []
    for steps in step_counts:
        for guidance in guidances:
            t0 = time.time()
            images = generate(unet, text, rows.captions, rows.seeds, steps=steps, guidance=guidance,
                              batch=cfg.sampling.batch)
            q = quality(images)
            q.update(steps=steps, guidance=guidance, seconds=round(time.time() - t0, 1),
                     caption_attributes_vs_real_floor=q["caption_attributes"] / real["caption_attributes"],
                     fid_vs_real_photos=q["fid_pose_features"] / real["fid_pose_features"])
            logger.info("steps %d guidance %.2f: failed %.3f, caption attributes %.3f of floor, FID %.2fx real",
                        steps, guidance, q["failed_render"]["estimate"], q["caption_attributes_vs_real_floor"],
                        q["fid_vs_real_photos"])
            table.append(q)
    return {"real_photos": real, "text_only": table, "images": len(rows.captions),
            "heldout_people": len(world.heldout), "threads": torch.get_num_threads(), "config": cfg.as_dict()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="training/configs/experiment.toml")
    p.add_argument("--out", default="training/experiment_assets/results/sampling_sweep.json")
    p.add_argument("--guidance", type=float, nargs="+", default=list(DEFAULT_GUIDANCE))
    p.add_argument("--steps", type=int, nargs="+", default=list(DEFAULT_STEPS))
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    cfg = ExperimentConfig.load(args.config)
    result = sweep(cfg, tuple(args.guidance), tuple(args.steps))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1))
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
