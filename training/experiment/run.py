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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bolid.body_id_io import load_body_id, sample_body_id, save_body_id
from bolid.metrics import body_consistency, fid_from_features, reference_proportions
from bolid.safetensors_io import atomic_write_text
from bolid.synthetic import ORACLE_DIM, make_identity

from . import stats
from .config import ExperimentConfig
from .readout import Readout, WorldPose
from .stages import (
    body_branch_response,
    body_of,
    generate,
    load_world_models,
    render_world,
    run_stage1,
    stage2_identities,
    train_adapter,
)
from .world_models import ATTRIBUTES, IMAGE_SIZE

logger = logging.getLogger("bolid.experiment")
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Arm:
    """One condition of the ladder: which adapter, and which body condition per held-out person."""

    key: str
    label: str
    adapter: str | None  # None = text only; else a key of the trained adapters
    body: str | None  # a key of the body tables (own / another person's / drawn ...)
    donor_shift: int = 0  # the body belongs to held-out person (k + donor_shift) % P


REAL = Arm("real", "real held-out photos (measurement floor)", None, None)
TEXT = Arm("text", "text only (base model)", None, None)


def arms_for(cfg: ExperimentConfig) -> list[Arm]:
    arms = [TEXT,
            Arm("oracle", "oracle: true identity vector", "oracle", "oracle"),
            Arm("oracle_swapped", "oracle, another person's vector", "oracle", "oracle", 1),
            Arm("bolid", "BoLID, multi-view Body ID", "bolid", "multi"),
            Arm("bolid_single", "BoLID, single photo", "bolid", "single"),
            Arm("bolid_stored", "BoLID, stored Body ID (file, text-only mode)", "bolid", "stored"),
            Arm("bolid_swapped", "BoLID, another person's Body ID", "bolid", "multi", 1),
            Arm("bolid_sampled", "BoLID, Sample Body ID (stored distribution)", "bolid", "sampled")]
    if cfg.arms.shuffled_control:
        arms.append(Arm("shuffled", "control: adapter trained on shuffled c_body", "shuffled", "multi"))
    if cfg.arms.no_id_loss:
        arms.append(Arm("no_id", "ablation: no L_id (id_weight 0)", "no_id", "multi"))
    if cfg.arms.target_in_context:
        arms.append(Arm("target_in_context", "ablation: target photo in context", "target_in_context", "multi"))
    return arms


# ----------------------------------------------------------------------------------------------- measuring


@dataclass
class References:
    """What each held-out person is, as the pose model sees it on their reference photos (and the truth)."""

    names: list[str]
    proportions: np.ndarray  # [P, 6]
    proportion_confidence: np.ndarray  # [P, 6]
    appearance: np.ndarray  # [P, A] mean appearance vector of the reference photos
    skin: np.ndarray  # [P] true class
    hair: np.ndarray  # [P]


@dataclass
class GenerationRows:
    """What every arm generates: one row per (held-out person, target caption, seed), the same in every arm."""

    person: np.ndarray  # [N] index of the person each image should show
    captions: list[str]
    seeds: list[int]
    truth_attributes: list[dict[str, str]]
    target_images: list[np.ndarray]  # the real photo each caption describes (the measurement floor)


def generation_rows(cfg: ExperimentConfig, world: Any, names: list[str]) -> GenerationRows:
    person, captions, seeds, truth, images = [], [], [], [], []
    for k, name in enumerate(names):
        for j, tgt in enumerate(world.heldout[name].targets):
            for s in range(cfg.sampling.seeds_per_caption):
                person.append(k)
                captions.append(tgt.caption)
                seeds.append(cfg.seed * 100_003 + k * 1000 + j * 10 + s)
                truth.append(tgt.attributes)
                images.append(tgt.image)
    return GenerationRows(np.array(person), captions, seeds, truth, images)


def references_of(world: Any, pose: WorldPose, seed: int) -> References:
    names = sorted(world.heldout)
    props, confs, apps = [], [], []
    for name in names:
        r = pose.read([p.image for p in world.heldout[name].references])
        p, c = reference_proportions(r.keypoints)
        props.append(p)
        confs.append(c)
        apps.append(r.appearance_vector().mean(0))
    idents = [world.heldout[n].identity for n in names]
    return References(names, np.stack(props), np.stack(confs), np.stack(apps),
                      np.array([i.skin_index for i in idents]), np.array([i.hair_index for i in idents]))


def measure(read: Readout, person: np.ndarray, refs: References, truth_attrs: list[dict[str, str]]
            ) -> dict[str, np.ndarray]:
    """Per-image measurements; ``person`` [N] is the index of the person each image should show."""
    n_people = len(refs.names)
    body_dist = np.stack([body_consistency(read.keypoints, refs.proportions[p], refs.proportion_confidence[p]).errors
                          for p in range(n_people)], 1)
    app = read.appearance_vector()
    app_dist = np.linalg.norm(app[:, None, :] - refs.appearance[None], axis=-1)
    rows = np.arange(len(person))
    return {
        "body_error": body_dist[rows, person],
        "skin_error": (read.skin.argmax(1) != refs.skin[person]).astype(float),
        "hair_error": (read.hair.argmax(1) != refs.hair[person]).astype(float),
        "appearance_distance": app_dist[rows, person],
        "caption_attributes": np.array([np.mean([r[k] == t[k] for k in ATTRIBUTES])
                                        for r, t in zip(read.attributes, truth_attrs, strict=True)]),
        "failed_render": read.failed.astype(float),
        "body_distances": body_dist,
        "appearance_distances": app_dist,
    }


PER_IMAGE_METRICS = ("body_error", "skin_error", "hair_error", "appearance_distance", "caption_attributes",
                     "failed_render")


def _safely(fn: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """A statistic, or {"undefined": why} when the data cannot give it (e.g. every body unreadable)."""
    try:
        return fn(*args, **kwargs)
    except stats.StatisticsInputError as exc:
        return {"undefined": str(exc)}


def _get(d: Any, *keys: str) -> float:
    """A nested number of a results dict, NaN when any level is missing (an undefined statistic)."""
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return float("nan")
        d = d[k]
    return float(d)


def analyse_arm(m: dict[str, np.ndarray], person: np.ndarray, features: np.ndarray, real_features: np.ndarray,
                base: dict[str, np.ndarray] | None, cfg: ExperimentConfig) -> dict[str, Any]:
    """Summaries (mean and median with person-clustered CIs), identification with permutation p-values, and
    paired comparisons against text only (same caption and noise)."""
    st = cfg.stats
    kw = {"n_boot": st.n_boot, "ci": st.ci, "seed": cfg.seed}
    out: dict[str, Any] = {"summary": {k: _safely(stats.summarise, m[k], person, **kw) for k in PER_IMAGE_METRICS}}
    out["fid_pose_features"] = fid_from_features(real_features, features)
    for what in ("appearance", "body"):
        d = m[f"{what}_distances"]
        cand = np.arange(d.shape[1])
        ident = _safely(stats.identification, d, person, cand)
        perm = _safely(stats.permutation_pvalue_identification, d, person, n_perm=st.n_perm, seed=cfg.seed,
                       candidate_persons=cand)
        gap = _safely(stats.own_minus_others, d, person, cand, **kw)
        gap_p = _safely(stats.permutation_pvalue_own_minus_others, d, person, n_perm=st.n_perm, seed=cfg.seed,
                        candidate_persons=cand)
        out[f"{what}_identification"] = {k: v for k, v in ident.items() if k != "ranks"} | {
            "p_value": perm.get("p_value"), "null_mean": perm.get("null_mean")}
        out[f"{what}_own_minus_others"] = {**gap.get("summary", gap), "p_value": gap_p.get("p_value")}
    if base is not None:
        out["vs_text_only"] = {k: _safely(stats.paired_difference, m[k], base[k], person, **kw)
                               for k in ("body_error", "skin_error", "hair_error", "caption_attributes")}
    return out


def identified_as(distances: np.ndarray, person: np.ndarray) -> float:
    """Share of images whose nearest reference is ``person`` (e.g. the donor of a swapped Body ID)."""
    return float(np.mean(np.nanargmin(np.where(np.isfinite(distances), distances, np.inf), 1) == person))


# ----------------------------------------------------------------------------------------------- stage-1 checks


def stage1_checks(cfg: ExperimentConfig, world: Any, encoder: Any, pose: WorldPose, names: list[str]
                  ) -> dict[str, Any]:
    """On held-out people: do disjoint halves of their photos identify each other (nearest c_body)? Does the
    proportion head beat the population mean, against the same targets?"""
    half = cfg.world.heldout_reference_photos // 2
    a = torch.stack([body_of(encoder, world.heldout[n].references[:half], pose) for n in names]).numpy()
    b = torch.stack([body_of(encoder, world.heldout[n].references[half:], pose) for n in names]).numpy()
    dist = np.linalg.norm(a[:, None] - b[None], axis=-1)
    idx = np.arange(len(names))
    ident = stats.identification(dist, idx, idx)
    perm = stats.permutation_pvalue_identification(dist, idx, n_perm=cfg.stats.n_perm, seed=cfg.seed,
                                                   candidate_persons=idx)
    full = torch.stack([body_of(encoder, world.heldout[n].references, pose) for n in names])
    with torch.no_grad():
        predicted = encoder.predict_proportions(full).double().numpy()
    truth = np.stack([world.heldout[n].identity.proportion_vector() for n in names])
    train_mean = np.mean([make_identity(cfg.seed, i).proportion_vector()
                          for i in range(cfg.world.train_identities)], axis=0)
    # like for like: the head was trained on proportions *measured* by the pose model, so compare against the
    # measured proportions of photos the encoder did not see (the targets), as well as against the truth
    measured = np.stack([reference_proportions(pose.keypoints([p.image for p in world.heldout[n].targets]))[0]
                         for n in names])
    measured_train_mean = measured_mean_of_training(world, pose)

    def rms(x: np.ndarray, y: np.ndarray) -> float:
        return float(np.sqrt(np.mean((x - y) ** 2)))

    head = {"vs_truth": {"head_rms": rms(predicted, truth), "population_mean_rms": rms(train_mean, truth)},
            "vs_measured_on_unseen_photos": {"head_rms": rms(predicted, measured),
                                             "population_mean_rms": rms(measured_train_mean, measured)}}
    for v in head.values():
        v["improvement"] = 1.0 - v["head_rms"] / v["population_mean_rms"]
    # what the measuring instrument itself reaches: the pose model's proportions of the same reference photos the
    # encoder saw, against the truth (a head trained on measured proportions can hardly do much better)
    on_refs = np.stack([reference_proportions(pose.keypoints([p.image for p in world.heldout[n].references]))[0]
                        for n in names])
    bound = {"rms": rms(on_refs, truth), "population_mean_rms": rms(train_mean, truth)}
    bound["improvement"] = 1.0 - bound["rms"] / bound["population_mean_rms"]
    return {"halves_identification": {k: v for k, v in ident.items() if k != "ranks"} | {"p_value": perm["p_value"]},
            "photos_per_half": half, "proportion_head": head, "pose_model_on_reference_photos_vs_truth": bound,
            "c_body_norm_heldout_mean": float(full.norm(dim=1).mean())}


def measured_mean_of_training(world: Any, pose: WorldPose) -> np.ndarray:
    per_person = [reference_proportions(pose.keypoints([p.image for p in photos]))[0]
                  for photos in world.train.values()]
    return np.mean(per_person, axis=0)


# ----------------------------------------------------------------------------------------------- criteria


def criteria(results: dict[str, Any], chance: float) -> dict[str, dict[str, Any]]:
    """Issue 10's "done when" targets, each with the measured value and whether it was met (an undefined
    statistic is NaN and not met)."""
    arms = results["arms"]
    bolid, text, single, real = arms["bolid"], arms["text"], arms["bolid_single"], arms["real"]
    out: dict[str, dict[str, Any]] = {}

    def add(name: str, value: Any, target: str, met: bool) -> None:
        out[name] = {"value": value, "target": target, "met": bool(met)}

    # the base model draws the world (text only against real photos)
    ratio = _get(text, "summary", "caption_attributes", "mean", "estimate") / \
        _get(real, "summary", "caption_attributes", "mean", "estimate")
    add("base_caption_attributes_vs_real_floor", ratio, ">= 0.9", ratio >= 0.9)
    failed = _get(text, "summary", "failed_render", "mean", "estimate")
    add("base_failed_renders", failed, "<= 0.05", failed <= 0.05)
    fid_ratio = text["fid_pose_features"] / real["fid_pose_features"]
    add("base_fid_vs_real_photos", fid_ratio, "<= 1.5", fid_ratio <= 1.5)
    # stage 1 on new people
    s1 = results["stage1"]
    halves = s1["halves_identification"]["top1"]
    add("stage1_halves_identification_top1", halves, ">= 0.8 among >= 16 people",
        halves >= 0.8 and s1["halves_identification"]["n_candidates"] >= 16)
    head = s1["proportion_head"]["vs_truth"]["improvement"]
    add("stage1_proportion_head_vs_population_mean", head, ">= 0.4 lower RMS", head >= 0.4)
    # transfer

    top1, p_app = _get(bolid, "appearance_identification", "top1"), _get(bolid, "appearance_identification", "p_value")
    add("appearance_identification_over_chance", top1 / chance, ">= 3 with p < 0.01",
        top1 >= 3 * chance and p_app < 0.01)
    for trait in ("skin_error", "hair_error"):
        b, t = _get(bolid, "summary", trait, "mean", "estimate"), _get(text, "summary", trait, "mean", "estimate")
        add(f"{trait}_ratio_to_text_only", b / t if t > 0 else float("nan"), "<= 0.5", t > 0 and b <= 0.5 * t)
    rel = bolid.get("vs_text_only", {}).get("body_error", {}).get("relative")
    add("body_error_median_change_vs_text_only", rel, "<= -0.25 with CI excluding 0",
        rel is not None and rel["estimate"] <= -0.25 and rel["hi"] < 0)
    gap, p_gap = _get(bolid, "body_own_minus_others", "mean", "estimate"), _get(bolid, "body_own_minus_others", "p_value")
    add("body_own_minus_others", {"mean": gap, "p_value": p_gap}, "< 0 with p < 0.01", gap < 0 and p_gap < 0.01)
    s_top = _get(single, "appearance_identification", "top1")
    add("single_photo_vs_multi_view_identification", s_top / top1 if top1 > 0 else float("nan"),
        ">= 0.8 (within 20%)", top1 > 0 and s_top >= 0.8 * top1)
    diff = results["stored_vs_multiview_max_pixel_diff"]
    add("stored_equals_multi_view_max_pixel_diff", diff, "0", diff == 0)
    drop = _get(text, "summary", "caption_attributes", "mean", "estimate") - \
        _get(bolid, "summary", "caption_attributes", "mean", "estimate")
    add("caption_attribute_drop_vs_text_only", drop, "<= 0.02", drop <= 0.02)
    return out


# ----------------------------------------------------------------------------------------------- run


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
    unet, text, pose = load_world_models(cfg.assets)
    world = render_world(cfg)
    names = sorted(world.heldout)
    lap("world", t0)

    t0 = time.time()
    encoder, stage1_losses = run_stage1(cfg, world, pose)
    s1 = stage1_checks(cfg, world, encoder, pose, names)
    lap("stage1", t0)

    adapters: dict[str, Any] = {}
    stage2_losses: dict[str, list] = {}
    plan = [("oracle", "oracle", None, False), ("bolid", "bolid", None, False)]
    if cfg.arms.shuffled_control:
        plan.append(("shuffled", "shuffled", None, False))
    if cfg.arms.no_id_loss:
        plan.append(("no_id", "bolid", 0.0, False))
    if cfg.arms.target_in_context:
        plan.append(("target_in_context", "bolid", None, True))
    identity_sets: dict[str, list] = {}
    train_views: dict[str, tuple] = {}  # the encoder's view posteriors of each training person, shared by arms
    for key, body, id_weight, in_context in plan:
        t0 = time.time()
        if body not in identity_sets:
            identity_sets[body] = stage2_identities(world, pose, None if body == "oracle" else encoder, cfg.seed, body,
                                                    train_views)
        dim = ORACLE_DIM if body == "oracle" else encoder.latent_dim
        adapters[key], losses = train_adapter(cfg, identity_sets[body], dim, unet, text, pose, id_weight, in_context)
        stage2_losses[key] = [round(float(r["loss"]), 5) for r in losses[-20:]]
        lap(f"stage2_{key}", t0)

    # ---------------------------------------------------------------- body conditions of the held-out people
    t0 = time.time()
    ids_dir = out / "body_ids"
    ids_dir.mkdir(exist_ok=True)
    tables: dict[str, dict[str, torch.Tensor]] = {"multi": {}, "single": {}, "stored": {}, "oracle": {}}
    for name in names:
        held = world.heldout[name]
        tables["multi"][name] = body_of(encoder, held.references, pose)
        tables["single"][name] = body_of(encoder, held.references[:1], pose)
        tables["oracle"][name] = torch.from_numpy(held.identity.oracle_vector())
    # text-only mode: the Body ID goes through its file (the real encode_body + save/load path)
    from bolid.body_encode import encode_body

    from .readout import person_from_keypoints

    for name in names:
        images = [p.image for p in world.heldout[name].references]
        poses = [person_from_keypoints(k) for k in pose.keypoints(images)]
        res = encode_body(encoder, images, poses, names=[f"{name}/{j}" for j in range(len(images))])
        path = save_body_id(res.body_id, ids_dir / f"{name}.safetensors", overwrite=True)
        tables["stored"][name] = load_body_id(path).c_body
    tables["sampled"] = {name: sample_body_id(encoder.latent_dim, cfg.seed * 1000 + k,
                                              distribution=encoder.body_prior).c_body for k, name in enumerate(names)}
    drawn = torch.stack(list(tables["sampled"].values()))

    plan_rows = generation_rows(cfg, world, names)
    person, captions, seeds = plan_rows.person, plan_rows.captions, plan_rows.seeds
    truth_attrs, target_images = plan_rows.truth_attributes, plan_rows.target_images
    n_people = len(names)

    def bodies(arm: Arm) -> torch.Tensor:
        table = tables[arm.body]
        return torch.stack([table[names[(p + arm.donor_shift) % n_people]] for p in person])

    smp = cfg.sampling
    generated: dict[str, np.ndarray] = {"real": np.stack(target_images)}
    arm_list = arms_for(cfg)
    for arm in arm_list:
        ta = time.time()
        adapter = adapters.get(arm.adapter) if arm.adapter else None
        generated[arm.key] = generate(unet, text, captions, seeds, adapter, bodies(arm) if adapter else None,
                                      smp.steps, smp.guidance, smp.batch)
        timings[f"generate_{arm.key}"] = round(time.time() - ta, 1)
    lap("generation", t0)

    # ---------------------------------------------------------------- does the body branch read its input?
    t0 = time.time()
    response, strength = {}, {}
    targets_u8 = np.stack(target_images)
    for key, adapter in adapters.items():
        table = tables["oracle" if key == "oracle" else "multi"]
        own = torch.stack([table[names[p]] for p in person])
        swapped = torch.stack([table[names[(p + 1) % n_people]] for p in person])
        ratios = body_branch_response(unet, text, adapter, targets_u8, captions, own, swapped, cfg.seed)
        response[key] = stats.summarise(ratios["swap_vs_remove"], person, n_boot=cfg.stats.n_boot, ci=cfg.stats.ci,
                                        seed=cfg.seed)
        strength[key] = stats.summarise(ratios["body_vs_caption"], person, n_boot=cfg.stats.n_boot, ci=cfg.stats.ci,
                                        seed=cfg.seed)
    lap("body_branch_response", t0)

    # ---------------------------------------------------------------- measurements and statistics
    t0 = time.time()
    refs = references_of(world, pose, cfg.seed)
    real_features = pose.read(np.stack([p.image for ps in world.train.values() for p in ps])).features
    measured: dict[str, dict[str, np.ndarray]] = {}
    reads: dict[str, Readout] = {}
    for key, images in generated.items():
        reads[key] = pose.read(images)
        measured[key] = measure(reads[key], person, refs, truth_attrs)
    arm_results: dict[str, Any] = {}
    labels = {a.key: a.label for a in [REAL, *arm_list]}
    for key in generated:
        base = measured["text"] if key not in ("text", "real") else None
        arm_results[key] = {"label": labels[key],
                            **analyse_arm(measured[key], person, reads[key].features, real_features, base, cfg)}
    for arm in arm_list:
        if arm.donor_shift:
            donor = (person + arm.donor_shift) % n_people
            arm_results[arm.key]["identified_as_donor"] = {
                what: identified_as(measured[arm.key][f"{what}_distances"], donor) for what in ("appearance", "body")}
    stored_diff = int(np.abs(generated["bolid_stored"].astype(int) - generated["bolid"].astype(int)).max())
    lap("metrics", t0)

    results: dict[str, Any] = {
        "arms": arm_results, "stage1": s1, "body_branch_response": response,
        "body_effect_vs_caption_effect": strength,
        "stored_vs_multiview_max_pixel_diff": stored_diff,
        "chance_identification": 1.0 / n_people, "heldout_people": n_people, "images_per_arm": len(person),
        "sampled_body_norm_mean": float(drawn.norm(dim=1).mean()),
        "stage1_final_losses": [round(float(v), 5) for v in stage1_losses[-5:]],
        "stage2_final_losses": stage2_losses, "config": cfg.as_dict(), "torch_threads": torch.get_num_threads(),
        "world_models": _pretrain_summary(cfg.assets),
    }
    results["criteria"] = criteria(results, 1.0 / n_people)
    timings["total"] = round(time.time() - t_start, 1)
    results["timings_s"] = timings
    results["per_image"] = {"person": person.tolist(), "caption": captions, "seed": seeds,
                            **{key: {k: np.asarray(m[k]).round(5).tolist() for k in PER_IMAGE_METRICS}
                               for key, m in measured.items()}}
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=_json_default))
    atomic_write_text(out / "results.md", markdown(results))
    grid(generated, world, names, person, out / "grid.png")
    logger.info("experiment finished in %.1f s; results in %s", timings["total"], out / "results.json")
    return results


def _pretrain_summary(assets: Path) -> dict[str, Any]:
    """Settings and run times of the committed world models (their pretrain_log.json, loss curves left out)."""
    path = assets / "pretrain_log.json"
    if not path.is_file():
        return {}
    log = json.loads(path.read_text(encoding="utf-8"))
    return {part: {k: v for k, v in entry.items() if not isinstance(v, list)} for part, entry in log.items()}


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _ci(s: dict[str, Any], digits: int = 3) -> str:
    if not isinstance(s, dict) or "estimate" not in s:
        return "n/a"
    return f"{s['estimate']:.{digits}f} [{s['lo']:.{digits}f}, {s['hi']:.{digits}f}]"


def markdown(results: dict[str, Any]) -> str:
    """The results table (medians and means with 95% person-clustered CIs) and the criteria."""
    lines = ["| arm | body error median | own − others (body) | appearance id top-1 (p) | skin err | hair err | "
             "caption attrs | failed | FID |", "|---|---|---|---|---|---|---|---|---|"]
    for a in results["arms"].values():
        def g(*keys: str, arm: dict = a) -> float:
            return _get(arm, *keys)

        lines.append(f"| {a['label']} | {_ci(a['summary']['body_error'].get('median'))} | "
                     f"{g('body_own_minus_others', 'mean', 'estimate'):+.3f} "
                     f"(p {g('body_own_minus_others', 'p_value'):.3g}) | {g('appearance_identification', 'top1'):.3f} "
                     f"(p {g('appearance_identification', 'p_value'):.3g}) | "
                     f"{g('summary', 'skin_error', 'mean', 'estimate'):.2f} | "
                     f"{g('summary', 'hair_error', 'mean', 'estimate'):.2f} | "
                     f"{g('summary', 'caption_attributes', 'mean', 'estimate'):.3f} | "
                     f"{g('summary', 'failed_render', 'mean', 'estimate'):.3f} | {a['fid_pose_features']:.2f} |")
    lines += ["", "| criterion | value | target | met |", "|---|---|---|---|"]
    for name, c in results["criteria"].items():
        lines.append(f"| {name} | {json.dumps(c['value'], default=_json_default)[:80]} | {c['target']} | "
                     f"{'yes' if c['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def grid(generated: dict[str, np.ndarray], world: Any, names: list[str], person: np.ndarray, path: Path,
         scale: int = 3, people: int = 12) -> None:
    """One row per held-out person (the first ``people``), one column per arm (first image of the person)."""
    from PIL import Image, ImageDraw

    keys = [k for k in ("real", "text", "oracle", "bolid", "bolid_single", "bolid_swapped", "shuffled")
            if k in generated]
    cols = ["reference", *keys]
    cell, pad, head = IMAGE_SIZE * scale, 4, 16
    canvas = Image.new("RGB", (len(cols) * (cell + pad) + pad, head + people * (cell + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(cols):
        draw.text((pad + c * (cell + pad), 2), label[:16], fill=(0, 0, 0))
    for r, name in enumerate(names[:people]):
        first = int(np.nonzero(person == r)[0][0])
        row = [world.heldout[name].references[0].image] + [generated[k][first] for k in keys]
        for c, im in enumerate(row):
            tile = Image.fromarray(im).resize((cell, cell), Image.Resampling.NEAREST)
            canvas.paste(tile, (pad + c * (cell + pad), head + pad + r * (cell + pad)))
    canvas.save(path)


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
                                default=_json_default) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
