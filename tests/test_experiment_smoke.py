"""The CPU experiment end to end, drastically shortened: world, stage 1 and its held-out checks, every adapter of
the ladder (oracle, BoLID, shuffled control, both ablations), generation under every arm, the body-branch
response, statistics, criteria, results.json/md and the grid (the numbers mean nothing at this length)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from training.experiment.config import ExperimentConfig, ExperimentConfigError
from training.experiment.run import run

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS = REPO_ROOT / "training" / "experiment_assets"
CONFIG = REPO_ROOT / "training" / "configs" / "experiment.toml"

SHORT = {
    "threads": 1,
    "world": {"train_identities": 4, "photos_per_identity": 3, "heldout_identities": 3,
              "heldout_reference_photos": 2, "heldout_target_photos": 1},
    "stage1": {"latent_dim": 8, "width": 8, "hidden": 16, "max_steps": 2, "batch_size": 4},
    "stage2": {"max_steps": 2, "batch_size": 2, "warmup_steps": 1, "id_max_timestep": 1000},
    "sampling": {"steps": 2, "seeds_per_caption": 2},
    "arms": {"no_id_loss": True, "target_in_context": True},
    "stats": {"n_boot": 50, "n_perm": 50},
}


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(ExperimentConfigError, match="max_stepz"):
        ExperimentConfig.load(CONFIG, {"stage2": {"max_stepz": 3}})
    with pytest.raises(ExperimentConfigError, match="unknown keys"):
        ExperimentConfig.load(CONFIG, {"wrld": {}})
    with pytest.raises(ExperimentConfigError, match="held-out"):
        ExperimentConfig.load(CONFIG, {"world": {"heldout_identities": 1}})
    # stage 2's loss settings are checked by stage 2's own rule when the config is read, not after stage 1
    with pytest.raises(ExperimentConfigError, match=r"\[stage2\].*snr_gamma"):
        ExperimentConfig.load(CONFIG, {"stage2": {"snr_gamma": -1.0}})
    with pytest.raises(ExperimentConfigError, match="appearance_max_timestep"):
        ExperimentConfig.load(CONFIG, {"stage2": {"appearance_weight": 1.0, "min_timestep": 300,
                                                  "appearance_max_timestep": 200}})
    with pytest.raises(ExperimentConfigError, match="workers"):
        ExperimentConfig.load(CONFIG, {"workers": -1})
    with pytest.raises(ExperimentConfigError, match="heldout_first_index 49999 would reuse people"):
        ExperimentConfig.load(CONFIG, {"world": {"heldout_first_index": 49_999}})
    cfg = ExperimentConfig.load(CONFIG)
    assert cfg.world.heldout_identities >= 32 and cfg.stage1.proportion_weight == 1.0


def test_heldout_first_index_draws_fresh_people_for_the_same_training_world():
    """A fresh set of held-out people (the recipe check on people nobody looked at) must leave every training photo as
    it is, so stage 1 and the adapters train exactly as in the main job."""
    from training.experiment.stages import render_world

    world = dict(SHORT["world"])
    a = render_world(ExperimentConfig.load(CONFIG, {"world": world}))
    b = render_world(ExperimentConfig.load(CONFIG, {"world": {**world, "heldout_first_index": 4_000_000}}))
    assert a.train.keys() == b.train.keys()
    for name in a.train:
        for pa, pb in zip(a.train[name], b.train[name], strict=True):
            np.testing.assert_array_equal(pa.image, pb.image)
    assert [p.identity.index for p in a.heldout.values()] == [1_000_000, 1_000_001, 1_000_002]
    assert [p.identity.index for p in b.heldout.values()] == [4_000_000, 4_000_001, 4_000_002]


@pytest.mark.skipif(not (ASSETS / "base_unet.safetensors").is_file(), reason="world models not committed")
def test_experiment_runs_end_to_end_and_reports_every_arm(tmp_path):
    cfg = ExperimentConfig.load(CONFIG, {**SHORT, "output_dir": str(tmp_path / "out")})
    results = run(cfg)
    out = tmp_path / "out"
    for name in ("results.md", "results.json", "grid.png"):
        assert (out / name).is_file(), name
    arms = results["arms"]
    assert list(arms)[:3] == ["real", "text", "oracle"]
    for key in ("bolid", "bolid_single", "bolid_stored", "bolid_swapped", "bolid_sampled", "oracle_swapped",
                "shuffled", "no_id", "target_in_context"):
        assert key in arms, key
    for key, arm in arms.items():
        assert arm["summary"]["caption_attributes"]["n_images"] == 6  # 3 people x 1 caption x 2 seeds
        assert math.isfinite(arm["fid_pose_features"])
        assert ("vs_text_only" in arm) == (key not in ("real", "text"))
    assert set(results["body_branch_response"]) == {"oracle", "bolid", "shuffled", "no_id", "target_in_context"}
    assert set(results["body_effect_vs_caption_effect"]) == set(results["body_branch_response"])
    assert all(v["median"]["estimate"] > 0 for v in results["body_effect_vs_caption_effect"].values())
    # the stored identity (saved, reloaded) reproduces the multi-view images exactly
    assert results["stored_vs_multiview_max_pixel_diff"] == 0
    assert results["criteria"]["stored_equals_multi_view_max_pixel_diff"]["met"]
    assert {"value", "target", "met"} <= set(results["criteria"]["body_own_minus_others"])
    assert results["criteria"]["run_time_s"]["value"] == results["timings_s"]["total"]
    s1 = results["stage1"]
    assert s1["halves_identification"]["n_candidates"] == 3 and "improvement" in s1["proportion_head"]["vs_truth"]
    bound = s1["pose_model_on_reference_photos_vs_truth"]
    assert bound["rms"] >= 0 and list(bound["slope_per_proportion"]) == ["upper_arm", "forearm", "thigh", "shin",
                                                                          "shoulder_width", "hip_width"]
    # the world's exact keypoints give the true proportions: what the pose model loses is the pose model's
    assert bound["exact_keypoints_improvement"] == pytest.approx(1.0, abs=1e-5)  # float32 keypoints
    saved = json.loads((out / "results.json").read_text())
    assert saved["timings_s"]["total"] > 0 and len(saved["per_image"]["person"]) == 6
    assert "| criterion |" in (out / "results.md").read_text()
    assert len(list((out / "body_ids").glob("*.safetensors"))) == 3
    from PIL import Image

    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape[0] > 2 * 32 and grid.std() > 0


def test_a_failed_worker_job_is_raised_early_and_a_failing_caller_stops_the_workers():
    import time

    from training.experiment.parallel import AdapterWorkers

    with AdapterWorkers(1) as workers:
        future = workers.submit(math.sqrt, -1.0)  # a job that fails (importable in the spawned worker)
        deadline = time.time() + 120
        while not future.done() and time.time() < deadline:
            time.sleep(0.2)
        with pytest.raises(ValueError, match="math domain error"):
            workers.raise_failed([future])
    started = time.time()
    with pytest.raises(KeyError), AdapterWorkers(1) as workers:
        busy = workers.submit(time.sleep, 600)
        while not busy.running():
            time.sleep(0.1)
        raise KeyError("the caller fails")
    assert time.time() - started < 60  # the ten-minute job was stopped, not waited for


def test_training_on_both_cores_changes_no_number(tmp_path):
    """workers = 1 (stage 1 and adapters in two processes, one thread each) gives exactly the results of training
    everything in order in one process with one thread: the schedule is not a source of variation."""
    results = {}
    for workers in (0, 1):
        cfg = ExperimentConfig.load(CONFIG, {**SHORT, "workers": workers, "output_dir": str(tmp_path / f"w{workers}")})
        r = run(cfg)
        assert ("stage1_and_stage2" in r["timings_s"]) == (workers == 1)
        assert all(r["timings_s"][f"stage2_{key}"] >= 0 for key in r["body_branch_response"])
        r["criteria"].pop("run_time_s")  # a timing, like timings_s
        results[workers] = json.dumps({k: v for k, v in r.items() if k not in ("timings_s", "config")},
                                      sort_keys=True, default=str)
    assert results[0] == results[1]


@pytest.mark.skipif(not (ASSETS / "base_unet.safetensors").is_file(), reason="world models not committed")
def test_sampling_sweep_measures_each_setting_like_the_text_only_arm():
    from training.experiment.sampling_sweep import sweep

    cfg = ExperimentConfig.load(CONFIG, {k: SHORT[k] for k in ("threads", "world", "sampling", "stats")})
    result = sweep(cfg, guidances=(1.0, 3.0), step_counts=(2,))
    assert result["images"] == 6 and [(r["steps"], r["guidance"]) for r in result["text_only"]] == [(2, 1.0), (2, 3.0)]
    assert result["real_photos"]["failed_render"]["estimate"] == 0.0
    for row in result["text_only"]:
        assert 0.0 <= row["failed_render"]["estimate"] <= 1.0
        assert math.isfinite(row["fid_vs_real_photos"]) and row["caption_attributes_vs_real_floor"] >= 0
    # guidance changes the images (same noise): the two settings are not the same measurement
    assert result["text_only"][0]["fid_pose_features"] != result["text_only"][1]["fid_pose_features"]


def test_recipe_probe_overrides_are_typed():
    from training.experiment.recipe_probe import parse_overrides

    assert parse_overrides(["stage2.max_steps=900", "stage2.learning_rate=3e-3", "output_dir=/tmp/x"]) == {
        "stage2": {"max_steps": 900, "learning_rate": 3e-3}, "output_dir": "/tmp/x"}
    with pytest.raises(SystemExit, match="table.key=value"):
        parse_overrides(["stage2.max_steps"])


@pytest.mark.skipif(not (ASSETS / "base_unet.safetensors").is_file(), reason="world models not committed")
@pytest.mark.parametrize("what", ["stage1", "oracle", "bolid", "ceiling"])
def test_recipe_probe_runs_each_probe(tmp_path, what, capsys):
    from training.experiment.recipe_probe import main

    sets = ["threads=1", "world.train_identities=4", "world.photos_per_identity=3", "world.heldout_identities=3",
            "world.heldout_reference_photos=2", "world.heldout_target_photos=1", "stage1.latent_dim=8",
            "stage1.width=8", "stage1.hidden=16", "stage1.max_steps=2", "stage1.batch_size=4", "stage2.max_steps=2",
            "stage2.batch_size=2", "stage2.warmup_steps=1", "sampling.steps=2", f"output_dir={tmp_path / 'o'}"]
    out = tmp_path / "probe.json"
    # the oracle probe also trains with L_id's appearance term (per-view colours read from the world's photos)
    extra = ["--loss-share", "--body-guidance", "3", "--set", "stage2.appearance_weight=0.5"] if what == "oracle" else []
    assert main([what, *sum((["--set", s] for s in sets), []), *extra, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["probe"] == what and result["overrides"]["stage2"]["max_steps"] == 2
    if what == "stage1":
        assert result["stage1"]["halves_identification"]["n_candidates"] == 3
        with pytest.raises(SystemExit):
            main([what, "--loss-share", "--out", str(out)])
        assert "belong to the oracle probe" in capsys.readouterr().err
    elif what == "bolid":
        assert result["encoder"].startswith("trained") and set(result["text"]) == set(result["bolid"])
        transfer = result["bolid_vs_text_only"]
        assert set(transfer) >= {"skin_error_ratio", "hair_error_ratio", "body_error_change",
                                 "appearance_identification", "body_own_minus_others", "caption_attribute_drop"}
        # the transfer figures are the arms' own means, compared as the criteria compare them
        if result["text"]["skin_error"] > 0:
            assert transfer["skin_error_ratio"] == pytest.approx(result["bolid"]["skin_error"] / result["text"]["skin_error"])
        assert transfer["caption_attribute_drop"] == pytest.approx(
            result["text"]["caption_attributes"] - result["bolid"]["caption_attributes"])
        assert transfer["appearance_identification"]["chance"] == pytest.approx(1 / 3)
        # the stage-1 export the first call wrote, loaded instead of trained: the same encoder, the same numbers
        again = tmp_path / "again.json"
        export = tmp_path / "o" / "stage1" / "body_encoder.safetensors"
        assert main([what, *sum((["--set", s] for s in sets), []), "--encoder", str(export), "--out", str(again)]) == 0
        loaded = json.loads(again.read_text())
        assert loaded["encoder"] == str(export)
        # compared as JSON text: a NaN mean (an unreadable body at 2 sampler steps) equals itself there
        assert json.dumps(loaded["bolid"]) == json.dumps(result["bolid"])
        assert loaded["final_loss_mean_of_50"] == result["final_loss_mean_of_50"]
        with pytest.raises(SystemExit):
            main(["oracle", "--encoder", str(export), "--out", str(out)])
        assert "belongs to the bolid probe" in capsys.readouterr().err
    elif what == "ceiling":
        rows = result["rows"]
        assert result["strengths"] == list(rows)[:-1] and list(rows)[0] == "0.0" and list(rows)[-2:] == ["1.0", "named"]
        assert rows["named"]["start_timestep"] == rows["1.0"]["start_timestep"]
        # strength 0 is the photos themselves: the reader's floor, and no change against itself
        assert rows["0.0"]["failed_render"] == 0.0 and rows["0.0"]["start_timestep"] is None
        # two sampler steps (t 500, 0): strength 1 starts at the first, 0.2 and 0.4 at the last (at least one step)
        assert rows["1.0"]["start_timestep"] == 500 and rows["0.2"]["start_timestep"] == rows["0.4"]["start_timestep"] == 0
        # with 2 sampler steps some bodies are unreadable: a statistic that cannot be had says why, never NaN
        paired = rows["1.0"]["body_error_vs_text_only"]
        assert "undefined" in paired or paired["mean"]["estimate"] == 0.0
        for row in rows.values():
            assert 0 <= row["skin_error"] <= 1 and row["skin_error_summary"]["n_persons"] == 3
            assert row["appearance_identification"]["chance"] == pytest.approx(1 / 3)
    else:
        assert set(result["text"]) == set(result["oracle"]) and 0 <= result["oracle"]["skin_error"] <= 1
        assert "skin_error_ratio" in result["oracle_vs_text_only"]
        assert result["config"]["stage2"]["appearance_weight"] == 0.5
        assert set(result["oracle_body_guidance"]["3.0"]) == set(result["oracle"]) | {"guidance", "body_guidance"}
        share = result["loss_share"]
        assert set(share) == {"all", "t0-250", "t250-500", "t500-750", "t750-1000"}
        assert share["all"]["n_rows"] == 3 * 8 and share["t0-250"]["n_rows"] == 3 * 2
        assert share["all"]["n_images"] == 3 and share["all"]["n_persons"] == 3
        assert math.isfinite(share["all"]["swapped_minus_own"]["mean"]["estimate"])
