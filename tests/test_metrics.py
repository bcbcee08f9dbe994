"""Metrics against known answers: proportion errors, cosine, CLIPScore, FID (closed form and ~0 for identical
sets, with a custom extractor and with a kaiming-init InceptionV3 from a local file), IS, missing-file errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bolid.metrics import (
    MetricModelError,
    OpenCLIPScorer,
    body_consistency,
    clip_t_score,
    face_similarity,
    fid_from_features,
    fid_score,
    frechet_distance,
    inception_score,
    load_inception,
    reference_proportions,
)
from bolid.proportions import PROPORTION_NAMES, body_proportions_np
from bolid.synthetic import make_identity, render_photo


def _keypoints_with(props: dict[str, float], scale: float = 40.0, offset=(50.0, 60.0)) -> np.ndarray:
    """A front-view T-pose whose proportions are exactly ``props`` (torso units), in pixels."""
    kp = np.zeros((17, 3))
    hip = np.array([0.0, 0.0])
    sh = np.array([0.0, -1.0])
    kp[5, :2], kp[6, :2] = sh + [props["shoulder_width"] / 2, 0], sh - [props["shoulder_width"] / 2, 0]
    kp[11, :2], kp[12, :2] = hip + [props["hip_width"] / 2, 0], hip - [props["hip_width"] / 2, 0]
    for s, (a, b, c) in ((1, (5, 7, 9)), (-1, (6, 8, 10))):
        kp[b, :2] = kp[a, :2] + [s * props["upper_arm"], 0]
        kp[c, :2] = kp[b, :2] + [s * props["forearm"], 0]
    for a, b, c in ((11, 13, 15), (12, 14, 16)):
        kp[b, :2] = kp[a, :2] + [0, props["thigh"]]
        kp[c, :2] = kp[b, :2] + [0, props["shin"]]
    kp[:5, :2] = sh + [0, -0.4]
    kp[:, :2] = kp[:, :2] * scale + offset
    kp[:, 2] = 1.0
    return kp


BASE = {"upper_arm": 0.5, "forearm": 0.4, "thigh": 0.6, "shin": 0.55, "shoulder_width": 0.7, "hip_width": 0.45}


def test_body_consistency_zero_for_the_same_body_at_any_scale_and_position():
    ref, ref_c = reference_proportions(np.stack([_keypoints_with(BASE), _keypoints_with(BASE, 10.0, (3, 4))]))
    assert np.allclose(ref, [BASE[n] for n in PROPORTION_NAMES])
    gen = np.stack([_keypoints_with(BASE, s, (s, 2 * s)) for s in (5.0, 17.0, 80.0)])
    res = body_consistency(gen, ref, ref_c)
    assert np.allclose(res.errors, 0.0, atol=1e-6) and res.detected == 1.0


def test_body_consistency_gives_the_known_error():
    ref = np.array([BASE[n] for n in PROPORTION_NAMES])
    # one proportion off by 0.12: RMS over six equally weighted entries = 0.12 / sqrt(6)
    gen = _keypoints_with({**BASE, "thigh": BASE["thigh"] + 0.12})
    assert body_consistency(gen, ref).errors[0] == pytest.approx(0.12 / np.sqrt(6), rel=1e-6)
    # every proportion scaled by 1.1: RMS = 0.1 * ||ref|| / sqrt(6)
    gen = _keypoints_with({k: 1.1 * v for k, v in BASE.items()})
    expected = 0.1 * np.linalg.norm(ref) / np.sqrt(6)
    assert body_consistency(gen, ref).errors[0] == pytest.approx(expected, rel=1e-6)
    # a hidden joint removes its proportions from the weights: only the thigh error remains visible
    gen = _keypoints_with({**BASE, "thigh": BASE["thigh"] + 0.12, "forearm": BASE["forearm"] + 0.3})
    gen[[9, 10], 2] = 0.0  # wrists unseen -> forearm has confidence 0
    assert body_consistency(gen, ref).errors[0] == pytest.approx(0.12 / np.sqrt(5), rel=1e-6)


def test_body_consistency_flags_images_without_a_body():
    ref = np.array([BASE[n] for n in PROPORTION_NAMES])
    kp = np.stack([_keypoints_with(BASE), _keypoints_with(BASE)])
    kp[1, :, 2] = 0.0
    res = body_consistency(kp, ref)
    assert res.errors[0] == pytest.approx(0.0, abs=1e-9) and np.isnan(res.errors[1])
    assert res.detected == 0.5 and res.mean == pytest.approx(0.0, abs=1e-9)


def test_body_consistency_on_rendered_people_separates_identities():
    a, b = make_identity(5, 0), make_identity(5, 1)
    front = {"view": "front view"}
    ref_a, _ = reference_proportions(np.stack([render_photo(a, s, attributes=front).keypoints for s in range(3)]))
    same = np.stack([render_photo(a, s, attributes=front).keypoints for s in range(10, 14)])
    other = np.stack([render_photo(b, s, attributes=front).keypoints for s in range(10, 14)])
    assert body_consistency(same, ref_a).mean < 1e-3
    truth = np.sqrt(np.mean((b.proportion_vector() - a.proportion_vector()) ** 2))
    assert body_consistency(other, ref_a).mean == pytest.approx(truth, rel=1e-3)
    assert np.allclose(body_proportions_np(same[0])[0], a.proportion_vector(), atol=1e-3)


def test_face_similarity_cosines_and_missing_faces():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=512)
    orth = rng.normal(size=512)
    orth -= orth @ ref / (ref @ ref) * ref
    res = face_similarity([ref * 3.0, -ref, orth, None], ref)
    assert np.allclose(res.similarities[:3], [1.0, -1.0, 0.0], atol=1e-9) and np.isnan(res.similarities[3])
    assert res.detected == 0.75 and res.mean == pytest.approx(0.0, abs=1e-9)


def test_clip_t_score_convention():
    img = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    txt = np.array([[2.0, 0.0], [1.0, 0.0], [0.0, -1.0]])
    assert np.allclose(clip_t_score(img, txt), [100.0, 100.0 / np.sqrt(2), 0.0])


def test_openclip_scorer_names_the_missing_file(tmp_path):
    with pytest.raises(MetricModelError, match="CLIP weights not found: .*nope.safetensors"):
        OpenCLIPScorer("ViT-B-32", tmp_path / "nope.safetensors")


class MeanColour(nn.Module):
    """A custom FID feature extractor: the mean colour of each image (3 features)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean((2, 3))


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4000, 3))
    b = a + np.array([3.0, 0.0, 4.0])  # same covariance, mean shifted by 5
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-8)
    assert fid_from_features(a, b) == pytest.approx(25.0, rel=1e-9)
    # 1-D Gaussians: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance(np.array([0.0]), np.array([[4.0]]), np.array([1.0]), np.array([[9.0]])) == \
        pytest.approx(1.0 + 1.0)


def test_fid_with_a_custom_extractor_identical_sets_and_known_shift():
    rng = np.random.default_rng(2)
    real = rng.integers(0, 200, size=(64, 16, 16, 3), dtype=np.uint8)
    assert fid_score(real, real, feature_extractor=MeanColour()) == pytest.approx(0.0, abs=1e-3)
    shifted = real + np.uint8(10)  # every mean colour +10 in all 3 channels -> FID = 3 * 10^2
    assert fid_score(real, shifted, feature_extractor=MeanColour()) == pytest.approx(300.0, rel=1e-3)


class OneHotLogits(nn.Module):
    """Class = the brightest channel; sharp logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 50.0 * nn.functional.one_hot(x.float().mean((2, 3)).argmax(1), 3).float()


def test_inception_score_known_answers_with_a_custom_classifier():
    imgs = np.zeros((30, 8, 8, 3), dtype=np.uint8)
    for i in range(30):
        imgs[i, :, :, i % 3] = 200
    mean, _ = inception_score(imgs, logits_extractor=OneHotLogits())
    assert mean == pytest.approx(3.0, rel=1e-3)  # confident and uniform over 3 classes
    one_class = np.zeros((30, 8, 8, 3), dtype=np.uint8)
    one_class[..., 0] = 200
    assert inception_score(one_class, logits_extractor=OneHotLogits())[0] == pytest.approx(1.0, rel=1e-3)


def test_missing_inception_weights_name_the_file(tmp_path):
    missing = tmp_path / "weights" / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(MetricModelError, match="Inception weights not found: .*pt_inception-2015-12-05"):
        load_inception(missing)
    with pytest.raises(MetricModelError, match="Inception weights not found"):
        fid_score(np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 8, 8, 3), np.uint8), weights_path=missing)
    with pytest.raises(MetricModelError, match="Inception weights not found: None"):
        inception_score(np.zeros((2, 8, 8, 3), np.uint8))


@pytest.fixture(scope="module")
def kaiming_inception_file(tmp_path_factory):
    """torch-fidelity's InceptionV3 with kaiming-normal convs, saved locally (no download)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    # build the architecture without any weights file: skip the two loading calls of its constructor
    original_load_sd, original_load = fe.FeatureExtractorInceptionV3.load_state_dict, torch.load
    fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, *a, **k: None
    torch.load = lambda *a, **k: {}
    try:
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["64"], feature_extractor_weights_path="unused")
    finally:
        fe.FeatureExtractorInceptionV3.load_state_dict, torch.load = original_load_sd, original_load
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    return path


def test_fid_with_a_kaiming_inception_from_a_local_file(kaiming_inception_file, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download Inception weights")

    monkeypatch.setattr(fe, "load_state_dict_from_url", no_download)
    extractor = load_inception(kaiming_inception_file, feature="64")
    photos = [render_photo(make_identity(0, i), i, size=32).image for i in range(6)]
    real = np.stack(photos)
    assert fid_score(real, real, feature_extractor=extractor) == pytest.approx(0.0, abs=1e-2)
    noise = np.random.default_rng(0).integers(0, 255, size=real.shape, dtype=np.uint8)
    assert fid_score(real, noise, feature_extractor=extractor) > 1.0


def test_evaluate_cli_writes_tables_and_plots(tmp_path, monkeypatch):
    """python -m training.evaluate on a manifest; the pose model is replaced by the renderer's exact keypoints."""
    import hashlib
    import json

    from PIL import Image

    import training.evaluate as ev

    table: dict[str, np.ndarray] = {}

    def save(photo, name: str) -> str:
        Image.fromarray(photo.image).save(tmp_path / name)
        table[hashlib.sha256(photo.image.tobytes()).hexdigest()] = photo.keypoints
        return name

    a, b = make_identity(9, 0), make_identity(9, 1)
    front = {"view": "front view"}
    refs = [save(render_photo(a, s, attributes=front), f"ref{s}.png") for s in range(3)]
    same = [save(render_photo(a, s, attributes=front), f"same{s}.png") for s in range(10, 13)]
    other = [save(render_photo(b, s, attributes=front), f"other{s}.png") for s in range(10, 13)]
    manifest = {"references": {"a": refs},
                "conditions": {"same person": [{"image": p, "identity": "a", "caption": "x"} for p in same],
                               "another person": [{"image": p, "identity": "a", "caption": "x"} for p in other]}}
    (tmp_path / "m.json").write_text(json.dumps(manifest))

    def fake_pose(path: str, provider: str):
        return lambda images: np.stack([table[hashlib.sha256(np.ascontiguousarray(im).tobytes()).hexdigest()]
                                        for im in images])

    monkeypatch.setattr(ev, "_yolo_keypoints", fake_pose)
    assert ev.main(["--manifest", str(tmp_path / "m.json"), "--pose-model", "fake.onnx",
                    "--out", str(tmp_path / "out")]) == 0
    rows = {r["condition"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())["rows"]}
    assert rows["same person"]["body_error"] < 1e-3
    truth = np.sqrt(np.mean((b.proportion_vector() - a.proportion_vector()) ** 2))
    assert rows["another person"]["body_error"] == pytest.approx(truth, rel=1e-3)
    for name in ("results.md", "results.csv", "results_body_error.png"):
        assert (tmp_path / "out" / name).is_file()
    assert "| same person |" in (tmp_path / "out" / "results.md").read_text()
