"""The body-proportion function, the Body-ID VAE's aggregation, encoding, encoder files and Body ID files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bolid.body_encode import BodyEncodeError, encode_body
from bolid.body_encoder import BodyEncoder, BodyEncoderConfig, aggregate_views
from bolid.body_encoder_io import BodyEncoderFileError, encoder_hash, load_body_encoder, save_body_encoder
from bolid.body_id_io import (
    BodyIDFileError,
    BodyIDMismatchError,
    blend_body_ids,
    body_id_path,
    load_body_id,
    sample_body_id,
    save_body_id,
)
from bolid.body_views import crop_person
from bolid.identity import BodyID
from bolid.keypoints import PersonPose, flip_index
from bolid.proportions import PROPORTION_NAMES, aggregate_proportions, body_proportions, body_proportions_np
from bolid.safetensors_io import atomic_save_safetensors

TINY = BodyEncoderConfig(latent_dim=8, crop_size=16, decoder_size=8, width=4, hidden=16)


def t_pose() -> np.ndarray:
    """A front-facing figure: torso 100 px, upper arm 30, forearm 25, thigh 45, shin 40, shoulders 60, hips 40."""
    kp = np.zeros((17, 3), dtype=np.float64)
    kp[:, 2] = 1.0
    kp[5, :2], kp[6, :2] = (130, 100), (70, 100)
    kp[11, :2], kp[12, :2] = (120, 200), (80, 200)
    kp[7, :2], kp[8, :2] = (160, 100), (40, 100)   # arms straight out
    kp[9, :2], kp[10, :2] = (185, 100), (15, 100)
    kp[13, :2], kp[14, :2] = (120, 245), (80, 245)
    kp[15, :2], kp[16, :2] = (120, 285), (80, 285)
    kp[0, :2] = (100, 60)
    return kp


# ----------------------------------------------------------------------------------------------- proportions


def test_proportions_known_answer():
    props, conf = body_proportions_np(t_pose())
    np.testing.assert_allclose(props, [0.30, 0.25, 0.45, 0.40, 0.60, 0.40], atol=1e-6)
    np.testing.assert_allclose(conf, np.ones(6), atol=1e-6)
    assert PROPORTION_NAMES[2] == "thigh"


def test_proportions_invariant_to_scale_translation_rotation_and_flip():
    kp = t_pose()
    base, _ = body_proportions_np(kp)
    moved = kp.copy()
    moved[:, :2] = moved[:, :2] * 3.7 + np.array([-500.0, 42.0])
    np.testing.assert_allclose(body_proportions_np(moved)[0], base, rtol=1e-6)
    a = 0.7
    rot = kp.copy()
    rot[:, :2] = kp[:, :2] @ np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]).T
    np.testing.assert_allclose(body_proportions_np(rot)[0], base, rtol=1e-6)
    # make the two sides differ, then flip the image (x -> W - x) and swap the labels as a pose model does
    kp[9, 0] = 195.0
    asym, _ = body_proportions_np(kp)
    flipped = kp[flip_index()].copy()
    flipped[:, 0] = 640 - flipped[:, 0]
    np.testing.assert_allclose(body_proportions_np(flipped)[0], asym, rtol=1e-6)


def test_proportions_confidence_weighting():
    kp = t_pose()
    kp[9, :2] = (230, 100)  # left forearm 70 px, but the left wrist is not seen
    kp[9, 2] = 0.0
    props, conf = body_proportions_np(kp)
    assert props[1] == pytest.approx(0.25, abs=1e-6)  # the right forearm alone
    assert conf[1] == pytest.approx(0.5)
    kp[9, 2] = 1.0  # seen: the average of 70 and 25 px
    assert body_proportions_np(kp)[0][1] == pytest.approx(0.475, abs=1e-6)
    kp[11, 2] = 0.0  # no torso -> no usable proportion
    assert np.all(body_proportions_np(kp)[1] == 0)
    # aggregate over views: confidence-weighted
    p = torch.tensor([[1.0] * 6, [3.0] * 6])
    c = torch.tensor([[1.0] * 6, [0.0] * 6])
    mean, agg_conf = aggregate_proportions(p, c)
    assert torch.allclose(mean, torch.ones(6)) and torch.allclose(agg_conf, torch.full((6,), 0.5))


def test_proportions_are_differentiable_and_batched():
    kp = torch.tensor(t_pose(), requires_grad=True)
    props, _ = body_proportions(kp)
    props.sum().backward()
    assert torch.isfinite(kp.grad).all() and kp.grad[:, :2].abs().sum() > 0
    batch = torch.tensor(np.stack([t_pose(), t_pose() * [2, 2, 1]]))
    out, _ = body_proportions(batch)
    assert out.shape == (2, 6) and torch.allclose(out[0], out[1])
    collapsed = torch.zeros(17, 3, dtype=torch.float64, requires_grad=True)  # all joints on one point
    p, c = body_proportions(collapsed)
    p.sum().backward()
    assert torch.isfinite(collapsed.grad).all() and torch.all(c == 0)


# ----------------------------------------------------------------------------------------------- aggregation


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return BodyEncoder(TINY).eval()


def random_views(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    crops = torch.rand(1, n, 3, 16, 16, generator=g)
    kps = torch.rand(1, n, 17, 3, generator=g)
    return crops, kps


def test_more_views_give_a_tighter_posterior(encoder):
    crops, kps = random_views(5)
    with torch.no_grad():
        variances = [encoder.encode(crops[:, :k], kps[:, :k], torch.full((1, k), 0.8))[1].exp()
                     for k in range(1, 6)]
    for fewer, more in zip(variances, variances[1:], strict=False):
        assert torch.all(more < fewer)


def test_order_of_views_changes_nothing(encoder):
    crops, kps = random_views(4, seed=1)
    w = torch.tensor([[0.9, 0.3, 0.6, 0.75]])
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        mu, lv = encoder.encode(crops, kps, w)
        mu_p, lv_p = encoder.encode(crops[:, perm], kps[:, perm], w[:, perm])
    torch.testing.assert_close(mu, mu_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lv, lv_p, rtol=1e-5, atol=1e-6)


def test_a_view_with_zero_confidence_has_no_influence(encoder):
    crops, kps = random_views(3, seed=2)
    w = torch.tensor([[0.9, 0.5, 0.0]])
    with torch.no_grad():
        ref = encoder.encode(crops[:, :2], kps[:, :2], w[:, :2])
        got = encoder.encode(crops, kps, w)
        crops[:, 2] = float("nan")  # even a garbage view is ignored
        kps[:, 2] = 1e6
        garbage = encoder.encode(crops, kps, w)
    for a, b, c in zip(ref, got, garbage, strict=True):
        # the padded view is masked exactly (the garbage run equals the zero-weight run bit for bit); against the
        # 2-view run only float rounding differs, because the convolutions see a batch of 3 instead of 2
        assert torch.equal(b, c) and torch.isfinite(c).all()
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_product_of_gaussians_formula():
    mu = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    logvar = torch.log(torch.tensor([[1.0, 4.0], [0.5, 1.0]]))
    w = torch.tensor([1.0, 0.5])
    m, lv = aggregate_views(mu, logvar, w, prior_expert=False)
    prec = torch.tensor([1 / 1 + 0.5 / 0.5, 1 / 4 + 0.5 / 1])
    torch.testing.assert_close(lv, -prec.log())
    torch.testing.assert_close(m, torch.tensor([(1 * 1 / 1 + 0.5 * 3 / 0.5), (0 + 0.5 * 2 / 1)]) / prec)
    m1, lv1 = aggregate_views(mu, logvar, w, prior_expert=True)  # the prior adds precision 1, mean 0
    torch.testing.assert_close(lv1, -(prec + 1).log())
    torch.testing.assert_close(m1, m * prec / (prec + 1))


def test_product_of_gaussians_is_finite_in_fp16():
    # w / var * mu overflows fp16 (max 65504) for confident views: it is computed in float32 and cast back
    mu = torch.full((3, 4), 3.5)
    logvar = torch.full((3, 4), -9.0)
    w = torch.ones(3)
    ref_m, ref_lv = aggregate_views(mu, logvar, w)
    m, lv = aggregate_views(mu.half(), logvar.half(), w.half())
    assert m.dtype == lv.dtype == torch.float16
    assert torch.isfinite(m).all() and torch.isfinite(lv).all()
    torch.testing.assert_close(m.float(), ref_m, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(lv.float(), ref_lv, rtol=1e-3, atol=1e-3)


def test_losses_backpropagate_into_every_part():
    torch.manual_seed(0)
    model = BodyEncoder(TINY)
    b = {"context_crops": torch.rand(2, 2, 3, 20, 20), "context_keypoints": torch.rand(2, 2, 17, 3),
         "context_weights": torch.tensor([[1.0, 0.5], [0.7, 0.0]]), "target_crop": torch.rand(2, 3, 20, 20),
         "target_keypoints": torch.rand(2, 17, 3), "proportions": torch.rand(2, 6),
         "proportion_confidence": torch.ones(2, 6), "appearance": torch.rand(2, 12),
         "appearance_confidence": torch.ones(2, 12)}
    losses = model.losses(b, generator=torch.Generator().manual_seed(1))
    losses["loss"].backward()
    for name in ("view_encoder", "decoder", "proportion_head", "appearance_head"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
    again = model.losses(b, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again["loss"], losses["loss"].detach())


# ----------------------------------------------------------------------------------------------- encode_body


def figure_image() -> tuple[np.ndarray, PersonPose]:
    kp = t_pose().astype(np.float32)
    kp[:, 2] = 0.9
    img = np.zeros((320, 220, 3), dtype=np.uint8)
    img[100:290, 70:130] = 200
    return img, PersonPose(box=np.array([10, 50, 195, 290]), score=0.9, keypoints=kp)


def test_crop_person_keeps_keypoints_on_the_same_pixels():
    img, pose = figure_image()
    crop, kp = crop_person(img, pose, 64, 1.15)
    assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
    np.testing.assert_allclose(body_proportions_np(kp)[0], body_proportions_np(pose.keypoints)[0], rtol=1e-5)
    # the torso band (bright in the photo) is bright at the mid-torso keypoint position in the crop
    mid = 0.5 * (kp[5, :2] + kp[12, :2]) * 64
    assert crop[int(mid[1]), int(mid[0])].mean() > 150
    # a box leaving the image is padded with black, not stretched
    edge = PersonPose(box=np.array([-100, -100, 50, 50]), score=0.9, keypoints=pose.keypoints)
    crop, _ = crop_person(img, edge, 32, 1.0)
    assert crop[:10, :10].max() == 0


def test_encode_body_uses_confident_views_and_names_skipped_ones(encoder):
    img, pose = figure_image()
    weak_kp = pose.keypoints.copy()
    weak_kp[:, 2] = 0.1
    weak = PersonPose(box=pose.box, score=0.5, keypoints=weak_kp)
    result = encode_body(encoder, [img, img, img], [pose, None, weak], names=["a.png", "b.png", "c.png"],
                         min_confidence=0.3)
    assert result.used == ["a.png"] and result.weights == [pytest.approx(0.9)]
    assert [n for n, _ in result.skipped] == ["b.png", "c.png"]
    assert "no person" in result.skipped[0][1] and "confidence 0.10" in result.skipped[1][1]
    bid = result.body_id
    assert bid.dim == 8 and bid.views == ("a.png",) and bid.encoder_hash == encoder_hash(encoder)
    np.testing.assert_allclose(bid.extra["proportions_observed"], [0.3, 0.25, 0.45, 0.4, 0.6, 0.4], atol=1e-5)
    two = encode_body(encoder, [img, img], [pose, pose]).body_id
    assert torch.all(two.logvar < bid.logvar)  # the same view twice: more evidence, tighter


def test_encode_body_errors(encoder):
    img, pose = figure_image()
    with pytest.raises(BodyEncodeError, match="no images"):
        encode_body(encoder, [], [])
    with pytest.raises(BodyEncodeError, match=r"x\.png: no person detected"):
        encode_body(encoder, [img], [None], names=["x.png"])


# ----------------------------------------------------------------------------------------------- files


def test_encoder_file_round_trip(encoder, tmp_path):
    path = tmp_path / "enc.safetensors"
    digest = save_body_encoder(encoder, path)
    loaded, info = load_body_encoder(path)
    assert loaded.config == encoder.config and digest == encoder_hash(loaded) == info.content_hash
    assert (info.path, info.kind, info.format_version) == (path, "bolid_body_encoder", 2)
    crops, kps = random_views(2)
    with torch.no_grad():
        for a, b in zip(encoder.encode(crops, kps, torch.ones(1, 2)), loaded.encode(crops, kps, torch.ones(1, 2)),
                        strict=True):
            assert torch.equal(a, b)


def test_corrupt_or_foreign_encoder_files_are_clear_errors(encoder, tmp_path):
    path = tmp_path / "enc.safetensors"
    save_body_encoder(encoder, path)
    data = path.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BodyEncoderFileError, match="truncated"):
        load_body_encoder(tmp_path / "truncated.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(BodyEncoderFileError, match="garbage.safetensors"):
        load_body_encoder(tmp_path / "garbage.safetensors")
    atomic_save_safetensors({"x": torch.zeros(1)}, tmp_path / "adapter.safetensors", {"bolid_kind": "bolid_adapter"})
    with pytest.raises(BodyEncoderFileError, match=r"Load Adapter \(BoLID\)"):
        load_body_encoder(tmp_path / "adapter.safetensors")
    # flipped weight bytes keep the file readable but break the stored hash
    tampered = bytearray(data)
    tampered[-3] ^= 0x40
    (tmp_path / "tampered.safetensors").write_bytes(bytes(tampered))
    with pytest.raises(BodyEncoderFileError, match="modified or damaged|NaN"):
        load_body_encoder(tmp_path / "tampered.safetensors")
    with pytest.raises(BodyEncoderFileError, match="safetensors files only"):
        load_body_encoder(tmp_path / "enc.pt")


def make_body_id() -> BodyID:
    return BodyID(c_body=torch.randn(8, generator=torch.Generator().manual_seed(5)), logvar=torch.full((8,), -1.3),
                  views=("a.png", "b é.png"), view_weights=(0.123456789012345, 0.9), encoder_hash="abcd1234",
                  extra={"proportions_observed": [0.3, 0.25], "note": "x"})


def test_body_id_round_trips_exactly(tmp_path):
    bid = make_body_id()
    path = save_body_id(bid, body_id_path(tmp_path, "alice"))
    assert path == (tmp_path / "alice.safetensors").resolve()
    got = load_body_id(path)
    assert torch.equal(got.c_body, bid.c_body) and torch.equal(got.logvar, bid.logvar)
    assert got.views == bid.views and got.view_weights == bid.view_weights
    assert got.encoder_hash == bid.encoder_hash and got.extra == bid.extra
    sampled = sample_body_id(8, seed=3)
    save_body_id(sampled, tmp_path / "s.safetensors")
    got = load_body_id(tmp_path / "s.safetensors")
    assert torch.equal(got.c_body, sampled.c_body) and got.logvar is None and got.views == ()


def test_body_id_names_cannot_escape_and_files_are_not_overwritten(tmp_path):
    for bad in ("../evil", "a/b", "/abs", "..", ".hidden", "x\\y", "", "a" * 200):
        with pytest.raises(BodyIDFileError):
            body_id_path(tmp_path, bad)
    assert body_id_path(tmp_path, "bob.safetensors").name == "bob.safetensors"
    path = save_body_id(make_body_id(), body_id_path(tmp_path, "bob"))
    with pytest.raises(BodyIDFileError, match="already exists"):
        save_body_id(sample_body_id(8, 1), path)
    save_body_id(sample_body_id(8, 1), path, overwrite=True)
    assert torch.equal(load_body_id(path).c_body, sample_body_id(8, 1).c_body)
    atomic_save_safetensors({"c_body": torch.zeros(8)}, tmp_path / "other.safetensors", {"bolid_kind": "x"})
    with pytest.raises(BodyIDFileError, match="not a BoLID body ID"):
        load_body_id(tmp_path / "other.safetensors")


def test_sample_and_blend():
    a, b = sample_body_id(64, 1, "h"), sample_body_id(64, 2, "h")
    assert torch.equal(a.c_body, sample_body_id(64, 1, "h").c_body) and not torch.equal(a.c_body, b.c_body)
    assert torch.equal(blend_body_ids(a, b, 0.0).c_body, a.c_body)
    torch.testing.assert_close(blend_body_ids(a, b, 1.0).c_body, b.c_body)
    torch.testing.assert_close(blend_body_ids(a, b, 0.5).c_body, (a.c_body + b.c_body) / 2)
    mid = blend_body_ids(a, b, 0.5, "slerp").c_body
    assert mid.norm() == pytest.approx(float((a.c_body.norm() + b.c_body.norm()) / 2), rel=1e-5)
    torch.testing.assert_close(blend_body_ids(a, b, 1.0, "slerp").c_body, b.c_body, rtol=1e-5, atol=1e-5)
    with pytest.raises(BodyIDMismatchError, match="8 and 64 dims"):
        blend_body_ids(sample_body_id(8, 1), a, 0.5)
    with pytest.raises(BodyIDMismatchError, match="different encoders"):
        blend_body_ids(a, sample_body_id(64, 3, "other"), 0.5)
