"""Load/Apply BoLID Adapter nodes against a stand-in ModelPatcher with SD1.5's exact block structure.

The stand-in mimics the part of ComfyUI's ModelPatcher API the node uses (clone, model_options,
set_model_attn2_replace, get_model_object); the real thing is exercised in test_comfyui_real.py.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn

from bolid.adapter import BoLIDAdapter
from bolid.adapter_io import save_adapter
from bolid.config import AdapterConfig

SD15_KEYS = [("input", 1, 0), ("input", 2, 0), ("input", 4, 0), ("input", 5, 0), ("input", 7, 0), ("input", 8, 0),
             ("middle", 0, 0)] + [("output", i, 0) for i in range(3, 12)]
SD15_HIDDEN = {1: 320, 2: 320, 4: 640, 5: 640, 7: 1280, 8: 1280}
SD15_OUT_HIDDEN = {3: 1280, 4: 1280, 5: 1280, 6: 640, 7: 640, 8: 640, 9: 320, 10: 320, 11: 320}
SD15_ADAPTER_SIZES = tuple(SD15_HIDDEN.values()) + tuple(SD15_OUT_HIDDEN.values()) + (1280,)


def _transformer(hidden: int, ctx: int = 768) -> nn.Module:
    block = nn.Module()
    block.attn2 = nn.Module()
    block.attn2.to_k = nn.Linear(ctx, hidden, bias=False)
    spatial = nn.Module()
    spatial.transformer_blocks = nn.ModuleList([block])
    return spatial


def fake_sd15_unet() -> nn.Module:
    with torch.device("meta"):
        unet = nn.Module()
        unet.input_blocks = nn.ModuleList(
            [nn.Sequential(nn.Identity(), *([_transformer(SD15_HIDDEN[i])] if i in SD15_HIDDEN else []))
             for i in range(12)])
        unet.middle_block = nn.Sequential(nn.Identity(), _transformer(1280), nn.Identity())
        unet.output_blocks = nn.ModuleList(
            [nn.Sequential(nn.Identity(), *([_transformer(SD15_OUT_HIDDEN[i])] if i in SD15_OUT_HIDDEN else []))
             for i in range(12)])
    return unet


class FakeSampling:
    def percent_to_sigma(self, percent: float) -> float:
        return 0.0 if percent >= 1.0 else 14.6 * (1.0 - percent) ** 2


class FakeModelPatcher:
    def __init__(self, unet: nn.Module) -> None:
        self.unet = unet
        self.model_options = {"transformer_options": {}}

    def clone(self) -> FakeModelPatcher:
        other = FakeModelPatcher(self.unet)
        other.model_options = copy.deepcopy(self.model_options)
        return other

    def get_model_object(self, name: str):
        return {"diffusion_model": self.unet, "model_sampling": FakeSampling()}[name]

    def set_model_attn2_replace(self, patch, block_name, number, transformer_index=None):
        # ComfyUI's key rule: (block, number, index) for one transformer, (block, number) for the whole block
        to = self.model_options["transformer_options"].setdefault("patches_replace", {}).setdefault("attn2", {})
        to[(block_name, number) if transformer_index is None else (block_name, number, transformer_index)] = patch


@pytest.fixture()
def folders(tmp_path, install_folder_paths):
    """The stand-in folder_paths rooted at tmp_path, with a "bolid" path configured elsewhere (as
    extra_model_paths.yaml would) and no extensions yet."""
    fp = install_folder_paths(tmp_path / "models", folders={"bolid": ([str(tmp_path / "extra")], set())})
    (tmp_path / "extra").mkdir()
    return fp, tmp_path / "extra"


def _adapter_file(folder, name="a.safetensors", sizes=SD15_ADAPTER_SIZES, ctx=768, body_dim=32):
    save_adapter(BoLIDAdapter(AdapterConfig(context_dim=ctx, hidden_sizes=sizes, body_dim=body_dim)), folder / name)
    return name


def _nodes(pack):
    return pack.nodes.adapter_nodes


def _identity(pack, body_dim=32):
    ident = pack.bolid.identity
    return ident.BodyID(torch.randn(body_dim)), ident.FaceEmbeds(torch.nn.functional.normalize(torch.randn(512), dim=0))


def test_load_lists_and_keeps_configured_paths(pack, folders):
    fp, extra = folders
    name = _adapter_file(extra)
    node = _nodes(pack).LoadBoLIDAdapter
    assert name in node.INPUT_TYPES()["required"]["adapter_name"][0]
    assert str(extra) in fp.get_folder_paths("bolid") and len(fp.get_folder_paths("bolid")) == 2
    assert ".safetensors" in fp.folder_names_and_paths["bolid"][1]
    (loaded,) = node().load(name)
    assert loaded.adapter.config.family == "SD1.5"
    with pytest.raises(FileNotFoundError, match=r"'missing.safetensors' not found in the 'bolid' folders"):
        node().load("missing.safetensors")


def test_apply_patches_every_sd15_layer_in_mapped_order(pack, folders):
    _, extra = folders
    (loaded,) = _nodes(pack).LoadBoLIDAdapter().load(_adapter_file(extra))
    model = FakeModelPatcher(fake_sd15_unet())
    body, face = _identity(pack)
    (patched,) = _nodes(pack).ApplyBoLIDAdapter().apply(model, loaded, 0.7, 0.9, 0.0, 1.0, body_id=body,
                                                        face_embeds=face)
    patches = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    # every layer's 3-tuple key, plus each block's 2-tuple key, where packs stacking SD1.5-style find BoLID
    assert sorted(k for k in patches if len(k) == 3) == sorted(SD15_KEYS)
    assert sorted(k for k in patches if len(k) == 2) == sorted(k[:2] for k in SD15_KEYS)
    assert patches[("input", 1)].layers == {0: patches[("input", 1, 0)]}
    # adapter index order: input blocks, output blocks, then the middle block (diffusers' down, up, mid)
    assert patches[("input", 1, 0)].layer_index == 0
    assert patches[("output", 3, 0)].layer_index == 6
    assert patches[("middle", 0, 0)].layer_index == 15
    assert model.model_options == {"transformer_options": {}}, "the input model is not modified"
    state = patches[("input", 1, 0)].state
    assert state.weights == {"face": 0.7, "body": 0.9} and state.sigma_start == pytest.approx(14.6)


def test_apply_wraps_existing_patch(pack, folders):
    _, extra = folders
    (loaded,) = _nodes(pack).LoadBoLIDAdapter().load(_adapter_file(extra))
    model = FakeModelPatcher(fake_sd15_unet())
    foreign = _nodes(pack).ApplyBoLIDAdapter  # any callable object stands in for another pack's patch
    model.set_model_attn2_replace(foreign, "middle", 0, 0)
    body, _ = _identity(pack)
    (patched,) = _nodes(pack).ApplyBoLIDAdapter().apply(model, loaded, 1.0, 1.0, 0.0, 1.0, body_id=body)
    patch = patched.model_options["transformer_options"]["patches_replace"]["attn2"][("middle", 0, 0)]
    assert patch.wrapped is foreign
    # body only (text-only mode): the face branch sees the zero embedding, as in training's condition dropout
    assert torch.equal(patch.state.embeds["face"], torch.zeros(1, 512))
    assert patch.state.active_branches() == ["face", "body"]


def test_apply_errors_name_the_problem(pack, folders):
    _, extra = folders
    nodes = _nodes(pack)
    errors = pack.bolid.errors
    model = FakeModelPatcher(fake_sd15_unet())
    body, face = _identity(pack)
    sdxl_config = AdapterConfig(context_dim=2048, hidden_sizes=(640,) * 4 + (1280,) * 66)
    sdxl = nodes.LoadedAdapter(types.SimpleNamespace(config=sdxl_config), "sdxl")  # the check reads only the config
    with pytest.raises(errors.AdapterMismatchError,
                       match=r"adapter is SDXL \(70 layers, ctx 2048\), model is SD1.5 \(16 layers, ctx 768\)"):
        nodes.ApplyBoLIDAdapter().apply(model, sdxl, 1.0, 1.0, 0.0, 1.0, body_id=body)
    (sd15,) = nodes.LoadBoLIDAdapter().load(_adapter_file(extra))
    with pytest.raises(errors.EmbeddingError, match="needs a body_id and/or face_embeds"):
        nodes.ApplyBoLIDAdapter().apply(model, sd15, 1.0, 1.0, 0.0, 1.0)
    with pytest.raises(errors.EmbeddingError, match="body identity has 16 dims, the adapter expects 32"):
        nodes.ApplyBoLIDAdapter().apply(model, sd15, 1.0, 1.0, 0.0, 1.0, body_id=_identity(pack, 16)[0])
    hashed = nodes.LoadedAdapter(sd15.adapter, "sd15", body_encoder_hash="enc-a")
    other = pack.bolid.identity.BodyID(torch.randn(32), encoder_hash="enc-b")
    with pytest.raises(errors.EmbeddingError, match="encoder enc-b, the adapter was trained with encoder enc-a"):
        nodes.ApplyBoLIDAdapter().apply(model, hashed, 1.0, 1.0, 0.0, 1.0, body_id=other)
    same = pack.bolid.identity.BodyID(torch.randn(32), encoder_hash="enc-a")
    nodes.ApplyBoLIDAdapter().apply(model, hashed, 1.0, 1.0, 0.0, 1.0, body_id=same)
    with pytest.raises(ValueError, match="start_at"):
        nodes.ApplyBoLIDAdapter().apply(model, sd15, 1.0, 1.0, 0.8, 0.2, body_id=body)
    with pytest.raises(errors.EmbeddingError, match="NaN"):
        pack.bolid.identity.FaceEmbeds(torch.full((512,), float("nan")))


def test_pack_imports_without_comfyui(pack):
    assert {"BoLIDLoadAdapter", "BoLIDApplyAdapter"} <= set(pack.NODE_CLASS_MAPPINGS)
    for cls in pack.NODE_CLASS_MAPPINGS.values():
        assert isinstance(cls.RETURN_TYPES, tuple) and isinstance(cls.FUNCTION, str) and cls.CATEGORY


def test_face_only_adapter_says_the_body_branch_is_absent(pack, folders, caplog):
    """A FaceID import has no body branch: Apply runs the face branch and says that body inputs are ignored."""
    _, extra = folders
    config = AdapterConfig(context_dim=768, hidden_sizes=SD15_ADAPTER_SIZES, body_branch=False)
    save_adapter(BoLIDAdapter(config), extra / "faceid.safetensors")
    nodes = _nodes(pack)
    (loaded,) = nodes.LoadBoLIDAdapter().load("faceid.safetensors")
    assert not any("body" in k for k in loaded.adapter.state_dict())
    model = FakeModelPatcher(fake_sd15_unet())
    body, face = _identity(pack)
    with caplog.at_level("WARNING", logger="bolid"):
        (patched,) = nodes.ApplyBoLIDAdapter().apply(model, loaded, 0.8, 0.0, 0.0, 1.0, face_embeds=face)
    assert "no body branch" not in caplog.text, "weight_body 0 and no body_id: nothing to warn about"
    patch = patched.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1, 0)]
    assert patch.state.active_branches() == ["face"] and set(patch.state.embeds) == {"face"}
    with caplog.at_level("WARNING", logger="bolid"):
        (patched,) = nodes.ApplyBoLIDAdapter().apply(model, loaded, 0.8, 0.8, 0.0, 1.0, body_id=body, face_embeds=face)
    assert "no body branch" in caplog.text and "body branch is added by stage-2 training" in caplog.text
    assert patched.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1, 0)] \
        .state.active_branches() == ["face"]
    with pytest.raises(pack.bolid.adapter.MissingBranchError, match="only a body_id.*no body branch"):
        nodes.ApplyBoLIDAdapter().apply(model, loaded, 0.8, 0.8, 0.0, 1.0, body_id=body)
