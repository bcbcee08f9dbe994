"""One detection, one rule: the person-selection rule shared by the dataset and the nodes, Encode Body reusing
Detect Body Pose's poses, and one crop-and-resize path whose pixels are identical in training and inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bolid.body_encode import encode_body
from bolid.body_encoder import BodyEncoder, BodyEncoderConfig
from bolid.body_encoder_io import load_body_encoder, save_body_encoder
from bolid.body_views import crop_person, views_to_tensor
from bolid.dataset import DatasetConfig, SubsetConfig
from bolid.dataset_prepare import prepare_dataset
from bolid.identity_cache import IdentityCache, Stage1Dataset, load_identity_caches
from bolid.keypoints import PersonPose, choose_person, select_person, significant_others


def person(x: float, y: float, w: float, h: float, score: float = 0.9, conf: float = 0.9) -> PersonPose:
    """A person whose 17 joints spread over the box (x, y, w, h)."""
    rng = np.random.default_rng(int(x * 7 + y * 13 + w))
    kp = np.zeros((17, 3), np.float32)
    kp[:, 0] = x + rng.uniform(0.1, 0.9, 17) * w
    kp[:, 1] = y + np.linspace(0.05, 0.95, 17) * h
    kp[:, 2] = conf
    return PersonPose(box=np.array([x, y, x + w, y + h]), score=score, keypoints=kp)


def test_the_one_person_rule():
    big, small, near = person(10, 10, 100, 200), person(200, 10, 20, 40), person(150, 10, 80, 160, score=0.95)
    assert select_person([small, big], "largest") is big
    assert select_person([small, big, near], "most_confident") is near
    assert select_person([], "largest") is None
    assert significant_others([big, small, near], big) == [near]  # 0.64x the area counts, 0.04x does not
    assert choose_person([big, small], several_people="skip").pose is big  # a background person is ignored
    skipped = choose_person([big, near], several_people="skip")
    assert skipped.pose is None and skipped.people == 2 and skipped.reason.startswith("several people (2 detected")
    assert choose_person([big, near], several_people="use_main").pose is big
    assert choose_person([big, near], several_people="skip", ratio=0.7).pose is big
    # a main person chosen elsewhere (Detect Body Pose's "most_confident") is kept
    assert choose_person([big, small, near], main=near, several_people="use_main").pose is near
    assert choose_person([], several_people="skip").reason == "no person detected"
    with pytest.raises(ValueError):
        choose_person([big], several_people="maybe")


class TablePoseRunner:
    """Answers per image size (each test photo has its own size)."""

    def __init__(self, table: dict[tuple[int, int], list[PersonPose]]) -> None:
        self.table = table
        self.calls = 0

    def detect(self, images):
        self.calls += 1
        return [self.table[im.shape[:2]] for im in images]


def test_dataset_prepare_and_encode_body_cut_identical_pixels(tmp_path):
    """The stage-1 cache stores person views at the dataset's crop_size; the exported encoder records that size,
    and Encode Body cuts views at it too: the view encoder receives bit-identical input in training and at
    inference. The old inference path (straight to the encoder's size with Lanczos) did not."""
    rng = np.random.default_rng(3)
    folder = tmp_path / "photos" / "alice"
    folder.mkdir(parents=True)
    photos = [rng.integers(0, 256, (150, 110, 3), dtype=np.uint8), rng.integers(0, 256, (120, 170, 3), dtype=np.uint8)]
    poses = [person(20, 10, 60, 130), person(50, 5, 60, 110)]
    for i, img in enumerate(photos):
        Image.fromarray(img).save(folder / f"{i}.png")
    runner = TablePoseRunner({img.shape[:2]: [p] for img, p in zip(photos, poses, strict=True)})
    dataset = DatasetConfig(cache_dir=str(tmp_path / "cache"), subsets=(SubsetConfig(root=str(tmp_path / "photos")),),
                            min_resolution=50, crop_size=48)
    prepare_dataset(dataset, runner, crop_margin=1.15)
    (cache,) = load_identity_caches(tmp_path / "cache")
    assert isinstance(cache, IdentityCache) and cache.files == ["0.png", "1.png"]

    torch.manual_seed(0)
    encoder = BodyEncoder(BodyEncoderConfig(latent_dim=8, crop_size=16, decoder_size=8, width=4, hidden=16)).eval()
    encoder.view_size = dataset.crop_size  # what stage-1 training sets before exporting
    save_body_encoder(encoder, tmp_path / "enc.safetensors")
    loaded, _ = load_body_encoder(tmp_path / "enc.safetensors")
    assert loaded.view_size == 48

    seen: list[torch.Tensor] = []
    hook = loaded.view_encoder.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    try:
        train_crops = Stage1Dataset([cache], 1, flip=False)._crops(0, cache, [0, 1])  # the training read path
        with torch.no_grad():
            loaded.encode_views(train_crops, cache.keypoints)
        result = encode_body(loaded, photos, poses, ["0.png", "1.png"], min_confidence=0.0)
    finally:
        hook.remove()
    training_input, inference_input = seen[0], seen[1].reshape(seen[0].shape)
    assert training_input.shape == (2, 3, 16, 16)
    assert torch.equal(training_input, inference_input)
    assert result.body_id.views == ("0.png", "1.png")
    # the stored views are what inference cuts, byte for byte
    for stored, crop in zip(views_to_tensor(np.stack(result.crops)), train_crops,
                            strict=True):
        assert torch.equal(stored, crop)
    # the former inference path gave other pixels
    old = views_to_tensor(np.stack([crop_person(img, p, 16, 1.15)[0] for img, p in zip(photos, poses, strict=True)]))
    assert not torch.equal(old, training_input)


def test_encoder_files_without_a_recorded_view_size(tmp_path):
    """Older exports: the view size comes from their training record, else it is the encoder's input size."""
    import json

    encoder = BodyEncoder(BodyEncoderConfig(latent_dim=8, crop_size=16, decoder_size=8, width=4, hidden=16))
    from bolid.safetensors_io import atomic_save_safetensors, load_safetensors

    save_body_encoder(encoder, tmp_path / "a.safetensors", {"bolid_training": json.dumps({"dataset": {"crop_size": 64}})})
    tensors, meta = load_safetensors(tmp_path / "a.safetensors")
    meta.pop("bolid_view_size")
    atomic_save_safetensors(tensors, tmp_path / "b.safetensors", meta)
    assert load_body_encoder(tmp_path / "b.safetensors")[0].view_size == 64
    meta.pop("bolid_training")
    atomic_save_safetensors(tensors, tmp_path / "c.safetensors", meta)
    assert load_body_encoder(tmp_path / "c.safetensors")[0].view_size == 16
