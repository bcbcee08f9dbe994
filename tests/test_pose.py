"""The ONNX pose runner against ultralytics' own predict, on a seeded random yolo11n-pose and real photos."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bolid.keypoints import PersonPose
from bolid.pose import (
    PoseModelError,
    PoseRunner,
    letterbox,
    nms,
    select_person,
    ultralytics_offline_env,
)

ultralytics_offline_env()  # before ultralytics is imported anywhere in this process

REPO = Path(__file__).resolve().parents[1]
CONF = 0.1  # the seeded model gives a few to a few dozen people per photo above this


def _photos() -> dict[str, np.ndarray]:
    """Real photos (RGB uint8) that ship inside installed packages."""
    import cv2
    import insightface
    import skimage.data
    import ultralytics

    assets = Path(ultralytics.__file__).parent / "assets"
    bgr = {
        "zidane": cv2.imread(str(assets / "zidane.jpg")),
        "bus": cv2.imread(str(assets / "bus.jpg")),
        "t1": cv2.imread(str(Path(insightface.__file__).parent / "data" / "images" / "t1.jpg")),
    }
    photos = {name: np.ascontiguousarray(img[..., ::-1]) for name, img in bgr.items()}
    photos["astronaut"] = skimage.data.astronaut()
    return photos


def build_seeded_pose_model(folder: Path, photos: list[np.ndarray]) -> Path:
    """yolo11n-pose (person class only) with random weights whose scores vary per image.

    Stock random init gives features ~1e-8 and identical scores (ties make a comparison meaningless), so the
    convolutions get unit-gain normal weights, batch norms are calibrated on the photos, and the class bias is -3.
    """
    import cv2
    import torch
    import ultralytics
    import yaml
    from ultralytics import YOLO

    cfg = yaml.safe_load((Path(ultralytics.__file__).parent / "cfg/models/11/yolo11-pose.yaml").read_text())
    cfg["nc"] = 1
    yaml_path = folder / "yolo11n-pose.yaml"  # the "n" in the file name selects the nano scale
    yaml_path.write_text(yaml.safe_dump(cfg))
    torch.manual_seed(0)
    model = YOLO(str(yaml_path))
    net = model.model
    for mod in net.modules():
        if isinstance(mod, torch.nn.Conv2d) and mod.weight.requires_grad:  # the DFL conv is fixed: keep it
            torch.nn.init.normal_(mod.weight, 0.0, 1.0 / mod.weight[0].numel() ** 0.5)
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.momentum = None
            mod.reset_running_stats()
    batch = np.stack([cv2.resize(p, (320, 320)) for p in photos]).transpose(0, 3, 1, 2)
    net.train()
    with torch.no_grad():
        net(torch.from_numpy(batch).float() / 255.0)
    net.eval()
    for seq in net.model[-1].cv3:
        torch.nn.init.constant_(seq[-1].bias, -3.0)
    weights = folder / "seeded-pose.pt"
    model.save(str(weights))
    return weights


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    return _photos()


@pytest.fixture(scope="session")
def pose_models(tmp_path_factory, photos):
    """The seeded .pt and its static (320) and dynamic ONNX exports, built once per session."""
    from bolid.pose import export_pose_onnx

    folder = tmp_path_factory.mktemp("pose")
    weights = build_seeded_pose_model(folder, list(photos.values()))
    static_dir, dynamic_dir = folder / "static", folder / "dynamic"
    static_dir.mkdir()
    dynamic_dir.mkdir()
    static = export_pose_onnx(weights, imgsz=320, output=static_dir / "pose-static.onnx")
    dynamic = export_pose_onnx(weights, imgsz=320, dynamic=True, output=dynamic_dir)
    return {"pt": weights, "static": static, "dynamic": dynamic}


def _ultralytics_poses(weights: Path, image_rgb: np.ndarray, imgsz: int, rect: bool) -> list[PersonPose]:
    from ultralytics import YOLO

    result = YOLO(str(weights)).predict(image_rgb[..., ::-1].copy(), imgsz=imgsz, conf=CONF, rect=rect,
                                        verbose=False, device="cpu")[0]
    boxes = result.boxes
    kpts = result.keypoints.data.cpu().numpy()
    return [PersonPose(box=boxes.xyxy[i].cpu().numpy(), score=float(boxes.conf[i]), keypoints=kpts[i])
            for i in range(len(boxes))]


def _assert_same(ours: list[PersonPose], theirs: list[PersonPose], what: str) -> None:
    """Every confident detection of one side has a twin on the other: box and keypoints within 1 px."""
    margin = 1e-3  # scores this close to the threshold may flip between torch and onnxruntime
    for a_side, b_side, label in ((ours, theirs, "ours->ultralytics"), (theirs, ours, "ultralytics->ours")):
        for a in a_side:
            if a.score < CONF + margin:
                continue
            dists = [max(np.abs(a.box - b.box).max(), np.abs(a.keypoints[:, :2] - b.keypoints[:, :2]).max())
                     for b in b_side]
            assert dists, f"{what} {label}: detection {a.box} (score {a.score:.4f}) has no counterpart"
            j = int(np.argmin(dists))
            assert dists[j] < 1.0, f"{what} {label}: nearest counterpart differs by {dists[j]:.3f} px"
            b = b_side[j]
            assert abs(a.score - b.score) < 1e-3
            assert np.abs(a.keypoints[:, 2] - b.keypoints[:, 2]).max() < 1e-3


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_matches_ultralytics_predict(pose_models, photos, kind):
    runner = PoseRunner(pose_models[kind], provider="CPU")
    assert runner.provider == "CPUExecutionProvider"
    assert runner.imgsz == (320, 320) and runner.dynamic == (kind == "dynamic")
    total = 0
    for name, image in photos.items():
        ours = runner.detect(image, conf=CONF)[0]
        # ultralytics pads a dynamic model's input only to a stride multiple ("rect"); a static one to 320x320
        theirs = _ultralytics_poses(pose_models["pt"], image, 320, rect=(kind == "dynamic"))
        assert len(theirs) >= 1, f"the seeded model found nobody in {name}: the comparison would be vacuous"
        assert abs(len(ours) - len(theirs)) <= 1, (name, len(ours), len(theirs))
        _assert_same(ours, theirs, f"{kind}/{name}")
        for pose in ours:  # original image coordinates
            h, w = image.shape[:2]
            assert 0 <= pose.box[0] <= pose.box[2] <= w and 0 <= pose.box[1] <= pose.box[3] <= h
        total += len(ours)
    assert total >= 10


def test_dynamic_model_runs_at_other_sizes(pose_models, photos):
    runner = PoseRunner(pose_models["dynamic"], provider="auto")
    image = photos["astronaut"]
    ours = runner.detect(image, conf=CONF, imgsz=416)[0]
    theirs = _ultralytics_poses(pose_models["pt"], image, 416, rect=True)
    assert theirs
    _assert_same(ours, theirs, "dynamic@416")


def test_static_model_refuses_other_sizes(pose_models, photos):
    runner = PoseRunner(pose_models["static"], provider="CPU")
    with pytest.raises(PoseModelError, match="fixed input"):
        runner.detect(photos["bus"], imgsz=640)


def test_batches_and_float_images_give_the_same_result(pose_models, photos):
    runner = PoseRunner(pose_models["dynamic"], provider="CPU")
    images = list(photos.values())
    one_by_one = [runner.detect(img, conf=CONF)[0] for img in images]
    batched = runner.detect(images + [images[0]], conf=CONF, batch_size=2)
    assert len(batched) == len(images) + 1
    for single, multi in zip(one_by_one + [one_by_one[0]], batched, strict=True):
        assert len(single) == len(multi)
        for a, b in zip(single, multi, strict=True):
            np.testing.assert_allclose(a.keypoints, b.keypoints, atol=0.01)  # batch kernels differ slightly
    as_float = runner.detect(images[2].astype(np.float32) / 255.0, conf=CONF)[0]
    assert len(as_float) == len(one_by_one[2])
    np.testing.assert_allclose(as_float[0].box, one_by_one[2][0].box, atol=1e-4)


def test_main_person_choice(pose_models, photos):
    runner = PoseRunner(pose_models["static"], provider="CPU")
    people = runner.detect(photos["zidane"], conf=CONF)[0]
    assert len(people) >= 2
    largest = runner.detect_main(photos["zidane"], conf=CONF, choice="largest")[0]
    confident = runner.detect_main(photos["zidane"], conf=CONF, choice="most_confident")[0]
    assert largest.area == max(p.area for p in people)
    assert confident.score == max(p.score for p in people)
    blank = np.zeros((200, 300, 3), np.uint8)
    assert runner.detect_main([blank], conf=0.999)[0] is None
    with pytest.raises(ValueError):
        select_person(people, "tallest")


def test_letterbox_and_nms_units():
    image = np.full((100, 200, 3), 255, np.uint8)
    out, box = letterbox(image, (320, 320), minimal=False)
    assert out.shape == (320, 320, 3) and box.pad_y == 80 and box.pad_x == 0
    assert out[0, 0, 0] == 114 and out[160, 160, 0] == 255
    out, box = letterbox(image, (320, 320), stride=32, minimal=True)
    assert out.shape == (160, 320, 3)
    mapped = box.to_original(np.array([[box.pad_x + 32.0, box.pad_y + 16.0]]), 200, 100)
    np.testing.assert_allclose(mapped, [[20.0, 10.0]], atol=1e-5)
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], np.float32)
    assert nms(boxes, np.array([0.9, 0.8, 0.7], np.float32), 0.5).tolist() == [0, 2]
    assert nms(boxes, np.array([0.7, 0.8, 0.9], np.float32), 0.5).tolist() == [2, 1]


def test_missing_or_wrong_model_is_a_clear_error(tmp_path):
    with pytest.raises(PoseModelError, match="not found"):
        PoseRunner(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(PoseModelError, match="cannot load"):
        PoseRunner(bad)


def test_cli_export_is_offline_and_leaves_home_alone(pose_models, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    weights = tmp_path / "w" / "model.pt"
    weights.parent.mkdir()
    shutil.copy(pose_models["pt"], weights)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOLO_", "MPLCONFIG"))}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), PYTHONPATH=str(REPO))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.run([sys.executable, "-m", "bolid.pose", "export", str(weights), "--imgsz", "256",
                           "--dynamic", "--output", str(out_dir)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    exported = out_dir / "model.onnx"
    assert exported.is_file()
    assert list(home.iterdir()) == [], f"export wrote into the home folder: {list(home.rglob('*'))}"
    runner = PoseRunner(exported, "CPU")
    assert runner.dynamic and runner.imgsz == (256, 256)
    assert runner.metadata["task"] == "pose" and "kpt_shape" in runner.metadata


def test_provider_choice(caplog):
    from bolid.onnx_providers import ProviderError, check_active_provider, resolve_providers

    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers("auto", gpu) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers("CPU", gpu) == ["CPUExecutionProvider"]
    assert resolve_providers("ROCm", ["MIGraphXExecutionProvider", "CPUExecutionProvider"])[0] == \
        "MIGraphXExecutionProvider"
    assert resolve_providers("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(ProviderError, match="'DirectML' is not available.*CPUExecutionProvider"):
        resolve_providers("DirectML", ["CPUExecutionProvider"])
    with pytest.raises(ProviderError, match="unknown"):
        resolve_providers("TPU", gpu)
    with caplog.at_level("WARNING", logger="bolid"):
        assert check_active_provider(["CPUExecutionProvider"], gpu[1:], "pose model") == "CPUExecutionProvider"
    assert "requested" in caplog.text


def test_import_ultralytics_keeps_pil_image_open(tmp_path):
    """ultralytics patches PIL.Image.open (pi-heif auto-install on unknown files); BoLID undoes it."""
    from PIL import Image, UnidentifiedImageError

    from bolid.pose import import_ultralytics

    import_ultralytics()
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not an image at all")
    with pytest.raises(UnidentifiedImageError):
        Image.open(corrupt)


def test_pt_checkpoints_are_noted_as_pickles_once(monkeypatch, caplog):
    import bolid.pose as pose

    monkeypatch.setattr(pose, "_PICKLE_NOTED", False)
    with caplog.at_level("WARNING", logger="bolid"):
        pose.note_pickle_checkpoint("model.yaml")  # not a pickle: nothing to say
        pose.note_pickle_checkpoint("yolo11n-pose.pt")
        pose.note_pickle_checkpoint("other.pt")
    notes = [r for r in caplog.records if "pickles" in r.getMessage()]
    assert len(notes) == 1 and "load only files you trust" in notes[0].getMessage()
    assert "yolo11n-pose.pt" in notes[0].getMessage()
