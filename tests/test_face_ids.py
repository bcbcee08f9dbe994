"""Face IDs kept like Body IDs: files (name rules, atomic writes, checks), weighted averages, blends, nodes."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture
def fio(pack):
    return pack.bolid.face_id_io


@pytest.fixture
def face_nodes(pack, tmp_path, install_folder_paths):
    install_folder_paths(tmp_path / "models")
    (tmp_path / "models" / "bolid_face_ids").mkdir(parents=True)
    return pack.nodes.face_nodes


def unit(seed: int, dim: int = 512) -> torch.Tensor:
    v = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def face(pack, seed: int, **kw):
    return pack.bolid.identity.FaceEmbeds(embedding=unit(seed), **kw)


def test_face_id_file_round_trip_and_checks(pack, fio, tmp_path):
    a = face(pack, 1, num_images=2, source="insightface:antelopev2", photos=("p1", "p2"), photo_weights=(1.0, 0.5))
    path = fio.save_face_id(a, fio.face_id_path(tmp_path, "alice"))
    assert path.name == "alice.safetensors" and [p.name for p in tmp_path.iterdir()] == ["alice.safetensors"]
    back = fio.load_face_id(path)
    assert torch.equal(back.embedding, a.embedding) and back.num_images == 2
    assert back.source == a.source and back.photos == ("p1", "p2") and back.photo_weights == (1.0, 0.5)
    with pytest.raises(fio.FaceIDFileError, match="already exists"):
        fio.save_face_id(face(pack, 2), path)
    fio.save_face_id(face(pack, 2), path, overwrite=True)
    assert torch.equal(fio.load_face_id(path).embedding, unit(2))
    # the Body ID name rules
    for bad in ("../escape", "sub/dir", "/tmp/abs", ".hidden", ""):
        with pytest.raises(fio.FaceIDFileError, match="face ID name"):
            fio.face_id_path(tmp_path, bad)
    # a Body ID file is not a Face ID
    ids = pack.bolid.body_id_io
    body = ids.save_body_id(ids.sample_body_id(8, 0), tmp_path / "body.safetensors")
    with pytest.raises(fio.FaceIDFileError, match="Load Body ID"):
        fio.load_face_id(body)
    # a damaged embedding (not unit length) is refused
    from safetensors.torch import save_file

    meta = {"bolid_kind": "bolid_face_id", "bolid_format_version": "1", "bolid_face_dim": "512"}
    save_file({"embedding": unit(3) * 3}, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(fio.FaceIDFileError, match="not a unit vector"):
        fio.load_face_id(tmp_path / "bad.safetensors")
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(fio.FaceIDFileError):
        fio.load_face_id(tmp_path / "pickle.safetensors")


def test_weighted_average_and_weights_text(pack, fio):
    e = [unit(1).numpy(), unit(2).numpy(), unit(3).numpy()]
    equal = fio.weighted_face_average(e, [1, 1, 1])
    plain = pack.bolid.face.average_embeddings(e)
    torch.testing.assert_close(equal.embedding, torch.from_numpy(plain), atol=1e-6, rtol=0)
    only_first = fio.weighted_face_average(e, [2.0, 0.0, 0.0], ["a", "b", "c"])
    torch.testing.assert_close(only_first.embedding, unit(1), atol=1e-6, rtol=0)
    assert only_first.num_images == 1 and only_first.photo_weights == (2.0, 0.0, 0.0)
    leaning = fio.weighted_face_average(e[:2], [3.0, 1.0]).embedding
    assert float(leaning @ unit(1)) > float(leaning @ unit(2))
    assert fio.parse_photo_weights("", 3) == [1.0, 1.0, 1.0]
    assert fio.parse_photo_weights(" 1, 0.5 ,2 ", 3) == [1.0, 0.5, 2.0]
    for bad, match in (("1, 2", "2 weight"), ("1, x, 2", "numbers"), ("1, -1, 2", ">= 0"), ("0,0,0", ">= 0")):
        with pytest.raises(fio.FaceWeightsError, match=match):
            fio.parse_photo_weights(bad, 3)


def test_blend_face_ids(pack, fio, caplog):
    a, b = face(pack, 1, source="insightface:x"), face(pack, 2, source="insightface:x")
    for method in ("slerp", "linear"):
        torch.testing.assert_close(fio.blend_face_ids(a, b, 0.0, method).embedding, a.embedding)
        torch.testing.assert_close(fio.blend_face_ids(a, b, 1.0, method).embedding, b.embedding)
        mid = fio.blend_face_ids(a, b, 0.5, method).embedding
        assert abs(float(mid.norm()) - 1) < 1e-5 and abs(float(mid @ a.embedding) - float(mid @ b.embedding)) < 1e-5
    quarter = fio.blend_face_ids(a, b, 0.25, "slerp").embedding
    angle = float(torch.arccos((a.embedding @ b.embedding).clamp(-1, 1)))
    assert float(torch.arccos((quarter @ a.embedding).clamp(-1, 1))) == pytest.approx(0.25 * angle, abs=1e-4)
    with pytest.raises(fio.FaceIDMismatchError):
        fio.blend_face_ids(a, pack.bolid.identity.FaceEmbeds(embedding=unit(1, 128)), 0.5)
    fio.blend_face_ids(a, face(pack, 3, source="insightface:other"), 0.5)
    assert "different recognisers" in caplog.text


def test_face_id_nodes_share_one_folder(pack, face_nodes, tmp_path):
    a = face(pack, 5, num_images=3)
    (name,) = face_nodes.SaveFaceID().save(a, "bob", False)
    assert name == "bob.safetensors" and (tmp_path / "models" / "bolid_face_ids" / name).is_file()
    assert face_nodes.LoadFaceID.INPUT_TYPES()["required"]["face_id_name"][0] == ["bob.safetensors"]
    before = face_nodes.LoadFaceID.IS_CHANGED("bob.safetensors")
    (loaded,) = face_nodes.LoadFaceID().load("bob.safetensors")
    assert torch.equal(loaded.embedding, a.embedding) and loaded.num_images == 3
    with pytest.raises(pack.bolid.face_id_io.FaceIDFileError, match="already exists"):
        face_nodes.SaveFaceID().save(face(pack, 6), "bob", False)
    face_nodes.SaveFaceID().save(face(pack, 6), "bob", True)
    assert face_nodes.LoadFaceID.IS_CHANGED("bob.safetensors") != before
    (mid,) = face_nodes.BlendFaceIDs().blend(loaded, face(pack, 6), 0.5, "slerp")
    assert abs(float(mid.embedding.norm()) - 1) < 1e-5
    with pytest.raises(TypeError, match="Encode Face or Load Face ID"):
        face_nodes.SaveFaceID().save(np.zeros(512), "x", True)


def test_encode_face_photo_weights(pack):
    """Per-photo weights: a fake face model whose embedding depends on the photo's brightness."""
    perception = pack.nodes.perception_nodes
    FaceEmbeds, NoFaceError = pack.bolid.identity.FaceEmbeds, pack.bolid.face.NoFaceError  # noqa: N806

    class Fake:
        def embed(self, images, no_face="error", names=None):
            (img,) = images
            if img.max() == 0:
                raise NoFaceError(f"no face found in {names[0]}")
            return FaceEmbeds(embedding=unit(int(img.mean())), source="insightface:fake")

    photos = [torch.full((1, 8, 8, 3), v / 255) for v in (10, 20)] + [torch.zeros(1, 6, 9, 3)]
    (equal,) = perception.EncodeFace().encode([Fake()], photos[:2], ["error"])
    (weighted,) = perception.EncodeFace().encode([Fake()], photos[:2], ["error"], ["1, 0"])
    torch.testing.assert_close(weighted.embedding, unit(10), atol=1e-6, rtol=0)
    assert weighted.photo_weights == (1.0, 0.0) and weighted.photos == ("image 1 of 2", "image 2 of 2")
    assert weighted.source == "insightface:fake"
    assert not torch.allclose(equal.embedding, weighted.embedding)
    (skipping,) = perception.EncodeFace().encode([Fake()], photos, ["skip"], ["1, 3, 5"])
    assert skipping.photos == ("image 1 of 3", "image 2 of 3") and skipping.photo_weights == (1.0, 3.0)
    with pytest.raises(NoFaceError, match="image 3 of 3"):
        perception.EncodeFace().encode([Fake()], photos, ["error"])
    with pytest.raises(pack.bolid.face_id_io.FaceWeightsError, match="2 weight"):
        perception.EncodeFace().encode([Fake()], photos, ["skip"], ["1, 2"])
