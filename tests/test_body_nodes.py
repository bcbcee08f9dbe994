"""Body identity nodes with a stand-in folder_paths and a fake pose model (hand-made PersonPose values)."""

from __future__ import annotations

import hashlib
import sys
import types

import numpy as np
import pytest
import torch

from bolid.keypoints import PersonPose  # a plain record: the pack's code reads it by duck typing

TINY = {"latent_dim": 8, "crop_size": 16, "decoder_size": 8, "width": 4, "hidden": 16}
NODE_IDS = ("BoLIDLoadBodyEncoder", "BoLIDEncodeBodyFromImages", "BoLIDSaveBodyID", "BoLIDLoadBodyID",
            "BoLIDSampleBodyID", "BoLIDBlendBodyIDs")


@pytest.fixture
def folders(tmp_path, install_folder_paths):
    """The stand-in folder_paths rooted at tmp_path/models."""
    install_folder_paths(tmp_path / "models")
    for sub in ("bolid", "bolid_body_ids"):
        (tmp_path / "models" / sub).mkdir(parents=True)
    return tmp_path / "models"


@pytest.fixture
def nodes(pack):
    return pack.nodes.body_nodes


@pytest.fixture
def be(pack):
    """The pack's own bolid.body_encoder (classes must come from the package the nodes use)."""
    return pack.bolid.body_encoder


@pytest.fixture
def beio(pack):
    """The pack's own Body-ID encoder file module."""
    return pack.bolid.body_encoder_io


@pytest.fixture
def encode_error(pack):
    return pack.bolid.body_encode.BodyEncodeError


@pytest.fixture
def batch(pack):
    """nodes/comfy_batch.py: the IMAGE conversion, progress and cancellation helpers all node modules use."""
    return pack.nodes.comfy_batch


@pytest.fixture
def ids(pack):
    return pack.bolid.body_id_io


@pytest.fixture
def encoder(be):
    torch.manual_seed(0)
    return be.BodyEncoder(be.BodyEncoderConfig(**TINY)).eval()


@pytest.fixture
def loaded(nodes, encoder, beio):
    """What Load Body-ID Encoder hands on: the encoder with its hash."""
    return nodes.LoadedBodyEncoder(model=encoder, hash=beio.encoder_hash(encoder), name="tiny.safetensors")


def standing_person(x0: float = 40.0, scale: float = 1.0, conf: float = 0.9) -> PersonPose:
    kp = np.zeros((17, 3), dtype=np.float32)
    pts = {0: (30, 10), 5: (40, 25), 6: (20, 25), 7: (44, 40), 8: (16, 40), 9: (46, 55), 10: (14, 55),
           11: (36, 60), 12: (24, 60), 13: (37, 80), 14: (23, 80), 15: (37, 98), 16: (23, 98)}
    for i, (x, y) in pts.items():
        kp[i] = (x0 - 30 + x * scale, y * scale, conf)
    lo, hi = kp[:, :2].min(0) - 4, kp[:, :2].max(0) + 4
    return PersonPose(box=np.concatenate([lo, hi]), score=0.9, keypoints=kp)


class FakePoseModel:
    """Answers with hand-made poses per image content, like bolid.pose.PoseRunner.detect."""

    def __init__(self) -> None:
        self.table: dict[str, list[PersonPose]] = {}

    def add(self, image: torch.Tensor, people: list[PersonPose]) -> None:
        self.table[self._key((image.numpy() * 255).round().astype(np.uint8))] = people

    @staticmethod
    def _key(image: np.ndarray) -> str:
        return hashlib.sha256(np.ascontiguousarray(image[..., :3]).tobytes()).hexdigest()

    def detect(self, images):
        return [self.table.get(self._key(im), []) for im in images]


def comfy_images(n: int, h: int = 110, w: int = 90) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    return (torch.rand(n, h, w, 3, generator=g) * 255).round() / 255


def test_nodes_are_registered_with_prefix_and_category(pack, folders):
    for node_id in NODE_IDS:
        cls = pack.NODE_CLASS_MAPPINGS[node_id]
        assert cls.CATEGORY == "BoLID/body" and node_id in pack.NODE_DISPLAY_NAME_MAPPINGS
        assert callable(getattr(cls(), cls.FUNCTION))
        inputs = cls.INPUT_TYPES()["required"]
        assert inputs
    assert pack.NODE_CLASS_MAPPINGS["BoLIDEncodeBodyFromImages"].RETURN_TYPES == ("BOLID_BODY_ID", "IMAGE")


def test_load_body_encoder_node(nodes, folders, encoder, beio):
    beio.save_body_encoder(encoder, folders / "bolid" / "enc.safetensors")
    (folders / "bolid" / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert nodes.LoadBodyEncoder.INPUT_TYPES()["required"]["encoder_name"][0] == ["broken.safetensors",
                                                                                  "enc.safetensors"]
    (loaded,) = nodes.LoadBodyEncoder().load("enc.safetensors")
    assert isinstance(loaded, nodes.LoadedBodyEncoder) and loaded.name == "enc.safetensors"
    assert loaded.model.config == encoder.config and not loaded.model.training and loaded.latent_dim == 8
    assert loaded.hash == beio.encoder_hash(encoder) == beio.encoder_hash(loaded.model)
    with pytest.raises(beio.BodyEncoderFileError, match="broken.safetensors"):
        nodes.LoadBodyEncoder().load("broken.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        nodes.LoadBodyEncoder().load("missing.safetensors")


def test_encode_body_from_images(nodes, loaded, caplog):
    images = comfy_images(4)
    pose = FakePoseModel()
    pose.add(images[0], [standing_person()])
    pose.add(images[2], [standing_person(45, 1.0, 0.8), standing_person(20, 0.4)])  # a small bystander
    pose.add(images[3], [standing_person(conf=0.1)])  # body barely visible
    # image 2 of 4: nobody
    body_id, preview = nodes.EncodeBodyFromImages().encode(loaded, pose, images, 0.3)
    assert body_id.views == ("image 1 of 4", "image 3 of 4") and body_id.view_weights == pytest.approx((0.9, 0.8))
    assert body_id.dim == 8 and torch.isfinite(body_id.c_body).all()
    assert preview.shape == (2, 192, 192, 3) and 0 <= preview.min() and preview.max() <= 1
    log = caplog.text
    assert "image 2 of 4: no person detected" in log and "image 4 of 4: body keypoint confidence 0.10" in log
    # the one several-people rule (bolid.keypoints.choose_person, also the dataset's): a small bystander is
    # ignored, a second person of >= 0.3x the main box area makes "skip the image" skip the photo
    skip, _ = nodes.EncodeBodyFromImages().encode(loaded, pose, images, 0.3, "skip the image")
    assert skip.views == ("image 1 of 4", "image 3 of 4")
    pose.add(images[2], [standing_person(45, 1.0, 0.8), standing_person(20, 0.8)])
    skip, _ = nodes.EncodeBodyFromImages().encode(loaded, pose, images, 0.3, "skip the image")
    assert skip.views == ("image 1 of 4",)
    assert "skipped image 3 of 4: several people (2 detected" in caplog.text
    pose.add(images[2], [standing_person(45, 1.0, 0.8), standing_person(20, 0.4)])
    # the identity does not depend on the order of the photos
    again, _ = nodes.EncodeBodyFromImages().encode(loaded, pose, images[[2, 1, 0]], 0.3)
    torch.testing.assert_close(again.c_body, body_id.c_body, rtol=1e-5, atol=1e-6)


def test_encode_errors(nodes, loaded, encode_error, batch):
    images = comfy_images(2)
    with pytest.raises(encode_error, match=r"image 1 of 2: no person detected; image 2 of 2: no person detected"):
        nodes.EncodeBodyFromImages().encode(loaded, FakePoseModel(), images, 0.3)
    with pytest.raises(batch.ImageBatchError, match="non-empty IMAGE batch"):
        nodes.EncodeBodyFromImages().encode(loaded, FakePoseModel(), images[:0], 0.3)


def test_save_and_load_body_id_nodes_share_one_folder(nodes, folders, ids):
    bid = ids.sample_body_id(8, seed=4, encoder_hash="h1")
    (name,) = nodes.SaveBodyID().save(bid, "alice", False)
    assert name == "alice.safetensors" and (folders / "bolid_body_ids" / name).is_file()
    assert nodes.LoadBodyID.INPUT_TYPES()["required"]["body_id_name"][0] == ["alice.safetensors"]
    (loaded,) = nodes.LoadBodyID().load("alice.safetensors")
    assert torch.equal(loaded.c_body, bid.c_body) and loaded.encoder_hash == "h1"
    before = nodes.LoadBodyID.IS_CHANGED("alice.safetensors")
    with pytest.raises(ids.BodyIDFileError, match="already exists"):
        nodes.SaveBodyID().save(ids.sample_body_id(8, seed=5), "alice", False)
    nodes.SaveBodyID().save(ids.sample_body_id(8, seed=5), "alice", True)
    assert nodes.LoadBodyID.IS_CHANGED("alice.safetensors") != before
    assert torch.equal(nodes.LoadBodyID().load("alice.safetensors")[0].c_body, ids.sample_body_id(8, seed=5).c_body)
    for bad in ("../escape", "sub/dir", "/tmp/abs"):
        with pytest.raises(ids.BodyIDFileError):
            nodes.SaveBodyID().save(bid, bad, True)
    assert not (folders / "escape.safetensors").exists()


def test_sample_and_blend_nodes(nodes, loaded, ids):
    (a,) = nodes.SampleBodyID().sample(loaded, 7, 1.0)
    (a2,) = nodes.SampleBodyID().sample(loaded, 7, 1.0)
    (b,) = nodes.SampleBodyID().sample(loaded, 8, 0.5)
    assert a.dim == 8 and torch.equal(a.c_body, a2.c_body) and a.encoder_hash and a.encoder_hash == b.encoder_hash
    (mid,) = nodes.BlendBodyIDs().blend(a, b, 0.25, "linear")
    torch.testing.assert_close(mid.c_body, 0.75 * a.c_body + 0.25 * b.c_body)
    with pytest.raises(ids.BodyIDMismatchError):
        nodes.BlendBodyIDs().blend(a, ids.sample_body_id(16, 1), 0.5, "slerp")


def test_image_batch_to_uint8(batch):
    rgb = torch.tensor([[[[0.0, 0.5, 1.0], [-1.0, 2.0, 0.2]]]])  # [1, 1, 2, 3]
    (out,) = batch.image_batch_to_uint8(rgb)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 3) and out.flags.c_contiguous
    assert out.tolist() == [[[0, 128, 255], [0, 255, 51]]]
    (single,) = batch.image_batch_to_uint8(rgb[0])  # one [H, W, C] image
    assert np.array_equal(single, out)
    (grey,) = batch.image_batch_to_uint8(rgb[..., :1])
    assert grey.shape == (1, 2, 3) and grey[..., 0].tolist() == grey[..., 2].tolist() == [[0, 0]]
    (rgba,) = batch.image_batch_to_uint8(torch.cat([rgb, torch.ones(1, 1, 2, 1)], dim=-1))
    assert np.array_equal(rgba, out)
    assert len(batch.image_batch_to_uint8(torch.zeros(3, 4, 5, 3))) == 3
    for bad in (torch.zeros(0, 4, 4, 3), torch.zeros(1, 4, 4, 2), torch.zeros(4, 4), np.zeros((1, 4, 4, 3))):
        with pytest.raises(batch.ImageBatchError, match="non-empty IMAGE batch"):
            batch.image_batch_to_uint8(bad)


def test_progress_and_cancellation_use_comfyui_when_present(batch, monkeypatch):
    calls: list[tuple[int, int]] = []
    state = {"cancelled": False}

    class Bar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None):
            calls.append((value, total))

    class FakeInterruptError(Exception):
        pass

    def throw():
        if state["cancelled"]:
            raise FakeInterruptError

    utils, mm = types.ModuleType("comfy.utils"), types.ModuleType("comfy.model_management")
    utils.ProgressBar, mm.throw_exception_if_processing_interrupted = Bar, throw
    monkeypatch.setitem(sys.modules, "comfy", sys.modules.get("comfy", types.ModuleType("comfy")))
    monkeypatch.setitem(sys.modules, "comfy.utils", utils)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    step = batch.batch_progress(3)
    step(1)
    step(3)
    assert calls == [(1, 3), (3, 3)]
    batch.check_interrupted()
    state["cancelled"] = True
    with pytest.raises(FakeInterruptError):
        batch.check_interrupted()
    with pytest.raises(FakeInterruptError):
        step(2)
    assert calls == [(1, 3), (3, 3)]


def test_pose_detection_reports_progress_per_chunk(nodes, batch, monkeypatch):
    done: list[int] = []
    monkeypatch.setattr(nodes, "batch_progress", lambda total: done.append)
    images = [np.full((4, 4, 3), i, np.uint8) for i in range(nodes.POSE_CHUNK + 3)]
    assert nodes._detect(FakePoseModel(), images) == [[] for _ in images]
    assert done == [nodes.POSE_CHUNK, nodes.POSE_CHUNK + 3]


def test_image_names_are_one_based(batch):
    assert batch.image_names(3) == ["image 1 of 3", "image 2 of 3", "image 3 of 3"]
    assert batch.image_name(0, 1) == "image 1 of 1"


def test_encoder_hash_is_computed_once_at_load(pack, nodes, folders, encoder, beio, monkeypatch):
    beio.save_body_encoder(encoder, folders / "bolid" / "enc.safetensors")
    calls = []
    real = beio.encoder_hash
    for module in (beio, pack.bolid.body_encode):  # the loader and Encode Body's fallback
        monkeypatch.setattr(module, "encoder_hash", lambda model: calls.append(model) or real(model))
    (loaded,) = nodes.LoadBodyEncoder().load("enc.safetensors")
    assert len(calls) == 1  # verifying the stored hash and carrying it are one computation
    images = comfy_images(2)
    pose = FakePoseModel()
    pose.add(images[0], [standing_person()])
    body_id, _ = nodes.EncodeBodyFromImages().encode(loaded, pose, images, 0.3)
    (sampled,) = nodes.SampleBodyID().sample(loaded, 3, 1.0)
    assert len(calls) == 1 and body_id.encoder_hash == sampled.encoder_hash == loaded.hash
    with pytest.raises(TypeError, match="Load Body-ID Encoder"):
        nodes.SampleBodyID().sample(loaded.model, 3, 1.0)


def _full_body(w: int, h: int) -> PersonPose:
    """A person filling the photo from the top edge (head) to the bottom edge (feet)."""
    kp = np.zeros((17, 3), dtype=np.float32)
    ys = {0: 0.02, 1: 0.02, 2: 0.02, 3: 0.03, 4: 0.03, 5: 0.2, 6: 0.2, 7: 0.35, 8: 0.35, 9: 0.5, 10: 0.5,
          11: 0.55, 12: 0.55, 13: 0.77, 14: 0.77, 15: 0.98, 16: 0.98}
    for i, y in ys.items():
        side = -1 if i % 2 else 1
        kp[i] = (w / 2 + side * 0.08 * min(w, h) * (i > 2), y * h, 0.9)
    return PersonPose(box=np.array([kp[:, 0].min() - 2, 0.0, kp[:, 0].max() + 2, h - 1.0]), score=0.9, keypoints=kp)


def test_photo_set_of_any_size_uses_each_whole_photo(pack, nodes, loaded, tmp_path, monkeypatch, install_folder_paths):
    """A portrait and a landscape photo, loaded from a folder under input/ and handed on as a list: the pose
    model and the encoder see each full photo (no resize, no crop), and both full bodies (head at the top edge,
    feet at the bottom edge) are inside the views the identity is encoded from."""
    from PIL import Image

    image_nodes = pack.nodes.image_nodes
    rng = np.random.default_rng(0)
    photos = {"a_portrait.png": rng.integers(0, 256, (160, 90, 3), dtype=np.uint8),
              "b_landscape.png": rng.integers(0, 256, (90, 170, 3), dtype=np.uint8)}
    folder = tmp_path / "input" / "me"
    folder.mkdir(parents=True)
    for name, arr in photos.items():
        Image.fromarray(arr).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    install_folder_paths(tmp_path / "models", input_dir=tmp_path / "input")
    assert image_nodes.LoadImagesFromFolder.INPUT_TYPES()["required"]["folder"][0] == ["me"]
    images, names = image_nodes.LoadImagesFromFolder().load("me")
    assert names == list(photos)
    assert [tuple(im.shape) for im in images] == [(1, 160, 90, 3), (1, 90, 170, 3)]

    seen: list[tuple[int, ...]] = []

    class Recorder:
        def detect(self, arrays):
            seen.extend(a.shape for a in arrays)
            return [[_full_body(a.shape[1], a.shape[0])] for a in arrays]

    captured = {}
    real = nodes.encode_body

    def spy(encoder, arrays, poses, *args, **kwargs):
        result = real(encoder, arrays, poses, *args, **kwargs)
        captured.update(arrays=arrays, poses=poses, result=result)
        return result

    monkeypatch.setattr(nodes, "encode_body", spy)
    body_id, _ = nodes.EncodeBodyFromImages().encode([loaded], [Recorder()], images, [0.3], ["use the largest"])
    assert seen == [(160, 90, 3), (90, 170, 3)]
    assert len(body_id.views) == 2
    for arr, original, pose, crop in zip(captured["arrays"], photos.values(), captured["poses"],
                                         captured["result"].crops, strict=True):
        assert np.array_equal(arr, original)  # the whole photo, pixel for pixel
        expected, kp = pack.bolid.body_views.crop_person(original, pose, crop.shape[0], loaded.model.config.crop_margin)
        assert np.array_equal(crop, expected)
        assert kp[:, :2].min() > 0.0 and kp[:, :2].max() < 1.0  # head and feet inside the view
        assert kp[0, 1] < 0.15 and kp[15, 1] > 0.85  # ... and the body spans the view
    with pytest.raises(image_nodes.ImageFolderError, match="sub-folder"):
        image_nodes.LoadImagesFromFolder().load("../outside")
    assert "sub-folder" in image_nodes.LoadImagesFromFolder.VALIDATE_INPUTS("..")
    assert image_nodes.LoadImagesFromFolder.VALIDATE_INPUTS("me") is True
    before = image_nodes.LoadImagesFromFolder.IS_CHANGED("me")
    Image.fromarray(photos["a_portrait.png"]).save(folder / "c_more.png")
    assert image_nodes.LoadImagesFromFolder.IS_CHANGED("me") != before


def test_encode_body_uses_the_poses_of_detect_body_pose(pack, nodes, loaded, encode_error):
    """With poses connected, Encode Body detects nothing itself, applies its several-people policy to every person
    Detect Body Pose found, and refuses poses of other images."""
    images = comfy_images(3)
    pose = FakePoseModel()
    pair = [standing_person(45, 1.0, 0.8), standing_person(20, 0.8)]
    pose.add(images[0], [standing_person()])
    pose.add(images[1], pair)
    itself, _ = nodes.EncodeBodyFromImages().encode(loaded, pose, images, 0.3, "use the largest")

    class Refuses:
        def detect(self, images):
            raise AssertionError("Encode Body detected again although poses were connected")

    kp = pack.bolid.keypoints
    people = [[standing_person()], pair, []]
    detected = kp.DetectedPoses([kp.select_person(p) for p in people], people, [(90, 110)] * 3)
    reused, _ = nodes.EncodeBodyFromImages().encode([loaded], [Refuses()], [images], [0.3], ["use the largest"],
                                                    poses=[detected])
    torch.testing.assert_close(reused.c_body, itself.c_body)
    assert reused.views == itself.views == ("image 1 of 3", "image 2 of 3")
    skipped, _ = nodes.EncodeBodyFromImages().encode(loaded, Refuses(), images, 0.3, "skip the image", poses=detected)
    assert skipped.views == ("image 1 of 3",)
    # a plain list (one PersonPose | None per image) works as well
    plain, _ = nodes.EncodeBodyFromImages().encode(loaded, Refuses(), images, 0.3, poses=list(detected))
    torch.testing.assert_close(plain.c_body, itself.c_body)
    with pytest.raises(encode_error, match=r"cover 3 image\(s\) but 2 image\(s\)"):
        nodes.EncodeBodyFromImages().encode(loaded, Refuses(), images[:2], 0.3, poses=detected)
    other = kp.DetectedPoses(list(detected), people, [(90, 110), (200, 100), (90, 110)])
    with pytest.raises(encode_error, match="image 2 of 3 were detected on a 200x100 image"):
        nodes.EncodeBodyFromImages().encode(loaded, Refuses(), images, 0.3, poses=other)
