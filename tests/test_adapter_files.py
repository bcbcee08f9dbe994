"""Adapter files: round trip, config in metadata, and specific errors for bad files and embeddings."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bolid.adapter import BoLIDAdapter
from bolid.adapter_io import load_adapter, read_adapter_config, save_adapter
from bolid.config import AdapterConfig
from bolid.errors import AdapterFileError, EmbeddingError

SD15_SIZES = (320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280)


def small_config(**kw) -> AdapterConfig:
    return AdapterConfig(context_dim=16, hidden_sizes=(8, 8, 16), body_dim=12, face_tokens=2, body_tokens=3, **kw)


def test_round_trip_exact(tmp_path):
    torch.manual_seed(0)
    adapter = BoLIDAdapter(small_config())
    path = tmp_path / "a.safetensors"
    save_adapter(adapter, path, {"bolid_training": json.dumps({"steps": 3})})
    loaded, info = load_adapter(path)
    assert loaded.config == adapter.config
    assert (info.path, info.kind, info.format_version) == (path, "bolid_adapter", 1)
    assert json.loads(info.metadata["bolid_training"]) == {"steps": 3}
    for (k, a), (_, b) in zip(adapter.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert not list(tmp_path.glob(".*tmp")), "no temp file left behind"


def test_sd15_family_and_ip_numbering():
    config = AdapterConfig(context_dim=768, hidden_sizes=SD15_SIZES)
    assert config.family == "SD1.5"
    with torch.device("meta"):
        keys = BoLIDAdapter(config).state_dict().keys()
    numbers = sorted({int(k.split(".")[1]) for k in keys if k.startswith("layers.")})
    assert numbers == list(range(1, 32, 2))


def test_truncated_file(tmp_path):
    path = tmp_path / "a.safetensors"
    save_adapter(BoLIDAdapter(small_config()), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match="truncated"):
        load_adapter(path)
    path.write_bytes(data[:5])
    with pytest.raises(AdapterFileError, match="not a safetensors file"):
        load_adapter(path)


def test_missing_file_names_file_and_folder(tmp_path):
    with pytest.raises(AdapterFileError, match=str(tmp_path)):
        load_adapter(tmp_path / "nope.safetensors")


def test_missing_and_extra_keys(tmp_path):
    path = tmp_path / "a.safetensors"
    save_adapter(BoLIDAdapter(small_config()), path)
    tensors = load_file(path)
    metadata = small_config().to_metadata()
    del tensors["layers.3.to_v_body.weight"]
    tensors["layers.99.to_k_face.weight"] = torch.zeros(1)
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(AdapterFileError, match=r"1 missing keys .*layers\.3\.to_v_body.*1 unexpected keys"):
        load_adapter(path)


def test_wrong_shape(tmp_path):
    path = tmp_path / "a.safetensors"
    save_adapter(BoLIDAdapter(small_config()), path)
    tensors = load_file(path)
    tensors["face_proj.norm.weight"] = torch.ones(17)
    save_file(tensors, path, metadata=small_config().to_metadata())
    with pytest.raises(AdapterFileError, match=r"face_proj\.norm\.weight has shape \(17,\)"):
        load_adapter(path)


def test_unknown_format_version_and_foreign_file(tmp_path):
    path = tmp_path / "a.safetensors"
    save_adapter(BoLIDAdapter(small_config(format_version=2)), path)
    with pytest.raises(AdapterFileError, match="format version 2 is not supported"):
        read_adapter_config(path)
    save_file({"x": torch.zeros(2)}, path, metadata={"foo": "bar"})
    with pytest.raises(AdapterFileError, match="not a BoLID adapter"):
        load_adapter(path)


def test_pickle_extension_refused(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"\x80\x04")
    with pytest.raises(AdapterFileError, match="safetensors files only"):
        load_adapter(path)


def test_nan_weights_refused(tmp_path):
    adapter = BoLIDAdapter(small_config())
    with torch.no_grad():
        adapter.body_proj.proj[0].weight[0, 0] = float("nan")
    path = tmp_path / "a.safetensors"
    save_adapter(adapter, path)
    with pytest.raises(AdapterFileError, match="NaN"):
        load_adapter(path)


@pytest.mark.parametrize(("value", "match"), [
    (torch.full((512,), float("nan")), "NaN"),
    (torch.zeros(2, 511), r"shape \(2, 511\)"),
])
def test_bad_embeddings(value, match):
    adapter = BoLIDAdapter(small_config())
    with pytest.raises(EmbeddingError, match=match):
        adapter.tokens("face", value)


def test_body_encoder_file_given_as_adapter_gets_a_hint(tmp_path):
    from bolid.body_encoder import BodyEncoder, BodyEncoderConfig
    from bolid.body_encoder_io import save_body_encoder

    path = tmp_path / "enc.safetensors"
    save_body_encoder(BodyEncoder(BodyEncoderConfig(latent_dim=8, crop_size=32, decoder_size=16, width=8, hidden=16)),
                      path)
    with pytest.raises(AdapterFileError, match=r"it is a BoLID Body-ID encoder, load it with Load Body-ID Encoder \(BoLID\)"):
        load_adapter(path)
