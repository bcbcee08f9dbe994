"""Perception nodes, loaded the way ComfyUI loads the pack, with a fake folder_paths pointing at tmp_path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

TESTS = Path(__file__).resolve().parent


def _helpers(name: str):
    """Model builders of the runner tests (test modules are not a package here)."""
    spec = importlib.util.spec_from_file_location(f"_bolid_{name}_helpers", TESTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def comfy_models(tmp_path_factory):
    """A ComfyUI-like models/ folder with a pose ONNX and an InsightFace pack."""
    models = tmp_path_factory.mktemp("models")
    pose_helpers, face_helpers = _helpers("test_pose"), _helpers("test_face")
    photos = pose_helpers._photos()
    work = tmp_path_factory.mktemp("pose_work")
    weights = pose_helpers.build_seeded_pose_model(work, list(photos.values()))
    from bolid.pose import export_pose_onnx

    (models / "bolid_pose").mkdir()
    export_pose_onnx(weights, imgsz=320, output=models / "bolid_pose" / "yolo11n-pose.onnx")
    face_helpers.build_tiny_pack(models / "insightface" / "models" / "tinypack")
    return {"dir": models, "photos": photos, "face_photo": face_helpers.face_photo}


@pytest.fixture
def nodes(pack, comfy_models, install_folder_paths):
    install_folder_paths(comfy_models["dir"])
    return pack.nodes.perception_nodes


def _as_image(*frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(frames).astype(np.float32) / 255.0)


def test_registered_with_display_names(pack):
    mappings, names = pack.NODE_CLASS_MAPPINGS, pack.NODE_DISPLAY_NAME_MAPPINGS
    expected = {"BoLIDLoadPoseModel": "Load Pose Model (BoLID)", "BoLIDLoadInsightFace": "Load InsightFace (BoLID)",
                "BoLIDDetectBodyPose": "Detect Body Pose (BoLID)", "BoLIDEncodeFace": "Encode Face (BoLID)"}
    for key, title in expected.items():
        cls = mappings[key]
        assert names[key] == title and cls.CATEGORY == "BoLID/perception"
        assert hasattr(cls, cls.FUNCTION) and len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)


def test_pose_nodes(nodes, comfy_models, pack, caplog):
    inputs = nodes.LoadPoseModel.INPUT_TYPES()["required"]
    assert inputs["model_name"][0] == ["yolo11n-pose.onnx"]
    assert "auto" in inputs["provider"][0] and "CUDA" in inputs["provider"][0]
    (model,) = nodes.LoadPoseModel().load("yolo11n-pose.onnx", "CPU")
    assert model.provider == "CPUExecutionProvider"
    zidane, bus = comfy_models["photos"]["zidane"], comfy_models["photos"]["bus"]
    bus = np.ascontiguousarray(bus[:zidane.shape[0], :zidane.shape[1]])  # an IMAGE batch shares one size
    bus = np.pad(bus, ((0, zidane.shape[0] - bus.shape[0]), (0, zidane.shape[1] - bus.shape[1]), (0, 0)))
    poses, preview = nodes.DetectBodyPose().detect(model, _as_image(zidane, bus), 0.1, "most_confident")
    assert len(poses) == 2 and all(isinstance(p, pack.bolid.keypoints.PersonPose) for p in poses)
    direct = model.detect(zidane, conf=0.1)[0]
    assert poses[0].score == max(p.score for p in direct)
    # every person found travels along (for Encode Body's several-people rule), with the image sizes
    assert len(poses.people[0]) == len(direct) and poses.sizes == [(zidane.shape[1], zidane.shape[0])] * 2
    assert len(preview) == 2 and preview[0].shape == (1, *zidane.shape) and preview[0].dtype == torch.float32
    assert 0.0 <= float(preview[0].min()) and float(preview[0].max()) <= 1.0
    assert not torch.equal(preview[0][0], _as_image(zidane)[0])  # something was drawn
    # a list of photos of different sizes (ComfyUI hands list nodes every input as a list): one set of poses
    photo_bus = comfy_models["photos"]["bus"]
    listed, previews = nodes.DetectBodyPose().detect([model], [_as_image(zidane), _as_image(photo_bus)], [0.1],
                                                     ["largest"])
    assert listed.sizes == [(zidane.shape[1], zidane.shape[0]), (photo_bus.shape[1], photo_bus.shape[0])]
    assert [tuple(p.shape) for p in previews] == [(1, *zidane.shape), (1, *photo_bus.shape)]
    # nobody above the threshold: None, and the preview is the image itself
    caplog.clear()
    poses, preview = nodes.DetectBodyPose().detect(model, _as_image(zidane), 1.0, "largest")
    assert poses == [None] and torch.equal(preview[0][0], _as_image(zidane)[0])
    assert "no person found in image 1 of 1" in caplog.text


def test_missing_pose_file_names_the_folders(nodes):
    with pytest.raises(FileNotFoundError, match="bolid_pose"):
        nodes.LoadPoseModel().load("nope.onnx", "auto")


def test_face_nodes(nodes, comfy_models, pack, caplog):
    assert nodes.LoadInsightFace.INPUT_TYPES()["required"]["model_name"][0][:3] == [
        "tinypack", "antelopev2", "buffalo_l"]
    (analyzer,) = nodes.LoadInsightFace().load("tinypack", "CPU")
    face_photo = comfy_models["face_photo"]
    a = face_photo((256, 256), (60, 60, 120), seed=7)
    b = face_photo((256, 256), (30, 80, 140), seed=8)
    blank = np.zeros_like(a)
    (embeds,) = nodes.EncodeFace().encode(analyzer, _as_image(a, b), "error")
    assert isinstance(embeds, pack.bolid.identity.FaceEmbeds) and embeds.num_images == 2
    expected = analyzer.embed([a, b]).embedding
    torch.testing.assert_close(embeds.embedding, expected, atol=1e-5, rtol=0)
    with pytest.raises(pack.bolid.face.NoFaceError, match="image 2 of 3"):
        nodes.EncodeFace().encode(analyzer, _as_image(a, blank, b), "error")
    caplog.clear()
    (skipped,) = nodes.EncodeFace().encode(analyzer, _as_image(a, blank, b), "skip")
    assert "no face found in image 2 of 3" in caplog.text
    assert skipped.num_images == 2
    torch.testing.assert_close(skipped.embedding, expected, atol=1e-5, rtol=0)
    # a list of photos of different sizes (Load Images From Folder): each is used whole
    tall = face_photo((320, 200), (40, 90, 110), seed=9)
    (listed,) = nodes.EncodeFace().encode([analyzer], [_as_image(a), _as_image(tall)], ["error"])
    torch.testing.assert_close(listed.embedding, analyzer.embed([a, tall]).embedding, atol=1e-5, rtol=0)
    assert listed.num_images == 2
    # per-photo weights: weight 0 leaves a photo out of the average
    (only_a,) = nodes.EncodeFace().encode([analyzer], [_as_image(a), _as_image(tall)], ["error"], ["1, 0"])
    torch.testing.assert_close(only_a.embedding, analyzer.embed([a]).embedding, atol=1e-5, rtol=0)


def test_missing_insightface_pack_is_clear(nodes, comfy_models):
    with pytest.raises(Exception, match=r"insightface/models/antelopev2.*does not download"):
        nodes.LoadInsightFace().load("antelopev2", "auto")


def test_unavailable_provider_is_an_error_not_a_silent_fallback(nodes):
    with pytest.raises(Exception, match="'CUDA' is not available"):
        nodes.LoadPoseModel().load("yolo11n-pose.onnx", "CUDA")
