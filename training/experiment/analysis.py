"""Measuring: what every generated image shows, against the held-out people it should show, and the statistics
of each condition (person-clustered, :mod:`.stats`); the stage-1 checks on the held-out people.

One pose model reads every image (:mod:`.readout`); every condition is measured on the same rows (held-out
person, target caption, seed) by the same rules, so conditions differ only in how the images were drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bolid.metrics import body_consistency, fid_from_features, reference_proportions
from bolid.proportions import PROPORTION_NAMES
from bolid.synthetic import make_identity

from . import stats
from .config import ExperimentConfig
from .readout import Readout, WorldPose
from .stages import body_of
from .world_models import ATTRIBUTES


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


def safely(fn: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """A statistic, or {"undefined": why} when the data cannot give it (e.g. every body unreadable)."""
    try:
        return fn(*args, **kwargs)
    except stats.StatisticsInputError as exc:
        return {"undefined": str(exc)}


def analyse_arm(m: dict[str, np.ndarray], person: np.ndarray, features: np.ndarray, real_features: np.ndarray,
                base: dict[str, np.ndarray] | None, cfg: ExperimentConfig) -> dict[str, Any]:
    """Summaries (mean and median with person-clustered CIs), identification with permutation p-values, and
    paired comparisons against text only (same caption and noise)."""
    st = cfg.stats
    kw = {"n_boot": st.n_boot, "ci": st.ci, "seed": cfg.seed}
    out: dict[str, Any] = {"summary": {k: safely(stats.summarise, m[k], person, **kw) for k in PER_IMAGE_METRICS}}
    out["fid_pose_features"] = fid_from_features(real_features, features)
    for what in ("appearance", "body"):
        d = m[f"{what}_distances"]
        cand = np.arange(d.shape[1])
        ident = safely(stats.identification, d, person, cand)
        perm = safely(stats.permutation_pvalue_identification, d, person, n_perm=st.n_perm, seed=cfg.seed,
                       candidate_persons=cand)
        gap = safely(stats.own_minus_others, d, person, cand, **kw)
        gap_p = safely(stats.permutation_pvalue_own_minus_others, d, person, n_perm=st.n_perm, seed=cfg.seed,
                        candidate_persons=cand)
        out[f"{what}_identification"] = {k: v for k, v in ident.items() if k != "ranks"} | {
            "p_value": perm.get("p_value"), "null_mean": perm.get("null_mean")}
        out[f"{what}_own_minus_others"] = {**gap.get("summary", gap), "p_value": gap_p.get("p_value")}
    if base is not None:
        out["vs_text_only"] = {k: safely(stats.paired_difference, m[k], base[k], person, **kw)
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
    # where that bound comes from: the photos' exact keypoints give the proportions (so the pose model is the
    # limit), and the pose model shrinks each person's deviation from the mean (slope < 1 per proportion)
    exact = np.stack([reference_proportions(np.stack([p.keypoints for p in world.heldout[n].references]))[0]
                      for n in names])
    bound["exact_keypoints_improvement"] = 1.0 - rms(exact, truth) / bound["population_mean_rms"]
    bound["slope_per_proportion"] = dict(zip(PROPORTION_NAMES, shrinkage_slopes(on_refs, truth).round(3).tolist(),
                                             strict=True))
    return {"halves_identification": {k: v for k, v in ident.items() if k != "ranks"} | {"p_value": perm["p_value"]},
            "photos_per_half": half, "proportion_head": head, "pose_model_on_reference_photos_vs_truth": bound,
            "c_body_norm_heldout_mean": float(full.norm(dim=1).mean())}


def shrinkage_slopes(measured: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per column, the least-squares slope (with an intercept, so a constant offset does not enter) of the measured
    on the true values over people: 1 for an instrument that keeps people's differences, below 1 where it pulls
    them towards the mean."""
    dt, dm = truth - truth.mean(0), measured - measured.mean(0)
    return (dt * dm).sum(0) / np.maximum((dt**2).sum(0), 1e-12)


def measured_mean_of_training(world: Any, pose: WorldPose) -> np.ndarray:
    per_person = [reference_proportions(pose.keypoints([p.image for p in photos]))[0]
                  for photos in world.train.values()]
    return np.mean(per_person, axis=0)
