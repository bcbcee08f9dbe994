"""Known-answer tests for training/experiment/stats.py: the vectorised bootstrap equals explicit resampling,
clustered CIs cover at about their nominal rate where image-level CIs do not, exact answers for paired
differences and identification, permutation p-values at their minimum for perfect identification and about
uniform for random distances, NaN handling and clear shape errors. Pure numpy; runs in a few seconds."""

from __future__ import annotations

import numpy as np
import pytest

from bolid.errors import BoLIDError
from training.experiment.stats import (
    Estimate,
    StatisticsInputError,
    _boot_mean,
    _boot_median,
    _draw_counts,
    cluster_bootstrap,
    identification,
    own_minus_others,
    paired_difference,
    permutation_pvalue_identification,
    permutation_pvalue_own_minus_others,
    summarise,
)


def _clustered(rng: np.random.Generator, n_persons: int = 20, per_person: int = 4, person_sd: float = 1.0,
               noise_sd: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Values with a shared per-person effect (true mean and median 0) and person labels."""
    persons = np.repeat(np.arange(n_persons), per_person)
    values = rng.normal(0, person_sd, n_persons)[persons] + rng.normal(0, noise_sd, persons.size)
    return values, persons


# ------------------------------------------------------------------------------------------------- bootstrap


@pytest.mark.parametrize("sizes", [[1, 2, 3, 4], [2, 2, 2], [5, 1, 1, 2, 3, 1]])
def test_vectorised_bootstrap_equals_explicit_resampling(sizes):
    """Each resample's mean and median equal numpy's on the concatenated drawn persons (odd and even totals;
    more draws than one block so the blocked median loop is exercised)."""
    rng = np.random.default_rng(1)
    idx = np.repeat(np.arange(len(sizes)), sizes)
    values = rng.normal(size=idx.size).round(1)  # rounding creates ties
    counts = _draw_counts(len(sizes), 300, np.random.default_rng(2))
    assert (counts.sum(axis=1) == len(sizes)).all()
    means, medians = _boot_mean(values, idx, counts), _boot_median(values, idx, counts)
    for b in range(counts.shape[0]):
        drawn = np.concatenate([np.tile(values[idx == c], counts[b, c]) for c in range(len(sizes))])
        assert means[b] == pytest.approx(drawn.mean(), abs=1e-12)
        assert medians[b] == np.median(drawn)


def test_estimate_is_exact_when_persons_are_identical():
    """Every person has the same images, so every resample gives the same statistic: CI = estimate."""
    values = np.tile([1.0, 2.0, 7.0], 5)
    persons = np.repeat(np.arange(5), 3)
    for stat, expected in (("mean", 10.0 / 3.0), ("median", 2.0)):
        est = cluster_bootstrap(values, persons, statistic=stat, n_boot=200)
        assert est.estimate == pytest.approx(expected)
        assert est.lo == pytest.approx(expected) and est.hi == pytest.approx(expected)
        assert (est.n, est.n_clusters, est.n_dropped) == (15, 5, 0)
    assert set(est.as_dict()) == {"estimate", "lo", "hi", "n", "n_clusters", "n_dropped"}
    with pytest.raises(AttributeError):
        est.estimate = 0.0  # frozen


def test_clustered_ci_covers_at_nominal_rate_and_iid_ci_does_not():
    """Simulated persons with intra-class correlation 0.5: the person bootstrap covers the true mean ~95 %
    of the time (percentile intervals run a little narrow with 20 persons, ~0.92, hence the lower bound);
    treating the 80 images as independent covers far less (design effect 2.5, expected ~0.78)."""
    rng = np.random.default_rng(0)
    reps = 300
    cover = {"mean": 0, "median": 0, "iid": 0}
    for r in range(reps):
        values, persons = _clustered(rng)
        for stat in ("mean", "median"):
            est = cluster_bootstrap(values, persons, statistic=stat, n_boot=250, seed=r)
            cover[stat] += est.lo <= 0.0 <= est.hi
        iid = cluster_bootstrap(values, np.arange(values.size), n_boot=250, seed=r)
        cover["iid"] += iid.lo <= 0.0 <= iid.hi
    assert 0.87 <= cover["mean"] / reps <= 0.99
    assert 0.87 <= cover["median"] / reps <= 0.995
    assert cover["iid"] / reps <= 0.85


def test_clustered_ci_is_wider_than_iid_with_within_person_correlation():
    values, persons = _clustered(np.random.default_rng(3), n_persons=16, per_person=8, person_sd=1.0, noise_sd=0.3)
    clustered = cluster_bootstrap(values, persons)
    iid = cluster_bootstrap(values, np.arange(values.size))
    assert clustered.estimate == iid.estimate
    assert (clustered.hi - clustered.lo) > 1.8 * (iid.hi - iid.lo)
    # Without within-person correlation the two agree roughly.
    values = np.random.default_rng(4).normal(size=persons.size)
    clustered = cluster_bootstrap(values, persons)
    iid = cluster_bootstrap(values, np.arange(values.size))
    assert 0.6 < (clustered.hi - clustered.lo) / (iid.hi - iid.lo) < 1.6


def test_deterministic_with_seed_and_seed_matters():
    values, persons = _clustered(np.random.default_rng(5))
    assert cluster_bootstrap(values, persons, seed=7) == cluster_bootstrap(values, persons, seed=7)
    assert cluster_bootstrap(values, persons, seed=7) != cluster_bootstrap(values, persons, seed=8)
    a = values + 1.0
    assert paired_difference(a, values, persons, seed=3) == paired_difference(a, values, persons, seed=3)
    assert summarise(values, persons, seed=1) == summarise(values, persons, seed=1)


def test_string_person_labels_work_like_integers():
    values, persons = _clustered(np.random.default_rng(6), n_persons=6)
    names = np.array([f"person_{p:02d}" for p in persons])
    assert cluster_bootstrap(values, names, n_boot=300) == cluster_bootstrap(values, persons, n_boot=300)


def test_nan_values_are_dropped_and_counted():
    values, persons = _clustered(np.random.default_rng(7), n_persons=8)
    with_nan = values.copy()
    with_nan[[0, 5, 9]] = np.nan  # no person loses all images, so the resamples are the same
    keep = ~np.isnan(with_nan)
    est = cluster_bootstrap(with_nan, persons, statistic="median")
    ref = cluster_bootstrap(values[keep], persons[keep], statistic="median")
    assert est == Estimate(ref.estimate, ref.lo, ref.hi, ref.n, ref.n_clusters, 3)
    assert np.isfinite([est.estimate, est.lo, est.hi]).all()
    s = summarise(with_nan, persons)
    assert (s["n_images"], s["n_persons"], s["n_dropped"]) == (values.size - 3, 8, 3)
    # A person whose every value is NaN is no longer a cluster.
    with_nan[persons == 0] = np.nan
    assert cluster_bootstrap(with_nan, persons).n_clusters == 7
    with pytest.raises(StatisticsInputError, match="All 4 values are NaN"):
        cluster_bootstrap(np.full(4, np.nan), [0, 0, 1, 1])
    with pytest.raises(StatisticsInputError, match="single person"):
        cluster_bootstrap([1.0, 2.0, np.nan], [0, 0, 1])
    with pytest.raises(StatisticsInputError, match="infinite"):
        cluster_bootstrap([1.0, np.inf], [0, 1])


def test_bad_inputs_give_clear_value_errors():
    assert issubclass(StatisticsInputError, ValueError) and issubclass(StatisticsInputError, BoLIDError)
    with pytest.raises(ValueError, match="1-D"):
        cluster_bootstrap(np.zeros((3, 2)), [0, 1, 2])
    with pytest.raises(ValueError, match=r"one label per image \(3\)"):
        cluster_bootstrap([1.0, 2.0, 3.0], [0, 1])
    with pytest.raises(ValueError, match="statistic"):
        cluster_bootstrap([1.0, 2.0], [0, 1], statistic="mode")
    with pytest.raises(ValueError, match="ci must be"):
        summarise([1.0, 2.0], [0, 1], ci=95)
    with pytest.raises(ValueError, match="n_boot"):
        summarise([1.0, 2.0], [0, 1], n_boot=0)
    with pytest.raises(ValueError, match="paired image by image"):
        paired_difference([1.0, 2.0], [1.0], [0, 1])
    with pytest.raises(ValueError, match=r"2-D \[n_images, n_candidates\]"):
        identification(np.zeros(4), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="at least 2"):
        identification(np.zeros((3, 1)), [0, 0, 0])
    with pytest.raises(ValueError, match=r"one label per distance column \(3\)"):
        identification(np.zeros((2, 3)), ["a", "b"], ["a", "b"])
    with pytest.raises(ValueError, match="no candidate column"):
        identification(np.zeros((2, 2)), ["a", "z"], ["a", "b"])
    with pytest.raises(ValueError, match="duplicate"):
        identification(np.zeros((2, 2)), ["a", "a"], ["a", "a"])
    with pytest.raises(ValueError, match="integer column indices"):
        own_minus_others(np.zeros((2, 2)), [0, 2])
    with pytest.raises(ValueError, match="n_perm"):
        permutation_pvalue_identification(np.eye(3), [0, 1, 2], n_perm=0)


# ------------------------------------------------------------------------------------------ paired difference


def test_paired_difference_known_answers():
    rng = np.random.default_rng(8)
    b, persons = _clustered(rng, n_persons=12)
    b = np.abs(b) + 0.1  # positive, like an error
    out = paired_difference(b + 0.5, b, persons, n_boot=500)
    for stat in ("mean", "median"):
        assert out[stat]["estimate"] == pytest.approx(0.5)
        assert out[stat]["lo"] == pytest.approx(0.5) and out[stat]["hi"] == pytest.approx(0.5)
        assert out["ci_excludes_zero"][stat] is True
    # a = 0.7 b: the median of a is 0.7 x the median of b in every resample, so relative = -0.3 exactly.
    out = paired_difference(0.7 * b, b, persons, n_boot=500)
    assert out["relative"]["estimate"] == pytest.approx(-0.3)
    assert out["relative"]["lo"] == pytest.approx(-0.3) and out["relative"]["hi"] == pytest.approx(-0.3)
    assert out["ci_excludes_zero"]["relative"] is True
    assert out["a"]["median"] == pytest.approx(0.7 * out["b"]["median"])
    assert (out["n_images"], out["n_persons"], out["n_dropped"]) == (48, 12, 0)
    # Same resamples as cluster_bootstrap of the differences.
    a = b + rng.normal(0, 0.3, b.size)
    out = paired_difference(a, b, persons, n_boot=400, seed=4)
    ref = cluster_bootstrap(a - b, persons, statistic="median", n_boot=400, seed=4)
    assert (out["median"]["estimate"], out["median"]["lo"], out["median"]["hi"]) == (ref.estimate, ref.lo, ref.hi)


def test_paired_difference_no_effect_and_nan_pairs():
    rng = np.random.default_rng(9)
    b, persons = _clustered(rng, n_persons=16)
    b = np.abs(b) + 1.0
    a = b.copy()
    a[::2] += 0.01
    a[1::2] -= 0.01
    a[3] = np.nan
    out = paired_difference(a, b, persons)
    assert out["n_dropped"] == 1 and out["n_images"] == b.size - 1
    assert out["mean"]["lo"] <= 0.0 <= out["mean"]["hi"]
    assert out["ci_excludes_zero"]["mean"] is False
    # A signed quantity whose median is not positive has no relative change.
    out = paired_difference(b - 5.0, b - 6.0 - np.abs(b), persons, n_boot=200)
    assert out["relative"] is None and "median(b)" in out["relative_undefined"]
    assert out["ci_excludes_zero"]["relative"] is None
    with pytest.raises(StatisticsInputError, match="NaN in a or b"):
        paired_difference([np.nan, 1.0], [1.0, np.nan], [0, 1])


# --------------------------------------------------------------------------------------------- identification


def test_identification_hand_example_and_ties():
    # Candidates in another order than the images; ties count against the image.
    d = np.array([[0.1, 0.5, 0.9],    # own "a" (col 0): rank 1
                  [0.2, 0.3, 0.1],    # own "b" (col 1): 0.2 and 0.1 are closer -> rank 3
                  [0.4, 0.4, 0.7]])   # own "c" (col 2): both others closer -> rank 3
    out = identification(d, ["a", "b", "c"], ["a", "b", "c"])
    assert out["ranks"] == [1, 3, 3]
    assert out["top1"] == pytest.approx(1 / 3) and out["chance"] == pytest.approx(1 / 3)
    assert out["top1_over_chance"] == pytest.approx(1.0)
    tied = identification(np.ones((4, 4)), [0, 1, 2, 3])
    assert tied["top1"] == 0.0 and tied["ranks"] == [4, 4, 4, 4]
    # Tie between own and another: not identified.
    assert identification(np.array([[0.1, 0.1], [0.5, 0.2]]), [0, 1])["ranks"] == [2, 1]


def test_perfect_identification_has_accuracy_one_and_minimal_p():
    rng = np.random.default_rng(10)
    n_persons, per_person = 12, 3
    persons = np.repeat(np.arange(n_persons), per_person)
    d = rng.uniform(1.0, 2.0, (persons.size, n_persons))
    d[np.arange(persons.size), persons] = rng.uniform(0.0, 0.5, persons.size)
    names = np.array([f"p{p}" for p in persons])
    cand = np.array([f"p{p}" for p in range(n_persons)])
    out = identification(d, names, cand)
    assert out["top1"] == 1.0 and out["chance"] == pytest.approx(1 / 12) and out["top1_over_chance"] == 12.0
    assert (out["n_images"], out["n_persons"], out["n_candidates"]) == (36, 12, 12)
    perm = permutation_pvalue_identification(d, names, n_perm=2000, candidate_persons=cand)
    assert perm["observed"] == 1.0
    assert perm["p_value"] == pytest.approx(1 / 2001)
    # Each image is right under a random relabelling with probability 1/12: the null centres on chance.
    assert perm["null_mean"] == pytest.approx(1 / 12, abs=0.01)
    oms = permutation_pvalue_own_minus_others(d, persons, n_perm=2000)
    assert oms["observed"] < 0 and oms["p_value"] == pytest.approx(1 / 2001)
    assert oms["null_mean"] == pytest.approx(0.0, abs=0.02)  # E over relabellings of own - others is 0


def test_random_distances_give_about_uniform_p_values():
    rng = np.random.default_rng(11)
    n_persons, per_person, reps = 8, 3, 300
    persons = np.repeat(np.arange(n_persons), per_person)
    p_id, p_oms = [], []
    for r in range(reps):
        d = rng.uniform(0.0, 1.0, (persons.size, n_persons))
        p_id.append(permutation_pvalue_identification(d, persons, n_perm=199, seed=r)["p_value"])
        p_oms.append(permutation_pvalue_own_minus_others(d, persons, n_perm=199, seed=r)["p_value"])
    p_id, p_oms = np.array(p_id), np.array(p_oms)
    # Top-1 is discrete, so its p-value is conservative: never too many small p-values.
    assert np.mean(p_id <= 0.05) <= 0.09 and np.mean(p_id <= 0.01) <= 0.03
    assert 0.4 <= p_id.mean() <= 0.75
    # own - others is continuous, so its p-value is about uniform.
    assert 0.02 <= np.mean(p_oms <= 0.1) <= 0.18
    assert 0.4 <= p_oms.mean() <= 0.6


def test_own_minus_others_sign_and_values():
    d = np.array([[1.0, 2.0, 3.0],
                  [4.0, 1.0, 1.0],
                  [np.nan, 1.0, 1.0],
                  [2.0, 2.0, 0.5]])
    out = own_minus_others(d, [0, 0, 1, 2], n_boot=200)
    assert out["per_image"] == pytest.approx([1.0 - 2.5, 4.0 - 1.0, 0.5 - 2.0])
    assert out["n_dropped"] == 1 and out["summary"]["n_images"] == 3 and out["summary"]["n_persons"] == 2
    assert out["summary"]["median"]["estimate"] == pytest.approx(-1.5)
    # A world where identity transfers weakly: own is closer by 0.3 on average, with noise.
    rng = np.random.default_rng(12)
    persons = np.repeat(np.arange(16), 4)
    d = rng.normal(1.0, 0.3, (persons.size, 16))
    d[np.arange(persons.size), persons] -= 0.3
    good = permutation_pvalue_own_minus_others(d, persons, n_perm=999, statistic="median")
    assert good["observed"] < 0 and good["p_value"] < 0.01
    assert own_minus_others(d, persons)["summary"]["mean"]["hi"] < 0
    # The opposite world (own is farther) is not significant in the one-sided test.
    d[np.arange(persons.size), persons] += 0.6
    bad = permutation_pvalue_own_minus_others(d, persons, n_perm=999)
    assert bad["observed"] > 0 and bad["p_value"] > 0.9


def test_ratio_of_means_known_answers():
    from training.experiment.stats import ratio_of_means

    person = np.repeat(np.arange(6), 3)
    whole = np.linspace(1.0, 2.0, 18)
    exact = ratio_of_means(0.1 * whole, whole, person, n_boot=300)
    assert exact.estimate == pytest.approx(0.1) and exact.lo == pytest.approx(0.1) and exact.hi == pytest.approx(0.1)
    # persons 0-2 keep 10 %, persons 3-5 keep 30 %: the estimate is the ratio of the means, every resample's ratio
    # lies between the two, and an unequal mix of persons moves it (the CI is not a point)
    part = np.where(person < 3, 0.1, 0.3) * whole
    mixed = ratio_of_means(part, whole, person, n_boot=300)
    assert mixed.estimate == pytest.approx(part.mean() / whole.mean())
    assert 0.1 <= mixed.lo < mixed.estimate < mixed.hi <= 0.3
    assert (mixed.n, mixed.n_clusters) == (18, 6)
    part_nan = part.copy()
    part_nan[0] = np.nan
    assert ratio_of_means(part_nan, whole, person, n_boot=50).n_dropped == 1
    with pytest.raises(ValueError, match="paired image by image"):
        ratio_of_means(part[:5], whole, person)
    with pytest.raises(ValueError, match="> 0"):
        ratio_of_means(part, -whole, person)


def test_shrinkage_slopes_known_answers():
    from training.experiment.analysis import shrinkage_slopes

    rng = np.random.default_rng(0)
    mean = np.array([1.0, 2.0, 3.0])
    truth = mean + rng.normal(0, 0.1, (40, 3))
    # an exact instrument, one that halves every deviation, one that reads nothing but the mean
    assert shrinkage_slopes(truth, truth) == pytest.approx([1, 1, 1])
    assert shrinkage_slopes(mean + 0.5 * (truth - mean), truth) == pytest.approx([0.5, 0.5, 0.5])
    assert shrinkage_slopes(np.broadcast_to(mean, truth.shape), truth) == pytest.approx([0, 0, 0])
    # a constant offset is not shrinkage; noise independent of the truth does not bias the slope much
    assert shrinkage_slopes(truth + 0.3, truth) == pytest.approx([1, 1, 1])
    noisy = truth + rng.normal(0, 0.01, truth.shape)
    assert shrinkage_slopes(noisy, truth) == pytest.approx([1, 1, 1], abs=0.05)
