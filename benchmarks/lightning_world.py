"""The Lightning branch in the CPU world: does L_id on a K-step image beat L_id on the one-step x0?

    OMP_NUM_THREADS=1 python benchmarks/lightning_world.py [--config training/configs/experiment.toml]
        [--out outputs/lightning_world] [--body bolid|oracle] [--stage2-steps N] [--k 4] [--every 2] [--rows 8]

Three adapters with the same budget (the experiment's stage-2 recipe, seed, batches and noise; only the source
of L_id's image differs): **one-step** (L_id on the x0 predicted at t < id_max_timestep, the default),
**lightning** (L_id on an image generated from pure noise in K Euler/trailing steps with the adapter active,
gradient through the last step) and **no L_id** (id_weight 0). The world's base model is a v-prediction pixel
UNet; its few-step sampler is the SDXL-Lightning one (Euler, trailing spacing) at K steps. Every adapter then
generates every (held-out person, target caption) with the same noise, with the world's sampler (DDIM, 10 steps,
guidance 1.5) and with the K-step sampler, and the experiment's readout and statistics measure body error,
own - others and caption attributes (person-clustered bootstrap CIs, permutation p-values, paired differences
against the one-step adapter and against text only). Writes ``results.json`` and ``run.log`` to ``--out``.

It reuses the experiment's public functions (:mod:`training.experiment`): its arms are experiment conditions
(``conditions.Condition``, with the ``lightning`` option of their adapter recipe) trained by ``run.train_adapters``,
so every arm trains by the experiment's own recipe.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bolid.identity import no_identity_like  # noqa: E402
from bolid.safetensors_io import atomic_write_text  # noqa: E402
from training.experiment import stats  # noqa: E402
from training.experiment.analysis import generation_rows  # noqa: E402
from training.experiment.conditions import TEXT, AdapterRecipe, Condition, TrainingBody  # noqa: E402
from training.experiment.config import ExperimentConfig  # noqa: E402
from training.experiment.report import json_default, num  # noqa: E402
from training.experiment.run import Laps, analyse, row_bodies, train_adapters  # noqa: E402
from training.experiment.stages import (  # noqa: E402
    generate,
    heldout_body,
    initial_noise,
    load_world_models,
    render_world,
    run_stage1,
)
from training.experiment.world_models import make_train_scheduler, to_uint8  # noqa: E402
from training.lightning_branch import LightningConfig, trailing_timesteps  # noqa: E402

logger = logging.getLogger("bolid.lightning_world")


@torch.no_grad()
def generate_few_step(unet: torch.nn.Module, text: Any, captions: list[str], seeds: list[int], adapter: Any,
                      bodies: torch.Tensor | None, steps: int, guidance: float) -> np.ndarray:
    """The SDXL-Lightning sampler (diffusers' Euler, trailing spacing) at ``steps`` steps on the world's base,
    with the same noise and unconditional branch as ``stages.generate``."""
    from diffusers import EulerDiscreteScheduler

    from bolid.diffusers_integration import BoLIDDiffusers

    sched = EulerDiscreteScheduler.from_config(make_train_scheduler().config, timestep_spacing="trailing")
    sched.set_timesteps(steps)
    n = len(captions)
    ctx = torch.cat([text([""]).expand(n, -1, -1), text(captions)])
    x = initial_noise(seeds) * sched.init_noise_sigma
    controller = None
    if adapter is not None:
        controller = BoLIDDiffusers.attach(unet, adapter, weight_face=0.0, weight_body=1.0)
        controller.set_identity(None, torch.cat([no_identity_like(bodies), bodies]).float())
    try:
        for t in sched.timesteps:
            pred = unet(sched.scale_model_input(torch.cat([x, x]), t), t, ctx).sample
            pred = pred[:n] + guidance * (pred[n:] - pred[:n])
            x = sched.step(pred, t, x).prev_sample
    finally:
        if controller is not None:
            controller.detach()
    return to_uint8(x.clamp(-1, 1))


def lightning_conditions(body: TrainingBody, lightning: LightningConfig) -> tuple[Condition, Condition, Condition]:
    """The three adapters, all with ``body`` (the config's id_weight unless switched off): L_id on the one-step
    x0, L_id on the ``lightning`` branch's image, no L_id. Text only (:data:`TEXT`) is the fourth arm."""
    def condition(key: str, label: str, id_weight: float | None, lcfg: LightningConfig) -> Condition:
        return Condition(key, label, AdapterRecipe(key, body, id_weight, lightning=lcfg), body.heldout_body)

    return (condition("one_step", "L_id on the one-step x0", None, LightningConfig()),
            condition("lightning", "L_id on a K-step Lightning image", None, lightning),
            condition("no_id", "no L_id (id_weight 0)", 0.0, LightningConfig()))


def headline(res: dict[str, Any]) -> dict[str, Any]:
    """The figures the README quotes, per arm (None where a statistic is undefined)."""
    def value(*keys: str) -> float | None:
        return num(res, *keys, missing=None)

    return {
        "body_error_median": res["summary"]["body_error"].get("median"),
        "body_error_mean": value("summary", "body_error", "mean", "estimate"),
        "body_own_minus_others": value("body_own_minus_others", "mean", "estimate"),
        "body_own_minus_others_p": value("body_own_minus_others", "p_value"),
        "appearance_identification_top1": value("appearance_identification", "top1"),
        "appearance_identification_p": value("appearance_identification", "p_value"),
        "caption_attributes_mean": value("summary", "caption_attributes", "mean", "estimate"),
        "failed_render_mean": value("summary", "failed_render", "mean", "estimate"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "training/configs/experiment.toml"))
    parser.add_argument("--out", default=str(REPO / "outputs/lightning_world"))
    parser.add_argument("--body", choices=("bolid", "oracle"), default="bolid",
                        help="condition: the stage-1 c_body (bolid) or the true identity vector (oracle, no stage 1)")
    parser.add_argument("--stage2-steps", type=int, default=0, help="0 = the config's [stage2] max_steps")
    parser.add_argument("--k", type=int, default=4, help="steps of the Lightning branch and of the few-step sampler")
    parser.add_argument("--every", type=int, default=2, help="the branch runs every N optimizer steps")
    parser.add_argument("--rows", type=int, default=8, help="rows of a batch that go through the branch (0 = all)")
    parser.add_argument("--branch-guidance", type=float, default=1.5)
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--heldout", type=int, default=0, help="0 = the config's held-out people")
    parser.add_argument("--train-identities", type=int, default=0, help="0 = the config's (a smaller world for a "
                        "quick check of the script)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "run.log", mode="w")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        handlers=[logging.StreamHandler(), handler])
    torch.set_num_threads(args.threads)
    overrides: dict[str, Any] = {"output_dir": str(out / "experiment"),  # one seed per (person, target caption)
                                 "sampling": {"steps": args.sample_steps, "guidance": args.guidance,
                                              "seeds_per_caption": 1}}
    if args.stage2_steps:
        overrides["stage2"] = {"max_steps": args.stage2_steps}
    world_opts = {k: v for k, v in (("heldout_identities", args.heldout),
                                    ("train_identities", args.train_identities)) if v}
    if world_opts:
        overrides["world"] = world_opts
    cfg = ExperimentConfig.load(args.config, overrides)
    lightning = LightningConfig(x0_source="lightning", steps=args.k, every=args.every, max_rows=args.rows,
                                guidance=args.branch_guidance, grad_steps="last")
    logger.info("config %s; %s", cfg.as_dict(), lightning.summary())
    laps = Laps()
    torch.manual_seed(cfg.seed)
    unet, text, pose = load_world_models(cfg.assets)
    world = render_world(cfg)
    names = sorted(world.heldout)
    body = TrainingBody(args.body)
    encoder = None
    if body.uses_encoder:
        with laps("stage1"):
            encoder, _ = run_stage1(cfg, world, pose)
    one_step, *others = conditions = lightning_conditions(body, lightning)
    adapters, losses = train_adapters(cfg, [c.adapter for c in conditions], world, encoder, unet, text, pose, laps)
    train_losses = {}
    for recipe, history in losses.items():
        id_steps = [h for h in history if h["id_rows"] > 0]
        train_losses[recipe.key] = {
            "final_loss_mean_last20": float(np.mean([h["loss"] for h in history[-20:]])),
            "diff_mean_last20": float(np.mean([h["diff"] for h in history[-20:]])),
            "id_mean_where_computed": float(np.mean([h["id"] for h in id_steps])) if id_steps else None,
            "steps_with_id": len(id_steps)}
        logger.info("stage 2 %s: %.1f s, %s", recipe.key, laps.timings[f"stage2_{recipe.key}"],
                    train_losses[recipe.key])

    with laps("generation"):
        rows = generation_rows(cfg, world, names)
        captions, seeds = rows.captions, rows.seeds
        table = {n: heldout_body(one_step.body, world.heldout[n], encoder, pose) for n in names}
        bodies = row_bodies(table, names, rows.person).float()
        samplers = {
            "ddim": lambda a, b: generate(unet, text, captions, seeds, a, b, args.sample_steps, args.guidance),
            "few_step": lambda a, b: generate_few_step(unet, text, captions, seeds, a, b, args.k, args.guidance)}
        generated: dict[str, dict[Condition, np.ndarray]] = {}
        for sname, fn in samplers.items():
            generated[sname] = {TEXT: fn(None, None)}
            for cond in conditions:
                generated[sname][cond] = fn(adapters[cond.adapter], bodies)

    with laps("metrics"):
        kw = {"n_boot": cfg.stats.n_boot, "ci": cfg.stats.ci, "seed": cfg.seed}
        results: dict[str, Any] = {"samplers": {}}
        for sname, images_of in generated.items():
            per_arm, measured = analyse(cfg, images_of, rows, world, pose)
            for cond in others:
                per_arm[cond.key]["vs_one_step"] = {
                    m: stats.paired_difference(measured[cond][m], measured[one_step][m], rows.person, **kw)
                    for m in ("body_error", "caption_attributes")}
            results["samplers"][sname] = {key: {"headline": headline(res), **res} for key, res in per_arm.items()}
    total = laps.total()
    results.update({
        "setup": {"body": args.body, "k": args.k, "lightning": asdict(lightning), "sample_steps": args.sample_steps,
                  "guidance": args.guidance, "few_step_sampler": {"kind": "EulerDiscreteScheduler, trailing",
                                                                  "timesteps": trailing_timesteps(1000, args.k)},
                  "heldout_people": len(names), "images_per_arm": len(rows.person),
                  "torch_threads": torch.get_num_threads(), "experiment_config": cfg.as_dict()},
        "stage2": train_losses, "timings_s": laps.timings})
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=json_default))
    for sname in results["samplers"]:
        for key, res in results["samplers"][sname].items():
            logger.info("%s %s: %s", sname, key, json.dumps(res["headline"], default=json_default))
    logger.info("done in %.1f s: %s", total, out / "results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
