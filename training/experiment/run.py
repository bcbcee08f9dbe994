"""The CPU experiment: does BoLID transfer a body identity, and if not, where does it break?

    python -m training.experiment --config training/configs/experiment.toml

On the committed world models (``training/experiment_assets``, made by ``pretrain.py``):

1. Render the world (:mod:`bolid.synthetic`): training people, and HELD-OUT people never seen by any training,
   each with reference photos (their Body ID) and target photos (whose captions drive generation).
2. Stage 1: the Body-ID VAE on the training people; checked on the held-out people (do disjoint photo halves
   identify each other? does the proportion head beat the population mean?).
3. Stage 2, one recipe for every arm (the oracle ladder): the adapter conditioned on the true identity vector
   (oracle), on c_body (BoLID, leave-one-out), and on c_body shuffled across people (control); optional ablations.
4. Generate every (held-out person, target caption, seed) under every arm with the same noise, read every image
   with the world's pose model (:mod:`.readout`), and compare with person-clustered statistics (:mod:`.stats`).

Writes ``results.json`` (every number the README quotes), ``results.md``, and ``grid.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bolid.body_id_io import load_body_id, sample_body_id, save_body_id

from . import stats
from .analysis import (
    PER_IMAGE_METRICS,
    GenerationRows,
    analyse_arm,
    generation_rows,
    identified_as,
    measure,
    references_of,
    stage1_checks,
)
from .conditions import (
    BOLID,
    BOLID_STORED,
    TEXT,
    AdapterRecipe,
    BodySource,
    Condition,
    TrainingBody,
    adapters_for,
    conditions_for,
)
from .config import ExperimentConfig
from .parallel import AdapterWorkers, timed
from .readout import Readout, WorldPose
from .report import criteria, json_default, markdown, pretrain_summary, write_outputs
from .stages import (
    World,
    body_branch_response,
    generate,
    heldout_body,
    load_world_models,
    render_world,
    run_stage1,
    stage2_identities,
    train_adapter,
)
from .world_models import CaptionEncoder

logger = logging.getLogger("bolid.experiment")
REPO_ROOT = Path(__file__).resolve().parents[2]
BodyTables = dict[BodySource, dict[str, torch.Tensor]]  # held-out person's name -> body condition, per source


class Laps:
    """Seconds per step, in the order the steps finished (``timings_s`` of results.json)."""

    def __init__(self) -> None:
        self.start = time.time()
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str, log: bool = True) -> Iterator[None]:
        t0 = time.time()
        yield
        self.timings[name] = round(time.time() - t0, 1)
        if log:
            logger.info("experiment: %s done in %.1f s", name, self.timings[name])

    def total(self) -> float:
        self.timings["total"] = round(time.time() - self.start, 1)
        return self.timings["total"]


# ----------------------------------------------------------------------------------------------- steps


class IdentitySets:
    """The stage-2 training identities of each kind of body, built once each (and the encoder's view posteriors
    of each training person once, shared by the BoLID and shuffled bodies)."""

    def __init__(self, world: World, pose: WorldPose, seed: int) -> None:
        self.world, self.pose, self.seed = world, pose, seed
        self.sets: dict[TrainingBody, list] = {}
        self.views: dict[str, tuple] = {}

    def __call__(self, body: TrainingBody, encoder: Any) -> list:
        if body not in self.sets:
            self.sets[body] = stage2_identities(self.world, self.pose, encoder if body.uses_encoder else None,
                                                self.seed, body, self.views)
        return self.sets[body]


def stage1(cfg: ExperimentConfig, world: World, pose: WorldPose, names: list[str], laps: Laps
           ) -> tuple[Any, dict[str, Any], list[float]]:
    """The Body-ID encoder and its checks on the held-out people."""
    with laps("stage1"):
        encoder, losses = run_stage1(cfg, world, pose)
        return encoder, stage1_checks(cfg, world, encoder, pose, names), losses


def adapter_job(cfg: ExperimentConfig, recipe: AdapterRecipe, identities: IdentitySets, encoder: Any,
                unet: torch.nn.Module, text: CaptionEncoder, pose: WorldPose) -> tuple[Any, ...]:
    """``train_adapter`` and its arguments for one recipe (called here or in a worker)."""
    return (train_adapter, cfg, identities(recipe.body, encoder), recipe.body.body_dim(encoder), unet, text, pose,
            recipe.id_weight, recipe.target_in_context, recipe.lightning)


def train_adapters(cfg: ExperimentConfig, recipes: list[AdapterRecipe], world: World, encoder: Any,
                   unet: torch.nn.Module, text: CaptionEncoder, pose: WorldPose, laps: Laps
                   ) -> tuple[dict[AdapterRecipe, Any], dict[AdapterRecipe, list[dict]]]:
    """Every adapter by the same recipe, in order, in this process."""
    adapters: dict[AdapterRecipe, Any] = {}
    losses: dict[AdapterRecipe, list[dict]] = {}
    identities = IdentitySets(world, pose, cfg.seed)
    for recipe in recipes:
        with laps(f"stage2_{recipe.key}"):
            train, *args = adapter_job(cfg, recipe, identities, encoder, unet, text, pose)
            adapters[recipe], losses[recipe] = train(*args)
    return adapters, losses


def stage1_and_adapters(cfg: ExperimentConfig, recipes: list[AdapterRecipe], world: World, names: list[str],
                        unet: torch.nn.Module, text: CaptionEncoder, pose: WorldPose, laps: Laps
                        ) -> tuple[Any, dict[str, Any], list[float], dict[AdapterRecipe, Any],
                                   dict[AdapterRecipe, list[dict]]]:
    """Stage 1 (and its checks on the held-out people) and every adapter. With ``cfg.workers`` > 0 on both cores
    (:mod:`.parallel`): the adapters that need no encoder train in a worker during stage 1, the others are split
    between this process and the workers; one torch thread for all of it, so which process trains what does not
    change a number. The adapters' timings overlap there, so they do not add up to the total."""
    if cfg.workers == 0:
        encoder, s1, stage1_losses = stage1(cfg, world, pose, names, laps)
        adapters, losses = train_adapters(cfg, recipes, world, encoder, unet, text, pose, laps)
        return encoder, s1, stage1_losses, adapters, losses

    def job(recipe: AdapterRecipe, encoder: Any) -> tuple[Any, ...]:
        return adapter_job(cfg, recipe, identities, encoder, unet, text, pose)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    trained: dict[AdapterRecipe, Any] = {}
    identities = IdentitySets(world, pose, cfg.seed)
    try:
        with laps("stage1_and_stage2"), AdapterWorkers(cfg.workers) as workers:
            for recipe in (r for r in recipes if not r.body.uses_encoder):
                trained[recipe] = workers.submit(*job(recipe, None))
            encoder, s1, stage1_losses = stage1(cfg, world, pose, names, laps)
            late = [r for r in recipes if r.body.uses_encoder]
            for recipe in late[1::2]:
                trained[recipe] = workers.submit(*job(recipe, encoder))
            for recipe in late[0::2]:
                workers.raise_failed([t for t in trained.values() if isinstance(t, Future)])
                trained[recipe] = timed(*job(recipe, encoder))
            trained = {r: (workers.result(t) if isinstance(t, Future) else t) for r, t in trained.items()}
    finally:
        torch.set_num_threads(threads)
    for recipe in recipes:
        laps.timings[f"stage2_{recipe.key}"] = trained[recipe][2]
    return (encoder, s1, stage1_losses, {r: trained[r][0] for r in recipes}, {r: trained[r][1] for r in recipes})


def heldout_bodies(cfg: ExperimentConfig, world: World, names: list[str], encoder: Any, pose: WorldPose,
                   ids_dir: Path) -> BodyTables:
    """Every held-out person's body condition from every source. The stored one goes through its file (the real
    encode_body + save/load path of text-only mode); the sampled one is drawn from the encoder's distribution."""
    from bolid.body_encode import encode_body

    from .readout import person_from_keypoints

    ids_dir.mkdir(exist_ok=True)
    direct = (BodySource.MULTI, BodySource.SINGLE, BodySource.ORACLE)
    tables: BodyTables = {source: {} for source in (*direct, BodySource.STORED)}
    for name in names:
        for source in direct:
            tables[source][name] = heldout_body(source, world.heldout[name], encoder, pose)
    for name in names:
        images = [p.image for p in world.heldout[name].references]
        poses = [person_from_keypoints(k) for k in pose.keypoints(images)]
        res = encode_body(encoder, images, poses, names=[f"{name}/{j}" for j in range(len(images))])
        path = save_body_id(res.body_id, ids_dir / f"{name}.safetensors", overwrite=True)
        tables[BodySource.STORED][name] = load_body_id(path).c_body
    tables[BodySource.SAMPLED] = {name: sample_body_id(encoder.latent_dim, cfg.seed * 1000 + k,
                                                       distribution=encoder.body_prior).c_body
                                  for k, name in enumerate(names)}
    return tables


def row_bodies(table: dict[str, torch.Tensor], names: list[str], person: np.ndarray, donor_shift: int = 0
               ) -> torch.Tensor:
    """The body of every generation row: that of held-out person (k + donor_shift) % P for a row of person k."""
    return torch.stack([table[names[(p + donor_shift) % len(names)]] for p in person])


def generate_conditions(cfg: ExperimentConfig, conditions: list[Condition], adapters: dict[AdapterRecipe, Any],
                        tables: BodyTables, rows: GenerationRows, names: list[str], unet: torch.nn.Module,
                        text: CaptionEncoder, laps: Laps) -> dict[Condition, np.ndarray]:
    """The images of every condition, row for row (same captions and noise); the real photos for the floor."""
    smp = cfg.sampling
    generated: dict[Condition, np.ndarray] = {}
    for cond in conditions:
        if not cond.generated:
            generated[cond] = np.stack(rows.target_images)
            continue
        with laps(f"generate_{cond.key}", log=False):
            adapter = adapters[cond.adapter] if cond.adapter else None
            bodies = row_bodies(tables[cond.body], names, rows.person, cond.donor_shift) if adapter else None
            generated[cond] = generate(unet, text, rows.captions, rows.seeds, adapter, bodies, smp.steps,
                                       smp.guidance, smp.batch)
    return generated


def branch_responses(cfg: ExperimentConfig, adapters: dict[AdapterRecipe, Any], tables: BodyTables,
                     rows: GenerationRows, names: list[str], unet: torch.nn.Module, text: CaptionEncoder
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Does each adapter's body branch read its input (own vs another person's body), and how strongly does it
    act against the caption? Summaries keyed by adapter."""
    response, strength = {}, {}
    targets_u8 = np.stack(rows.target_images)
    kw = {"n_boot": cfg.stats.n_boot, "ci": cfg.stats.ci, "seed": cfg.seed}
    for recipe, adapter in adapters.items():
        table = tables[recipe.body.heldout_body]
        own, swapped = (row_bodies(table, names, rows.person, shift) for shift in (0, 1))
        ratios = body_branch_response(unet, text, adapter, targets_u8, rows.captions, own, swapped, cfg.seed)
        response[recipe.key] = stats.summarise(ratios["swap_vs_remove"], rows.person, **kw)
        strength[recipe.key] = stats.summarise(ratios["body_vs_caption"], rows.person, **kw)
    return response, strength


def analyse(cfg: ExperimentConfig, generated: dict[Condition, np.ndarray], rows: GenerationRows, world: World,
            pose: WorldPose) -> tuple[dict[str, Any], dict[Condition, dict[str, np.ndarray]]]:
    """Every condition measured and summarised (``results.json``'s ``arms``); every condition with an adapter
    is also compared, image for image, with text only; swapped bodies are checked for their donor."""
    refs = references_of(world, pose, cfg.seed)
    real_features = pose.read(np.stack([p.image for ps in world.train.values() for p in ps])).features
    measured: dict[Condition, dict[str, np.ndarray]] = {}
    reads: dict[Condition, Readout] = {}
    for cond, images in generated.items():
        reads[cond] = pose.read(images)
        measured[cond] = measure(reads[cond], rows.person, refs, rows.truth_attributes)
    arms: dict[str, Any] = {}
    for cond in generated:
        base = measured[TEXT] if cond.adapter is not None else None
        arms[cond.key] = {"label": cond.label,
                          **analyse_arm(measured[cond], rows.person, reads[cond].features, real_features, base, cfg)}
    for cond in generated:
        if cond.donor_shift:
            donor = (rows.person + cond.donor_shift) % len(refs.names)
            arms[cond.key]["identified_as_donor"] = {
                what: identified_as(measured[cond][f"{what}_distances"], donor) for what in ("appearance", "body")}
    return arms, measured


# ----------------------------------------------------------------------------------------------- run


def run(cfg: ExperimentConfig) -> dict[str, Any]:
    """The whole experiment: world and stage 1, the adapters, generation under every condition, the body-branch
    response, measurements and statistics, criteria; writes results.json, results.md and grid.png."""
    laps = Laps()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)

    with laps("world"):
        unet, text, pose = load_world_models(cfg.assets)
        world = render_world(cfg)
        names = sorted(world.heldout)
    conditions = conditions_for(cfg)
    encoder, s1, stage1_losses, adapters, stage2_losses = stage1_and_adapters(
        cfg, adapters_for(conditions), world, names, unet, text, pose, laps)
    with laps("generation"):
        tables = heldout_bodies(cfg, world, names, encoder, pose, out / "body_ids")
        rows = generation_rows(cfg, world, names)
        generated = generate_conditions(cfg, conditions, adapters, tables, rows, names, unet, text, laps)
    with laps("body_branch_response"):
        response, strength = branch_responses(cfg, adapters, tables, rows, names, unet, text)
    with laps("metrics"):
        arms, measured = analyse(cfg, generated, rows, world, pose)
        stored_diff = int(np.abs(generated[BOLID_STORED].astype(int) - generated[BOLID].astype(int)).max())

    n_people = len(names)
    drawn = torch.stack(list(tables[BodySource.SAMPLED].values()))
    results: dict[str, Any] = {
        "arms": arms, "stage1": s1, "body_branch_response": response,
        "body_effect_vs_caption_effect": strength,
        "stored_vs_multiview_max_pixel_diff": stored_diff,
        "chance_identification": 1.0 / n_people, "heldout_people": n_people, "images_per_arm": len(rows.person),
        "sampled_body_norm_mean": float(drawn.norm(dim=1).mean()),
        "stage1_final_losses": [round(float(v), 5) for v in stage1_losses[-5:]],
        "stage2_final_losses": {recipe.key: [round(float(r["loss"]), 5) for r in losses[-20:]]
                                for recipe, losses in stage2_losses.items()},
        "config": cfg.as_dict(), "torch_threads": torch.get_num_threads(),
        "world_models": pretrain_summary(cfg.assets),
    }
    total = laps.total()
    results["timings_s"] = laps.timings
    results["criteria"] = criteria(results, 1.0 / n_people)
    results["per_image"] = {"person": rows.person.tolist(), "caption": rows.captions, "seed": rows.seeds,
                            **{cond.key: {k: np.asarray(m[k]).round(5).tolist() for k in PER_IMAGE_METRICS}
                               for cond, m in measured.items()}}
    write_outputs(results, generated, world, names, rows.person, out)
    logger.info("experiment finished in %.1f s; results in %s", total, out / "results.json")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="BoLID CPU experiment on the synthetic-people world")
    p.add_argument("--config", default=str(REPO_ROOT / "training" / "configs" / "experiment.toml"))
    p.add_argument("--output-dir", default=None, help="overrides the config's output_dir")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    overrides = {"output_dir": str(Path(args.output_dir).resolve())} if args.output_dir else None
    cfg = ExperimentConfig.load(args.config, overrides)
    results = run(cfg)
    sys.stdout.write(markdown(results))
    sys.stdout.write(json.dumps({"timings_s": results["timings_s"], "stage1": results["stage1"]}, indent=1,
                                default=json_default) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
