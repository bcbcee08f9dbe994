"""One file-kind check for every BoLID file: each loader refuses each other kind, naming the node that loads it."""

from __future__ import annotations

import pytest
import torch

from bolid.adapter import BoLIDAdapter
from bolid.adapter_io import load_adapter, save_adapter
from bolid.body_encoder import BodyEncoder, BodyEncoderConfig
from bolid.body_encoder_io import BodyEncoderFileError, load_body_encoder, save_body_encoder
from bolid.body_id_io import BodyIDFileError, load_body_id, sample_body_id, save_body_id
from bolid.config import AdapterConfig
from bolid.errors import AdapterFileError
from bolid.face_id_io import FaceIDFileError, load_face_id, save_face_id
from bolid.file_kinds import ADAPTER, BODY_ENCODER, BODY_ID, FACE_ID, KINDS, check_file_kind
from bolid.identity import FaceEmbeds
from bolid.safetensors_io import atomic_save_safetensors

LOADERS = {ADAPTER: (load_adapter, AdapterFileError), BODY_ENCODER: (load_body_encoder, BodyEncoderFileError),
           BODY_ID: (load_body_id, BodyIDFileError), FACE_ID: (load_face_id, FaceIDFileError)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kinds")
    torch.manual_seed(0)
    save_adapter(BoLIDAdapter(AdapterConfig(context_dim=8, hidden_sizes=(8,), body_dim=6, face_embed_dim=4,
                                            face_tokens=1, body_tokens=1)), folder / "a.safetensors")
    save_body_encoder(BodyEncoder(BodyEncoderConfig(latent_dim=6, crop_size=16, decoder_size=8, width=4, hidden=8)),
                      folder / "e.safetensors")
    save_body_id(sample_body_id(6, 0), folder / "b.safetensors")
    save_face_id(FaceEmbeds(embedding=torch.nn.functional.normalize(torch.randn(512), dim=0)), folder / "f.safetensors")
    return {ADAPTER: folder / "a.safetensors", BODY_ENCODER: folder / "e.safetensors",
            BODY_ID: folder / "b.safetensors", FACE_ID: folder / "f.safetensors"}


def test_every_loader_reads_its_kind_and_names_the_loader_of_any_other(files):
    assert set(KINDS) == set(LOADERS) == set(files)
    for kind, (load, error) in LOADERS.items():
        load(files[kind])  # its own kind loads
        for other, path in files.items():
            if other == kind:
                continue
            with pytest.raises(error) as info:
                load(path)
            message = str(info.value)
            assert f"not a {KINDS[kind].what}" in message and str(path) in message
            assert f"it is a {KINDS[other].what}, load it with {KINDS[other].loader}" in message


def test_unknown_kind_version_and_pickle_names(tmp_path):
    with pytest.raises(BodyIDFileError, match=r"not a BoLID body ID \(metadata bolid_kind='x'\); save identities"):
        check_file_kind({"bolid_kind": "x"}, "f", BODY_ID, (1,), BodyIDFileError)
    with pytest.raises(FaceIDFileError, match="missing or invalid bolid_format_version"):
        check_file_kind({"bolid_kind": FACE_ID}, "f", FACE_ID, (1,), FaceIDFileError)
    with pytest.raises(BodyEncoderFileError, match=r"format version 3 is not supported \(this BoLID reads 1, 2\)"):
        check_file_kind({"bolid_kind": BODY_ENCODER, "bolid_format_version": "3"}, "f", BODY_ENCODER, (1, 2),
                        BodyEncoderFileError)
    assert check_file_kind({"bolid_kind": ADAPTER, "bolid_format_version": "1"}, "f", ADAPTER, (1,),
                           AdapterFileError) == 1
    atomic_save_safetensors({"c_body": torch.zeros(6)}, tmp_path / "b.pt", {"bolid_kind": BODY_ID})
    for load, error in LOADERS.values():
        with pytest.raises(error, match="safetensors files only"):
            load(tmp_path / "b.pt")
