"""Stage 1 end to end on a synthetic multi-view dataset: prepare/cache, training, resume, export, entry point.

Every identity is a stick figure whose bone lengths, limb thickness and colour are fixed; each photo shows it in
a random pose, position and size. A fake pose runner returns the keypoints the figure was drawn with.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

from bolid.body_encoder_io import encoder_hash, load_body_encoder
from bolid.dataset import DatasetCacheError, dataset_config_from_dict
from bolid.dataset_prepare import prepare_dataset
from bolid.errors import BoLIDError
from bolid.identity_cache import Stage1Dataset, load_identity_caches, stage1_collate
from bolid.keypoints import PersonPose
from bolid.proportions import body_proportions_np
from bolid.safetensors_io import atomic_write_text, read_safetensors_metadata
from training.common import list_checkpoints
from training.stage1 import Stage1Config, train_stage1

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 96


# ----------------------------------------------------------------------------------------------- synthetic data


def identity_params(rng: np.random.Generator) -> dict:
    """Body of one identity, in torso units (torso = shoulder midpoint to hip midpoint)."""
    return {"upper_arm": rng.uniform(0.35, 0.7), "forearm": rng.uniform(0.3, 0.65), "thigh": rng.uniform(0.4, 0.75),
            "shin": rng.uniform(0.4, 0.75), "shoulder": rng.uniform(0.45, 0.9), "hip": rng.uniform(0.3, 0.6),
            "thickness": float(rng.uniform(0.05, 0.16)), "colour": tuple(int(c) for c in rng.integers(40, 255, 3))}


def pose_keypoints(body: dict, rng: np.random.Generator, centre: tuple[float, float], unit: float) -> np.ndarray:
    """17x3 COCO keypoints of ``body`` in a random pose (pixel coordinates, y down)."""
    kp = np.zeros((17, 3), dtype=np.float32)
    hip_mid = np.array(centre, dtype=np.float64)
    lean = rng.uniform(-0.2, 0.2)
    up = np.array([np.sin(lean), -np.cos(lean)])
    side = np.array([np.cos(lean), np.sin(lean)])
    sh_mid = hip_mid + unit * up

    def limb(start: np.ndarray, length: float, angle: float) -> np.ndarray:
        return start + unit * length * np.array([np.sin(angle), np.cos(angle)])

    kp[5, :2] = sh_mid + 0.5 * unit * body["shoulder"] * side
    kp[6, :2] = sh_mid - 0.5 * unit * body["shoulder"] * side
    kp[11, :2] = hip_mid + 0.5 * unit * body["hip"] * side
    kp[12, :2] = hip_mid - 0.5 * unit * body["hip"] * side
    for s, (sh, el, wr) in ((1, (5, 7, 9)), (-1, (6, 8, 10))):
        kp[el, :2] = limb(kp[sh, :2], body["upper_arm"], s * rng.uniform(0.1, 1.4))
        kp[wr, :2] = limb(kp[el, :2], body["forearm"], s * rng.uniform(-0.3, 2.0))
    for s, (hp, kn, an) in ((1, (11, 13, 15)), (-1, (12, 14, 16))):
        kp[kn, :2] = limb(kp[hp, :2], body["thigh"], s * rng.uniform(-0.1, 0.5))
        kp[an, :2] = limb(kp[kn, :2], body["shin"], s * rng.uniform(-0.3, 0.3))
    kp[0, :2] = sh_mid + 0.45 * unit * up
    kp[1, :2], kp[2, :2] = kp[0, :2] + 0.08 * unit * side, kp[0, :2] - 0.08 * unit * side
    kp[3, :2], kp[4, :2] = kp[0, :2] + 0.16 * unit * side, kp[0, :2] - 0.16 * unit * side
    kp[:, 2] = rng.uniform(0.75, 1.0, 17)
    return kp


def draw_figure(body: dict, kp: np.ndarray, size: int, unit: float, rng: np.random.Generator) -> np.ndarray:
    grey = int(rng.integers(0, 60))
    img = Image.new("RGB", (size, size), (grey, grey, grey))
    d = ImageDraw.Draw(img)
    width = max(1, round(body["thickness"] * unit))
    for a, b in ((5, 6), (11, 12), (5, 11), (6, 12), (5, 7), (7, 9), (6, 8), (8, 10), (11, 13), (13, 15),
                 (12, 14), (14, 16)):
        d.line([tuple(kp[a, :2]), tuple(kp[b, :2])], fill=body["colour"], width=width)
    r = 0.2 * unit
    d.ellipse([kp[0, 0] - r, kp[0, 1] - r, kp[0, 0] + r, kp[0, 1] + r], fill=body["colour"])
    return np.asarray(img)


def person(kp: np.ndarray, pad: float = 3.0) -> PersonPose:
    lo, hi = kp[:, :2].min(0) - pad, kp[:, :2].max(0) + pad
    return PersonPose(box=np.concatenate([lo, hi]), score=0.9, keypoints=kp)


class FakePoseRunner:
    """Returns the people an image was drawn with (looked up by the image's bytes)."""

    fingerprint = "fake-pose"

    def __init__(self) -> None:
        self.table: dict[str, list[PersonPose]] = {}
        self.calls = 0

    @staticmethod
    def key(image: np.ndarray) -> str:
        return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()

    def detect(self, images: list[np.ndarray]) -> list[list[PersonPose]]:
        self.calls += len(images)
        return [self.table.get(self.key(im), []) for im in images]


def write_views(folder: Path, body: dict, views: int, rng, runner: FakePoseRunner, caption: str | None = None
                ) -> None:
    """Draw ``views`` photos of one body at random placements into ``folder`` and register their poses."""
    folder.mkdir(parents=True, exist_ok=True)
    for j in range(views):
        unit = IMAGE_SIZE * rng.uniform(0.22, 0.3)
        centre = (IMAGE_SIZE * rng.uniform(0.4, 0.6), IMAGE_SIZE * rng.uniform(0.45, 0.55))
        kp = pose_keypoints(body, rng, centre, unit)
        img = np.ascontiguousarray(draw_figure(body, kp, IMAGE_SIZE, unit, rng))
        Image.fromarray(img).save(folder / f"{j:02d}.png")
        if caption is not None:
            (folder / f"{j:02d}.txt").write_text(f"{caption}, view {j}")
        runner.table[runner.key(img)] = [person(kp)]


def make_dataset(root: Path, runner: FakePoseRunner, identities: int = 6, views: int = 6, seed: int = 0,
                 extras: bool = False) -> dict[str, dict]:
    """Write <root>/<identity>/*.png; with ``extras`` also one bad file of every kind the prepare step skips."""
    rng = np.random.default_rng(seed)
    bodies = {}
    for i in range(identities):
        name = f"person_{i}"
        body = identity_params(rng)
        bodies[name] = body
        write_views(root / name, body, views, rng, runner, caption=f"a photo of {name}")
    if extras:
        folder = root / "person_0"
        (folder / "corrupt.jpg").write_bytes(b"not a jpeg at all")
        Image.new("RGB", (40, 40)).save(folder / "tiny.png")
        Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (9, 9, 9)).save(folder / "empty.png")  # nobody in it
        kp = pose_keypoints(bodies["person_0"], rng, (30, 48), 20)
        kp2 = pose_keypoints(bodies["person_1"], rng, (66, 48), 20)
        img = draw_figure(bodies["person_0"], kp, IMAGE_SIZE, 20, rng)
        Image.fromarray(img).save(folder / "crowd.png")
        runner.table[runner.key(img)] = [person(kp), person(kp2)]
        lonely = root / "lonely"  # an identity with one usable photo is dropped
        lonely.mkdir()
        kp = pose_keypoints(bodies["person_2"], rng, (48, 48), 24)
        img = draw_figure(bodies["person_2"], kp, IMAGE_SIZE, 24, rng)
        Image.fromarray(img).save(lonely / "only.png")
        runner.table[runner.key(img)] = [person(kp)]
    return bodies


def stage1_raw(tmp: Path, data_root: Path, cache: Path, **training) -> dict:
    return {
        "stage": 1, "output_dir": str(tmp / "out"), "seed": 3,
        "model": {"latent_dim": 16, "crop_size": 32, "decoder_size": 16, "width": 8, "hidden": 64},
        "dataset": {"cache_dir": str(cache), "min_resolution": 64, "crop_size": 32, "max_context_views": 3,
                    "subsets": [{"root": str(data_root)}]},
        "training": {"max_steps": 6, "batch_size": 8, "learning_rate": 3e-3, "warmup_steps": 0,
                     "kl_warmup_steps": 0, "num_workers": 0, "report_to": "none", "checkpointing_steps": 1000,
                     **training},
    }


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A dataset with every kind of bad file, prepared once for the module."""
    tmp = tmp_path_factory.mktemp("stage1")
    runner = FakePoseRunner()
    bodies = make_dataset(tmp / "data", runner, extras=True)
    config = dataset_config_from_dict({"cache_dir": str(tmp / "cache"), "min_resolution": 64, "crop_size": 32,
                                       "subsets": [{"root": str(tmp / "data")}]})
    report = prepare_dataset(config, runner, crop_margin=1.15)
    return {"tmp": tmp, "runner": runner, "bodies": bodies, "config": config, "report": report}


# ----------------------------------------------------------------------------------------------- prepare


def test_prepare_reports_every_skipped_image_with_its_reason(prepared):
    report = prepared["report"]
    reasons = {Path(p).name: r for p, r in report.skipped}
    assert set(reasons) == {"corrupt.jpg", "tiny.png", "empty.png", "crowd.png"}
    assert reasons["corrupt.jpg"].startswith("unreadable")
    assert reasons["tiny.png"].startswith("too small (40x40")
    assert reasons["empty.png"] == "no person detected"
    assert reasons["crowd.png"].startswith("several people (2 detected")
    assert [Path(p).name for p, _ in report.dropped_identities] == ["lonely"]
    assert sorted(report.identities.values()) == [6] * 6
    saved = json.loads((Path(prepared["config"].cache_dir) / "prepare_report.json").read_text())
    assert len(saved["skipped"]) == 4


def test_prepare_cache_holds_crops_keypoints_captions_and_is_reused(prepared, caplog):
    caches = load_identity_caches(prepared["config"].cache_dir)
    assert len(caches) == 6
    c = next(c for c in caches if c.identity == "person_3")
    assert c.files == [f"{j:02d}.png" for j in range(6)]
    assert c.captions[2] == "a photo of person_3, view 2"
    assert read_safetensors_metadata(c.path)["crop_margin"] == "1.15"  # stage 2 checks it against its encoder
    assert c.keypoints.shape == (6, 17, 3) and c.keypoints[..., :2].min() >= 0 and c.keypoints[..., :2].max() <= 1
    # crop units keep the proportions of the drawn body (a square crop scales x and y alike)
    body = prepared["bodies"]["person_3"]
    props, _ = body_proportions_np(c.keypoints.numpy())
    expected = [body[k] for k in ("upper_arm", "forearm", "thigh", "shin", "shoulder", "hip")]
    np.testing.assert_allclose(props, np.tile(expected, (6, 1)), rtol=1e-4)
    np.testing.assert_allclose(c.proportions.numpy(), expected, rtol=1e-4)
    # a second prepare runs no pose model and still reports the skipped files
    runner = prepared["runner"]
    calls = runner.calls
    report = prepare_dataset(prepared["config"], runner, crop_margin=1.15)
    assert runner.calls == calls
    assert len(report.reused) == 6
    assert [Path(p).name for p, _ in report.dropped_identities] == ["lonely"]
    assert {Path(p).name for p, _ in report.skipped} == {"corrupt.jpg", "tiny.png", "empty.png", "crowd.png"}


def test_stage1_dataset_is_a_pure_function_of_seed_and_index(prepared):
    caches = load_identity_caches(prepared["config"].cache_dir)
    a = Stage1Dataset(caches, 100, max_context_views=3, seed=1)
    # b reads every crop from its file per sample (a large dataset); a keeps them in memory: the same items
    b = Stage1Dataset(caches, 100, max_context_views=3, seed=1, preload_bytes=0)
    assert a._preloaded is not None and b._preloaded is None
    for i in (0, 17, 99):
        x, y = a[i], b[i]
        assert all(torch.equal(x[k], y[k]) for k in x)
        assert 1 <= x["context_crops"].shape[0] <= 3
    batch = stage1_collate([a[i] for i in range(8)])
    v = batch["context_crops"].shape[1]
    counts = torch.tensor([a[i]["context_crops"].shape[0] for i in range(8)])
    assert torch.equal((batch["context_weights"] > 0).sum(1), counts)
    assert batch["context_keypoints"].shape == (8, v, 17, 3)


def test_missing_cache_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetCacheError, match="run the prepare step first"):
        load_identity_caches(tmp_path)


def test_damaged_index_is_a_clear_error_and_writes_are_atomic(tmp_path):
    atomic_write_text(tmp_path / "index.json", '{"identities": [')  # as a crash mid-write used to leave it
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"]  # no temporary file left behind
    with pytest.raises(DatasetCacheError, match=r"index\.json is damaged.*run prepare again"):
        load_identity_caches(tmp_path)


# ----------------------------------------------------------------------------------------------- training


def test_short_cpu_run_lowers_the_loss_and_exports_a_loadable_encoder(prepared, tmp_path):
    raw = stage1_raw(tmp_path, prepared["tmp"] / "data", Path(prepared["config"].cache_dir), max_steps=80,
                     batch_size=12, report_to="tensorboard", log_every=20)
    result = train_stage1(Stage1Config.from_dict(raw))
    losses = result["losses"]
    assert len(losses) == 80 and all(np.isfinite(losses))
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    assert last < 0.6 * first, (first, last)
    encoder, _ = load_body_encoder(result["export"])
    assert encoder.config.latent_dim == 16
    assert encoder_hash(encoder) == result["encoder_hash"]
    assert list((tmp_path / "out" / "logs").rglob("events.out.tfevents*")), "no tensorboard event file"
    # c_body holds identity: two disjoint halves of one identity's photos land closer than different identities
    means, names = [], []
    for cache in load_identity_caches(prepared["config"].cache_dir):
        with safe_open(str(cache.path), framework="pt") as f:
            crops = f.get_tensor("crops").permute(0, 3, 1, 2).float() / 255
        for half in (slice(0, 3), slice(3, 6)):
            with torch.no_grad():
                mu, _ = encoder.encode(crops[None, half], cache.keypoints[None, half], cache.weights[None, half])
            means.append(mu[0])
            names.append(cache.identity)
    dist = torch.cdist(torch.stack(means), torch.stack(means))
    same = torch.stack([dist[i, i + 1] for i in range(0, len(names), 2)]).mean()
    other = torch.stack([dist[i, j] for i in range(len(names)) for j in range(len(names)) if names[i] != names[j]])
    assert same < 0.5 * other.mean(), (float(same), float(other.mean()))


def test_resumed_run_follows_the_uninterrupted_trajectory(prepared, tmp_path):
    cache = Path(prepared["config"].cache_dir)
    data = prepared["tmp"] / "data"
    # uninterrupted: 6 steps, a checkpoint every 2 steps, only the newest 2 are kept
    full_raw = stage1_raw(tmp_path / "full", data, cache, checkpointing_steps=2, checkpoints_total_limit=2,
                          gradient_accumulation_steps=2, batch_size=4)
    full = train_stage1(Stage1Config.from_dict(full_raw))
    kept = [p.name for p in list_checkpoints(tmp_path / "full" / "out")]
    assert kept == ["checkpoint-00000004", "checkpoint-00000006"]

    raw = stage1_raw(tmp_path / "split", data, cache, checkpointing_steps=2, checkpoints_total_limit=2,
                     gradient_accumulation_steps=2, batch_size=4)
    seen: list[float] = []

    def crash_after_step_3(step: int, logs: dict) -> None:
        seen.append(logs["loss"])
        if step == 3:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        train_stage1(Stage1Config.from_dict(raw), on_step=crash_after_step_3)
    assert [p.name for p in list_checkpoints(tmp_path / "split" / "out")] == ["checkpoint-00000002"]
    resumed = train_stage1(Stage1Config.from_dict(raw), resume="latest")
    assert resumed["step"] == 6 and len(resumed["losses"]) == 4  # steps 3..6 again
    np.testing.assert_allclose(seen[:2] + resumed["losses"], full["losses"], rtol=1e-5, atol=1e-6)
    (a, _), (b, _) = load_body_encoder(full["export"]), load_body_encoder(resumed["export"])
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=k)


def test_train_py_runs_as_a_script(prepared, tmp_path):
    raw = stage1_raw(tmp_path, prepared["tmp"] / "data", Path(prepared["config"].cache_dir), max_steps=2,
                     mixed_precision="bf16")  # a fresh process, so accelerate's global state allows bf16 here
    lines = [f'stage = 1\noutput_dir = "{tmp_path / "out"}"\nseed = 1\n',
             "[model]\n" + "".join(f"{k} = {v}\n" for k, v in raw["model"].items()),
             f'[dataset]\ncache_dir = "{raw["dataset"]["cache_dir"]}"\nmin_resolution = 64\ncrop_size = 32\n',
             f'[[dataset.subsets]]\nroot = "{prepared["tmp"] / "data"}"\n',
             "[training]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in raw["training"].items())]
    config = tmp_path / "stage1.toml"
    config.write_text("\n".join(lines))
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "training" / "train.py"), "--config", str(config)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mixed precision bf16" in proc.stderr
    assert load_body_encoder(tmp_path / "out" / "body_encoder.safetensors")[0].config.hidden == 64


def test_train_py_rejects_unknown_stage_and_bad_keys(tmp_path):
    from training.train import main

    config = tmp_path / "bad.toml"
    config.write_text("stage = 7\n")
    assert main(["--config", str(config)]) == 2
    config.write_text('stage = 1\noutput_dir = "o"\n[dataset]\ncache_dir = "c"\nsubsets = [{root = "."}]\n'
                      "[training]\nlearning_rat = 1.0\n")
    with pytest.raises(BoLIDError, match="learning_rat"):
        Stage1Config.from_dict(__import__("tomllib").loads(config.read_text()), tmp_path)


def test_example_config_parses():
    from training.train import load_config, stage_module

    path = REPO_ROOT / "training" / "configs" / "stage1_example.toml"
    raw = load_config(path)
    assert stage_module(raw, str(path)).__name__ == "training.stage1"
    config = Stage1Config.from_dict(raw, path.parent)
    assert config.model.latent_dim == 128 and config.training.mixed_precision == "bf16"
    assert config.dataset.min_resolution == 1000 and config.prepare["pose_model"].endswith("yolo11n-pose.onnx")
