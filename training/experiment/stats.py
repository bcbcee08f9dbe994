"""Statistics for the CPU experiment: person-clustered bootstrap CIs, paired comparisons, identification and
permutation p-values. Pure numpy, so it is fast, deterministic with a seed, and testable against known answers.

Why clustered: every person contributes several images (views, captions, noises) that share the person's
identity, so images are not independent. Resampling *persons* (all of a drawn person's images together) gives
intervals that stay honest under within-person correlation, where an image-level standard error is too narrow.

Why permutation p-values for identification: the null "the reference of each person carries no information about
that person's images" is exactly "which person's reference is in which candidate column is arbitrary". Permuting
the person labels of the candidate columns (all images of a person move together) draws from that null without
any distributional assumption.

Conventions:
- ``clusters`` / ``image_person`` are labels (ints or strings), one per image; they say which person an image is of.
- Distances are ``[n_images, n_candidates]``, smaller = closer. A candidate column is one person's reference.
- NaN values are dropped and counted (``n_dropped``), never propagated; an input with nothing left raises.
- All returned dicts hold plain Python floats/ints/lists/bools, so they can go straight into ``results.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from bolid.errors import BoLIDError

Statistic = Literal["mean", "median"]

# Bootstrap resamples are evaluated in blocks of this many draws so the weighted-median work array
# (block x n_images) stays small even for large experiments.
_BLOCK = 256


class StatisticsInputError(BoLIDError, ValueError):
    """The input to a statistic is unusable (wrong shape, no data left, bad parameter). The message says which."""


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a percentile bootstrap CI, and how much data it rests on."""

    estimate: float
    lo: float
    hi: float
    n: int
    n_clusters: int
    n_dropped: int = 0

    def as_dict(self) -> dict[str, float | int]:
        """Plain dict for ``results.json``."""
        return asdict(self)


# ----------------------------------------------------------------------------------------------- validation


def _check_params(n_boot: int, ci: float) -> None:
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise StatisticsInputError(f"n_boot must be a positive integer, got {n_boot!r}.")
    if not 0.0 < float(ci) < 1.0:
        raise StatisticsInputError(f"ci must be strictly between 0 and 1 (e.g. 0.95), got {ci!r}.")


def _check_statistic(statistic: str) -> None:
    if statistic not in ("mean", "median"):
        raise StatisticsInputError(f"statistic must be 'mean' or 'median', got {statistic!r}.")


def _as_1d_float(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise StatisticsInputError(f"{name} must be 1-D (one value per image), got shape {arr.shape}.")
    if np.isinf(arr).any():
        raise StatisticsInputError(f"{name} holds {int(np.isinf(arr).sum())} infinite value(s); "
                                   "fix the measurement or mark it missing with NaN.")
    return arr


def _labels(x: Any, n: int, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise StatisticsInputError(f"{name} must be 1-D with one label per image ({n}), got shape {arr.shape}.")
    return arr


def _cluster_index(clusters: np.ndarray) -> tuple[np.ndarray, int]:
    """Map labels to 0..k-1 (sorted label order, so the mapping is deterministic)."""
    _, idx = np.unique(clusters, return_inverse=True)
    idx = idx.reshape(-1)
    return idx, int(idx.max()) + 1 if idx.size else 0


# --------------------------------------------------------------------------------------- bootstrap machinery


def _draw_counts(n_clusters: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """How often each cluster is drawn in each resample ([n_boot, k]).

    Drawing k clusters with replacement, uniformly, is the same as a Multinomial(k, 1/k) count vector; the counts
    are all the statistics below need, and they let several statistics share the very same resamples.
    """
    return rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / n_clusters), size=n_boot)


def _boot_mean(values: np.ndarray, idx: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mean of each resample: sum over drawn clusters of their sums over their sizes."""
    k = counts.shape[1]
    sums = np.bincount(idx, weights=values, minlength=k)
    sizes = np.bincount(idx, minlength=k).astype(np.float64)
    return (counts @ sums) / (counts @ sizes)


def _boot_median(values: np.ndarray, idx: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Median of each resample, equal to ``np.median`` of the concatenated resampled images.

    A resample repeats every image of cluster c counts[c] times. Over the sorted values, the cumulative repeat
    count says which sorted value sits at each position of the concatenated, sorted resample; the median is the
    average of the values at positions (N-1)//2 and N//2, as numpy defines it.
    """
    order = np.argsort(values, kind="stable")
    v = values[order]
    cl = idx[order]
    out = np.empty(counts.shape[0])
    for start in range(0, counts.shape[0], _BLOCK):
        w = counts[start : start + _BLOCK][:, cl]
        cum = np.cumsum(w, axis=1)
        total = cum[:, -1]
        i_lo = (cum <= ((total - 1) // 2)[:, None]).sum(axis=1)
        i_hi = (cum <= (total // 2)[:, None]).sum(axis=1)
        out[start : start + _BLOCK] = 0.5 * (v[i_lo] + v[i_hi])
    return out


def _boot(values: np.ndarray, idx: np.ndarray, counts: np.ndarray, statistic: str) -> np.ndarray:
    return _boot_mean(values, idx, counts) if statistic == "mean" else _boot_median(values, idx, counts)


def _point(values: np.ndarray, statistic: str) -> float:
    return float(np.mean(values) if statistic == "mean" else np.median(values))


def _interval(draws: np.ndarray, ci: float) -> tuple[float, float]:
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(draws, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _prepare(values: Any, clusters: Any, name: str = "values") -> tuple[np.ndarray, np.ndarray, int, int]:
    """Drop NaN values (counted), index clusters; raise if nothing or only one person is left."""
    v = _as_1d_float(values, name)
    c = _labels(clusters, v.shape[0], "clusters")
    keep = ~np.isnan(v)
    n_dropped = int((~keep).sum())
    if not keep.any():
        raise StatisticsInputError(f"All {v.shape[0]} {name} are NaN; there is nothing to estimate "
                                   "(check the measurement that produced them).")
    v, c = v[keep], c[keep]
    idx, k = _cluster_index(c)
    if k < 2:
        raise StatisticsInputError(f"{name} come from a single person; a person-clustered CI needs at least "
                                   "2 persons. Evaluate more held-out people.")
    return v, idx, k, n_dropped


def _paired(a: Any, b: Any, clusters: Any, name_a: str, name_b: str
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Two measurements of the same images: check they pair up, drop (and count) pairs with a NaN on either side."""
    av, bv = _as_1d_float(a, name_a), _as_1d_float(b, name_b)
    if av.shape != bv.shape:
        raise StatisticsInputError(f"{name_a} and {name_b} must be paired image by image; got {av.shape[0]} and "
                                   f"{bv.shape[0]} values.")
    c = _labels(clusters, av.shape[0], "clusters")
    keep = ~(np.isnan(av) | np.isnan(bv))
    if not keep.any():
        raise StatisticsInputError(f"Every one of the {av.shape[0]} pairs has a NaN in {name_a} or {name_b}; "
                                   "nothing to compare.")
    return av[keep], bv[keep], c[keep], int((~keep).sum())


# ------------------------------------------------------------------------------------------------ public API


def cluster_bootstrap(values: Sequence[float] | np.ndarray, clusters: Sequence[Any] | np.ndarray,
                      statistic: Statistic = "mean", n_boot: int = 2000, ci: float = 0.95,
                      seed: int = 0) -> Estimate:
    """Mean or median of ``values`` with a person-clustered percentile bootstrap CI.

    Persons (clusters) are resampled with replacement and each drawn person brings all of its images, so the CI
    reflects that images of one person are correlated. NaN values are dropped and counted in ``n_dropped``.
    Percentile intervals run slightly narrow with few persons (a known small-sample effect; the coverage test in
    tests/test_experiment_stats.py measures it at 20 persons), one more reason to evaluate many held-out people.
    """
    _check_params(n_boot, ci)
    _check_statistic(statistic)
    v, idx, k, n_dropped = _prepare(values, clusters)
    counts = _draw_counts(k, n_boot, np.random.default_rng(seed))
    lo, hi = _interval(_boot(v, idx, counts, statistic), ci)
    return Estimate(_point(v, statistic), lo, hi, int(v.shape[0]), k, n_dropped)


def summarise(values: Sequence[float] | np.ndarray, clusters: Sequence[Any] | np.ndarray, n_boot: int = 2000,
              ci: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Mean and median side by side, each with a person-clustered CI from the same resamples.

    Medians sit beside means because a few broken renders can drive a mean; the two together show whether
    they do. Returns ``{"mean": {estimate, lo, hi}, "median": {...}, "n_images", "n_persons", "n_dropped",
    "ci", "n_boot"}``.
    """
    _check_params(n_boot, ci)
    v, idx, k, n_dropped = _prepare(values, clusters)
    counts = _draw_counts(k, n_boot, np.random.default_rng(seed))
    out: dict[str, Any] = {}
    for stat in ("mean", "median"):
        lo, hi = _interval(_boot(v, idx, counts, stat), ci)
        out[stat] = {"estimate": _point(v, stat), "lo": lo, "hi": hi}
    out.update(n_images=int(v.shape[0]), n_persons=k, n_dropped=n_dropped, ci=float(ci), n_boot=int(n_boot))
    return out


def ratio_of_means(part: Sequence[float] | np.ndarray, whole: Sequence[float] | np.ndarray,
                   clusters: Sequence[Any] | np.ndarray, n_boot: int = 2000, ci: float = 0.95, seed: int = 0
                   ) -> Estimate:
    """``mean(part) / mean(whole)`` over the same images (e.g. a loss difference as a share of a loss), with a
    person-clustered CI: numerator and denominator come from the very same resamples, so the interval carries
    the uncertainty of both. Images where either value is NaN are dropped and counted."""
    _check_params(n_boot, ci)
    pv, wv, c, n_dropped = _paired(part, whole, clusters, "part", "whole")
    pv, idx, k, _ = _prepare(pv, c, "part")
    if not np.mean(wv) > 0:
        raise StatisticsInputError("mean(whole) must be > 0 for a share of it.")
    counts = _draw_counts(k, n_boot, np.random.default_rng(seed))
    lo, hi = _interval(_boot_mean(pv, idx, counts) / _boot_mean(wv, idx, counts), ci)
    return Estimate(float(np.mean(pv) / np.mean(wv)), lo, hi, int(pv.shape[0]), k, n_dropped)


def paired_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                      clusters: Sequence[Any] | np.ndarray, n_boot: int = 2000, ci: float = 0.95,
                      seed: int = 0) -> dict[str, Any]:
    """Paired comparison of two arms measured on the same images (same person, caption and noise).

    ``a[i]`` and ``b[i]`` must be the same image slot under the two arms; pairing removes the caption/noise
    variation that both arms share. An image is dropped (and counted) if either arm is NaN there.

    Returns (all CIs person-clustered, percentile, from one shared set of resamples):
      - ``mean``, ``median``: ``{estimate, lo, hi}`` of the per-image differences ``d = a - b``
        (mean(d) and median(d); note median(d) is not median(a) - median(b));
      - ``relative``: ``{estimate, lo, hi}`` of ``median(a) / median(b) - 1``, the relative change of the
        per-arm medians (e.g. -0.25 = arm a's median error is 25 % lower than arm b's), its CI computed from
        the same resamples (each resample's medians of a and b over the same drawn persons). ``None`` when
        median(b) is not > 0 in the data or in some resample (the ratio is then meaningless), with the reason
        in ``relative_undefined``;
      - ``ci_excludes_zero``: ``{"mean", "median", "relative"}`` -> bool (``relative`` is ``None`` if undefined);
      - ``a``, ``b``: ``{"mean", "median"}`` point values of each arm on the kept images;
      - ``n_images``, ``n_persons``, ``n_dropped``, ``ci``, ``n_boot``.
    """
    _check_params(n_boot, ci)
    av, bv, c, n_dropped = _paired(a, b, clusters, "a", "b")
    d, idx, k, _ = _prepare(av - bv, c, "paired differences")
    counts = _draw_counts(k, n_boot, np.random.default_rng(seed))

    out: dict[str, Any] = {}
    excludes: dict[str, bool | None] = {}
    for stat in ("mean", "median"):
        lo, hi = _interval(_boot(d, idx, counts, stat), ci)
        out[stat] = {"estimate": _point(d, stat), "lo": lo, "hi": hi}
        excludes[stat] = bool(lo > 0.0 or hi < 0.0)

    med_a, med_b = float(np.median(av)), float(np.median(bv))
    boot_b = _boot_median(bv, idx, counts)
    if med_b <= 0.0 or bool((boot_b <= 0.0).any()):
        out["relative"] = None
        out["relative_undefined"] = ("median(b) is not > 0 in the data or in some bootstrap resample, so "
                                     "median(a)/median(b) - 1 is not a meaningful relative change")
        excludes["relative"] = None
    else:
        rel = _boot_median(av, idx, counts) / boot_b - 1.0
        lo, hi = _interval(rel, ci)
        out["relative"] = {"estimate": med_a / med_b - 1.0, "lo": lo, "hi": hi}
        excludes["relative"] = bool(lo > 0.0 or hi < 0.0)
    out["ci_excludes_zero"] = excludes
    out["a"] = {"mean": float(np.mean(av)), "median": med_a}
    out["b"] = {"mean": float(np.mean(bv)), "median": med_b}
    out.update(n_images=int(d.shape[0]), n_persons=k, n_dropped=n_dropped, ci=float(ci), n_boot=int(n_boot))
    return out


# ---------------------------------------------------------------------------------------------- identification


def _prepare_distances(distances: Any, image_person: Any, candidate_persons: Any | None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Validate; map each image to its own candidate column; drop (and count) images with a NaN distance."""
    d = np.asarray(distances, dtype=np.float64)
    if d.ndim != 2:
        raise StatisticsInputError(f"distances must be 2-D [n_images, n_candidates], got shape {d.shape}.")
    n, m = d.shape
    if m < 2:
        raise StatisticsInputError(f"distances has {m} candidate column(s); identification needs at least 2.")
    if np.isinf(d).any():
        raise StatisticsInputError("distances hold infinite values; mark a failed measurement with NaN instead.")
    persons = _labels(image_person, n, "image_person")
    if candidate_persons is None:
        if not np.issubdtype(persons.dtype, np.integer) or persons.min(initial=0) < 0 or persons.max(initial=0) >= m:
            raise StatisticsInputError("Without candidate_persons, image_person must be integer column indices in "
                                       f"[0, {m}); got {persons.dtype} values. Pass candidate_persons (one label "
                                       "per column) to use person labels.")
        own = persons.astype(np.int64)
    else:
        cand = np.asarray(candidate_persons)
        if cand.ndim != 1 or cand.shape[0] != m:
            raise StatisticsInputError(f"candidate_persons must hold one label per distance column ({m}), got "
                                       f"shape {cand.shape}.")
        if np.unique(cand).shape[0] != m:
            raise StatisticsInputError("candidate_persons has duplicate labels; each column must be one person.")
        col_of = {label: j for j, label in enumerate(cand.tolist())}
        missing = sorted({p for p in persons.tolist() if p not in col_of}, key=str)
        if missing:
            raise StatisticsInputError(f"Image person(s) {missing[:5]} have no candidate column; every image's own "
                                       "person must be among the candidates.")
        own = np.array([col_of[p] for p in persons.tolist()], dtype=np.int64)
    keep = ~np.isnan(d).any(axis=1)
    n_dropped = int((~keep).sum())
    if not keep.any():
        raise StatisticsInputError(f"Every one of the {n} images has a NaN distance; nothing to identify.")
    return d[keep], own[keep], persons[keep], n_dropped


def _correct_under(perms: np.ndarray, own: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Top-1 correctness [n_perm, n_images] when column j is relabelled as person perms[:, j].

    An image is correct when its (relabelled) own column is the *strict* unique minimum of its row; ties count
    as wrong, so an uninformative distance can never score.
    """
    rowmin = d.min(axis=1)
    unique_min = (d == rowmin[:, None]).sum(axis=1) == 1
    best = d.argmin(axis=1)
    return (perms[:, own] == best[None, :]) & unique_min[None, :]


def identification(distances: Any, image_person: Any, candidate_persons: Any | None = None) -> dict[str, Any]:
    """Top-1 identification of each image among the candidate persons' references.

    ``rank`` of an image = 1 + number of *other* candidates at a distance <= its own person's (ties count
    against it, so a constant distance gives rank = n_candidates, not 1). Top-1 accuracy is the share of rank 1.
    Without ``candidate_persons``, ``image_person`` gives each image's own column index directly.

    Returns ``{"top1", "chance" (1/n_candidates), "top1_over_chance", "mean_rank", "median_rank",
    "ranks" (per kept image), "n_images", "n_persons", "n_candidates", "n_dropped"}``.
    """
    d, own, persons, n_dropped = _prepare_distances(distances, image_person, candidate_persons)
    n, m = d.shape
    own_d = d[np.arange(n), own]
    ranks = (d <= own_d[:, None]).sum(axis=1)  # counts the own column itself, so rank 1 = strict unique minimum
    top1 = float(np.mean(ranks == 1))
    return {
        "top1": top1,
        "chance": 1.0 / m,
        "top1_over_chance": top1 * m,
        "mean_rank": float(np.mean(ranks)),
        "median_rank": float(np.median(ranks)),
        "ranks": [int(r) for r in ranks],
        "n_images": int(n),
        "n_persons": int(np.unique(persons).shape[0]),
        "n_candidates": int(m),
        "n_dropped": n_dropped,
    }


def _column_perms(m: int, n_perm: int, rng: np.random.Generator) -> np.ndarray:
    if not isinstance(n_perm, (int, np.integer)) or n_perm < 1:
        raise StatisticsInputError(f"n_perm must be a positive integer, got {n_perm!r}.")
    return rng.permuted(np.tile(np.arange(m), (n_perm, 1)), axis=1)


def permutation_pvalue_identification(distances: Any, image_person: Any, n_perm: int = 2000, seed: int = 0, *,
                                      candidate_persons: Any | None = None) -> dict[str, Any]:
    """One-sided permutation p-value that top-1 identification beats chance.

    Null: which person's reference sits in which candidate column is arbitrary. Each null draw relabels the
    columns by a random permutation; every image of a person moves with its person. ``p = (1 + #{null >=
    observed}) / (1 + n_perm)``, so its minimum is ``1 / (1 + n_perm)``.

    Returns ``{"observed" (top-1), "p_value", "null_mean", "null_q95", "n_perm"}``.
    """
    d, own, _, _ = _prepare_distances(distances, image_person, candidate_persons)
    m = d.shape[1]
    observed = float(_correct_under(np.arange(m)[None, :], own, d).mean())
    perms = _column_perms(m, n_perm, np.random.default_rng(seed))
    null = np.empty(n_perm)
    for start in range(0, n_perm, _BLOCK):
        null[start : start + _BLOCK] = _correct_under(perms[start : start + _BLOCK], own, d).mean(axis=1)
    p = (1 + int((null >= observed - 1e-12).sum())) / (1 + n_perm)  # top-1 is a count / n: exact up to 1e-12
    return {"observed": observed, "p_value": float(p), "null_mean": float(null.mean()),
            "null_q95": float(np.quantile(null, 0.95)), "n_perm": int(n_perm)}


def _oms_matrix(d: np.ndarray, own_cols: np.ndarray) -> np.ndarray:
    """own - mean(others) for an own-column assignment ``own_cols`` ([..., n_images])."""
    m = d.shape[1]
    rows = np.arange(d.shape[0])
    own_d = d[rows, own_cols]
    return own_d - (d.sum(axis=1) - own_d) / (m - 1)


def own_minus_others(distances: Any, image_person: Any, candidate_persons: Any | None = None, n_boot: int = 2000,
                     ci: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Per image: distance to its own person's reference minus the mean distance to the other candidates.

    Negative = the image is closer to its own person than to others, i.e. identity transferred. Unlike top-1,
    this uses every distance, so it detects a weak shift. Returns ``{"per_image" (list), "summary"
    (``summarise`` of per_image clustered by person), "n_dropped"}``.
    """
    d, own, persons, n_dropped = _prepare_distances(distances, image_person, candidate_persons)
    per_image = _oms_matrix(d, own)
    return {"per_image": [float(x) for x in per_image],
            "summary": summarise(per_image, persons, n_boot=n_boot, ci=ci, seed=seed),
            "n_dropped": n_dropped}


def permutation_pvalue_own_minus_others(distances: Any, image_person: Any, n_perm: int = 2000, seed: int = 0, *,
                                        candidate_persons: Any | None = None,
                                        statistic: Statistic = "mean") -> dict[str, Any]:
    """One-sided permutation p-value that own - others is negative (own person closer than the others).

    Same column-permutation null as ``permutation_pvalue_identification``; the test statistic is the mean (or
    median) over images of own - mean(others). ``p = (1 + #{null <= observed}) / (1 + n_perm)``.

    Returns ``{"observed", "p_value", "null_mean", "null_q05", "statistic", "n_perm"}``.
    """
    _check_statistic(statistic)
    d, own, _, _ = _prepare_distances(distances, image_person, candidate_persons)
    m = d.shape[1]
    reduce = np.mean if statistic == "mean" else np.median
    observed = float(reduce(_oms_matrix(d, own)))
    perms = _column_perms(m, n_perm, np.random.default_rng(seed))
    null = np.empty(n_perm)
    for start in range(0, n_perm, _BLOCK):
        cols = perms[start : start + _BLOCK][:, own]  # [block, n_images]
        null[start : start + _BLOCK] = reduce(_oms_matrix(d, cols), axis=1)
    tol = 1e-9 * max(1.0, abs(observed))  # the same assignment reduced along another axis may differ by an ulp
    p = (1 + int((null <= observed + tol).sum())) / (1 + n_perm)
    return {"observed": observed, "p_value": float(p), "null_mean": float(null.mean()),
            "null_q05": float(np.quantile(null, 0.05)), "statistic": statistic, "n_perm": int(n_perm)}
