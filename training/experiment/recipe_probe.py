"""Probes of the training recipe, cheaper than a whole experiment: how far does one change move one rung?

    # stage 1 alone: halves identification and the proportion head on the held-out people
    python -m training.experiment.recipe_probe stage1 --set stage1.max_steps=1500 --out probe_stage1.json
    # the oracle adapter alone (the top of the ladder): does it transfer skin, hair and body at all?
    python -m training.experiment.recipe_probe oracle --set stage2.max_steps=900 --out probe_oracle.json
    # ... and how much of L_diff its body condition explains (training.experiment.loss_share), and what
    # guiding the body on its own at generation does (stages.generate's body_guidance)
    python -m training.experiment.recipe_probe oracle --loss-share --body-guidance 3 5 8 --out probe.json
    # the BoLID adapter alone, on the stage-1 encoder of an earlier experiment run: stage-2 recipes side by side
    # (without --encoder it trains stage 1 into the config's output_dir, as the experiment does)
    python -m training.experiment.recipe_probe bolid --encoder outputs/experiment/stage1/body_encoder.safetensors \\
        --set output_dir=outputs/probe --set stage2.learning_rate=2e-3 --out probe_bolid_lr2e-3.json
    # the positive control above the whole ladder: the frozen base model denoising each held-out person's own
    # target photo from noise level `strength` (img2img): how much identity does even a real photo carry through?
    python -m training.experiment.recipe_probe ceiling --out probe_base_ceiling.json

Same world, held-out people, captions, seeds and measurements as the experiment (``analysis.measure``); ``--set
table.key=value`` overrides the experiment config (typed, so a typo is an error). Used to choose the default
config and to show, measured, what did not help (see the README's experiment section).
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bolid.body_encoder_io import load_body_encoder
from bolid.safetensors_io import atomic_write_text

from . import stats
from .analysis import generation_rows, measure, references_of, safely, stage1_checks
from .conditions import BOLID, ORACLE, TEXT, Condition
from .config import ExperimentConfig
from .loss_share import loss_share, per_row_losses
from .report import error_ratio_to_text_only
from .run import row_bodies
from .stages import (
    generate,
    heldout_body,
    img2img_start_step,
    load_world_models,
    render_world,
    run_stage1,
    stage2_identities,
    train_adapter,
)
from .world_models import described_caption, make_sample_scheduler

logger = logging.getLogger("bolid.experiment")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["stage2.max_steps=900", ...] -> {"stage2": {"max_steps": 900}} (values read as Python literals)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected table.key=value")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        node = out
        *tables, leaf = key.split(".")
        for t in tables:
            node = node.setdefault(t, {})
        node[leaf] = value
    return out


def probe_stage1(cfg: ExperimentConfig) -> dict[str, Any]:
    unet, text, pose = load_world_models(cfg.assets)
    world = render_world(cfg)
    t0 = time.time()
    encoder, losses = run_stage1(cfg, world, pose)
    seconds = time.time() - t0
    checks = stage1_checks(cfg, world, encoder, pose, sorted(world.heldout))
    return {"stage1": checks, "train_seconds": round(seconds, 1), "final_losses": [float(v) for v in losses[-5:]]}


def probe_oracle(cfg: ExperimentConfig, body_guidance: tuple[float, ...] = (), with_loss_share: bool = False
                 ) -> dict[str, Any]:
    """Text only against the oracle adapter (true identity vector), same captions and noise; optionally the oracle
    sampled with separate body guidance, and the share of L_diff its body condition explains."""
    return probe_adapter(cfg, ORACLE, None, body_guidance, with_loss_share)


def probe_bolid(cfg: ExperimentConfig, encoder_path: Path | None = None) -> dict[str, Any]:
    """Text only against the BoLID adapter (multi-view c_body), same captions and noise. Stage 1 is trained as in
    the experiment (into ``output_dir/stage1``, like the experiment), or loaded from ``encoder_path`` (an
    experiment's ``stage1/body_encoder.safetensors``, which must be of this config's ``latent_dim``) so that
    several stage-2 recipes are compared on one encoder."""
    models = load_world_models(cfg.assets)
    world = render_world(cfg)
    if encoder_path is None:
        encoder, _ = run_stage1(cfg, world, models[2])
        source = "trained (config's stage1)"
    else:
        encoder = load_body_encoder(encoder_path)[0]
        if encoder.latent_dim != cfg.stage1.latent_dim:
            raise SystemExit(f"--encoder {encoder_path}: latent_dim {encoder.latent_dim}, the config's stage1 has "
                             f"{cfg.stage1.latent_dim}; pass the export of a run of this config")
        source = str(encoder_path)
    return probe_adapter(cfg, BOLID, encoder, models=models, world=world) | {"encoder": source}


def probe_adapter(cfg: ExperimentConfig, cond: Condition, encoder: Any, body_guidance: tuple[float, ...] = (),
                  with_loss_share: bool = False, models: tuple | None = None, world: Any = None) -> dict[str, Any]:
    """Train ``cond``'s adapter by the config's stage-2 recipe and generate text only and ``cond`` on the same
    captions and noise; each arm's means, and for ``cond`` the issue's transfer figures against text only."""
    unet, text, pose = models if models is not None else load_world_models(cfg.assets)
    world = world if world is not None else render_world(cfg)
    names = sorted(world.heldout)
    rows = generation_rows(cfg, world, names)
    t0 = time.time()
    body = cond.adapter.body
    identities = stage2_identities(world, pose, encoder if body.uses_encoder else None, cfg.seed, body)
    adapter, losses = train_adapter(cfg, identities, body.body_dim(encoder), unet, text, pose)
    seconds = time.time() - t0
    refs = references_of(world, pose, cfg.seed)
    table = {n: heldout_body(cond.body, world.heldout[n], encoder, pose) for n in names}
    own = row_bodies(table, names, rows.person)
    out: dict[str, Any] = {"train_seconds": round(seconds, 1),
                           "final_loss_mean_of_50": float(np.mean([float(r["loss"]) for r in losses[-50:]]))}
    smp = cfg.sampling
    per_arm: dict[str, dict[str, np.ndarray]] = {}

    def measured(key: str, images: np.ndarray) -> dict[str, float]:
        m = per_arm[key] = measure(pose.read(images), rows.person, refs, rows.truth_attributes)
        res = {k: float(np.mean(m[k])) for k in ("skin_error", "hair_error", "body_error", "caption_attributes",
                                                  "failed_render")}
        res["appearance_identification_top1"] = appearance_top1(m["appearance_distances"], rows.person)
        return res

    for c, ad in ((TEXT, None), (cond, adapter)):
        out[c.key] = measured(c.key, generate(unet, text, rows.captions, rows.seeds, ad,
                                              own if ad is not None else None, smp.steps, smp.guidance, smp.batch))
    out[f"{cond.key}_vs_text_only"] = transfer_vs_text(per_arm[cond.key], per_arm[TEXT.key], rows.person, cfg)
    if body_guidance:
        out[f"{cond.key}_body_guidance"] = {
            str(g): measured(f"guidance {g}", generate(unet, text, rows.captions, rows.seeds, adapter, own,
                                                       smp.steps, smp.guidance, smp.batch, body_guidance=g))
            | {"guidance": smp.guidance, "body_guidance": g}
            for g in body_guidance}
    if with_loss_share:
        swapped = row_bodies(table, names, rows.person, donor_shift=1)
        per_row = per_row_losses(unet, text, adapter, np.stack(rows.target_images), rows.captions, own, swapped, cfg.seed)
        out["loss_share"] = loss_share(per_row, rows.person, n_boot=cfg.stats.n_boot, seed=cfg.seed)
    return out


def appearance_identification(distances: np.ndarray, person: np.ndarray) -> dict[str, Any]:
    """Top-1 own-vs-others identification by appearance, by the run's rule (``stats.identification``: ties count
    against the image), with chance; ``{"undefined": why}`` where it cannot be had."""
    ident = safely(stats.identification, distances, person, np.arange(distances.shape[1]))
    return {k: ident[k] for k in ("top1", "chance", "top1_over_chance")} if "top1" in ident else ident


def appearance_top1(distances: np.ndarray, person: np.ndarray) -> float:
    return float(appearance_identification(distances, person).get("top1", float("nan")))


def transfer_vs_text(m: dict[str, np.ndarray], base: dict[str, np.ndarray], person: np.ndarray,
                     cfg: ExperimentConfig) -> dict[str, Any]:
    """The issue's transfer figures of one arm, computed as the experiment's criteria are: skin and hair error
    (means) as a ratio of text only's (NaN where text only has none), the body error's paired comparison with
    text only (``relative``: median over median - 1, person-clustered CI), and own-vs-others appearance
    identification (ties count against, as in the run) and body gap, with permutation p-values."""
    st = cfg.stats
    kw = {"n_boot": st.n_boot, "ci": st.ci, "seed": cfg.seed}
    out: dict[str, Any] = {}
    for k in ("skin_error", "hair_error"):
        out[f"{k}_ratio"] = error_ratio_to_text_only(float(np.mean(m[k])), float(np.mean(base[k])))
    out["body_error_change"] = safely(stats.paired_difference, m["body_error"], base["body_error"], person, **kw)
    cand = np.arange(m["appearance_distances"].shape[1])
    ident = appearance_identification(m["appearance_distances"], person)
    out["appearance_identification"] = ident | {
        "p_value": safely(stats.permutation_pvalue_identification, m["appearance_distances"], person,
                          n_perm=st.n_perm, seed=cfg.seed, candidate_persons=cand).get("p_value")}
    gap = safely(stats.own_minus_others, m["body_distances"], person, cand, **kw)
    out["body_own_minus_others"] = {**gap.get("summary", gap), "p_value": safely(
        stats.permutation_pvalue_own_minus_others, m["body_distances"], person, n_perm=st.n_perm, seed=cfg.seed,
        candidate_persons=cand).get("p_value")}
    out["caption_attribute_drop"] = float(np.mean(base["caption_attributes"]) - np.mean(m["caption_attributes"]))
    return out


CEILING_STRENGTHS = (0.2, 0.4, 0.6, 0.8)


def start_timestep(strength: float, steps: int) -> int | None:
    """The training timestep (of 1000) an img2img start at ``strength`` begins from; None for the photo itself."""
    if strength <= 0.0:
        return None
    sched = make_sample_scheduler()
    sched.set_timesteps(steps)
    return int(sched.timesteps[img2img_start_step(strength, steps)])


def probe_ceiling(cfg: ExperimentConfig, strengths: tuple[float, ...] = CEILING_STRENGTHS) -> dict[str, Any]:
    """How much identity survives the frozen base model itself: each held-out person's own target photo, noised to
    ``strength`` and denoised with its caption (img2img, same captions, noise, sampler and measurements as the
    experiment's text-only arm), beside the photos (strength 0), text only (strength 1) and text only with captions
    that name the person's skin, hair and proportions (row "named": the base model's own word -> trait route,
    which only pretraining captions use).

    Every adapter arm draws through this frozen model, so this is the yardstick for the ladder: an arm whose skin
    error reaches the strength-s row carries as much of the person as a real photo noised to s does. Each row:
    the probe's per-arm means, person-clustered CIs of the skin, hair and body errors, the body error's paired
    change against text only (same caption and noise), and own-vs-others appearance identification."""
    unet, text, pose = load_world_models(cfg.assets)
    world = render_world(cfg)
    names = sorted(world.heldout)
    rows = generation_rows(cfg, world, names)
    refs = references_of(world, pose, cfg.seed)
    photos = np.stack(rows.target_images)
    st, smp = cfg.stats, cfg.sampling
    arms = {"0.0": photos}
    for s in strengths:
        arms[str(s)] = generate(unet, text, rows.captions, rows.seeds, steps=smp.steps, guidance=smp.guidance,
                                batch=smp.batch, init_images=photos, strength=s)
    arms["1.0"] = generate(unet, text, rows.captions, rows.seeds, steps=smp.steps, guidance=smp.guidance,
                           batch=smp.batch)
    # the text route: the same captions naming the person's identity, as only pretraining captions do
    always = np.random.default_rng(cfg.seed)
    named = [described_caption(c, world.heldout[names[k]].identity, always, 1.0)
             for c, k in zip(rows.captions, rows.person, strict=True)]
    arms["named"] = generate(unet, text, named, rows.seeds, steps=smp.steps, guidance=smp.guidance, batch=smp.batch)
    measured = {k: measure(pose.read(v), rows.person, refs, rows.truth_attributes) for k, v in arms.items()}
    out: dict[str, Any] = {"strengths": ["0.0", *map(str, strengths), "1.0"], "images": int(len(rows.person)),
                           "named": "text only with captions that name the person's skin, hair and proportions "
                                    "(the text route)",
                           "persons": len(names), "rows": {}}
    for k, m in measured.items():
        row: dict[str, Any] = {e: float(np.mean(m[e])) for e in ("skin_error", "hair_error", "body_error",
                                                                  "caption_attributes", "failed_render")}
        # a statistic the images cannot give (e.g. too few readable bodies) is {"undefined": why}, as in the run
        for e in ("skin_error", "hair_error", "body_error"):
            row[f"{e}_summary"] = safely(stats.summarise, m[e], rows.person, n_boot=st.n_boot, ci=st.ci,
                                          seed=cfg.seed)
        row["body_error_vs_text_only"] = safely(stats.paired_difference, m["body_error"],
                                                 measured["1.0"]["body_error"], rows.person, n_boot=st.n_boot,
                                                 ci=st.ci, seed=cfg.seed)
        ident = stats.identification(m["appearance_distances"], rows.person)
        row["appearance_identification"] = {key: ident[key] for key in ("top1", "chance", "top1_over_chance")}
        row["start_timestep"] = start_timestep(1.0 if k == "named" else float(k), smp.steps)
        out["rows"][k] = row
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("stage1", "oracle", "bolid", "ceiling"))
    p.add_argument("--config", default="training/configs/experiment.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="TABLE.KEY=VALUE")
    p.add_argument("--body-guidance", type=float, nargs="+", default=[], metavar="G",
                   help="oracle: also sample with these separate body guidance scales")
    p.add_argument("--loss-share", action="store_true",
                   help="oracle: also measure how much of L_diff the body condition explains")
    p.add_argument("--encoder", type=Path, default=None,
                   help="bolid: a stage-1 export to use instead of training stage 1 (e.g. an experiment's "
                        "stage1/body_encoder.safetensors)")
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    if args.what != "oracle" and (args.body_guidance or args.loss_share):
        p.error("--body-guidance and --loss-share belong to the oracle probe")
    if args.what != "bolid" and args.encoder is not None:
        p.error("--encoder belongs to the bolid probe")
    if args.encoder is not None and not args.encoder.is_file():
        p.error(f"--encoder {args.encoder}: no such file (an experiment's stage1/body_encoder.safetensors)")
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    overrides = parse_overrides(args.overrides)
    cfg = ExperimentConfig.load(args.config, overrides)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    if args.what == "stage1":
        result = probe_stage1(cfg)
    elif args.what == "ceiling":
        result = probe_ceiling(cfg)
    elif args.what == "bolid":
        result = probe_bolid(cfg, args.encoder)
    else:
        result = probe_oracle(cfg, tuple(args.body_guidance), args.loss_share)
    result.update(probe=args.what, overrides=overrides, seconds=round(time.time() - t0, 1),
                  threads=torch.get_num_threads(), config=cfg.as_dict())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1, default=str))
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
