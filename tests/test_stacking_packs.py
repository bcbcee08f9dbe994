"""BoLID stacked with the real patch code of ComfyUI_IPAdapter_plus, PuLID_ComfyUI and ComfyUI_InstantID, inside
a real ComfyUI (COMFYUI_PATH) on the tiny SD1.5-architecture model.

Gated by IPADAPTER_PLUS_PATH / PULID_COMFYUI_PATH / INSTANTID_PATH (local checkouts of those packs, read and run,
never copied here). Each pack registers through its own ``set_model_patch_replace`` with its own attention
callback and ``To_KV`` layers (tiny random weights); only model files are replaced. At the first cross-attention
layer every variant sees the same input, so the stacked output must be the plain output plus BoLID's and the
pack's contributions, in both orders and both key styles. test_stacking.py runs the same protocol in CI.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from comfy_tiny import CONTEXT_DIM
from test_comfyui_real import _first_cross_attention
from tiny_unets import randomize_

from bolid.diffusers_integration import adapter_config_for_unet, init_adapter_from_unet

pytestmark = pytest.mark.comfyui
PACKS = {  # name: (env var, module holding set_model_patch_replace, its function name)
    "IPAdapter_plus": ("IPADAPTER_PLUS_PATH", "IPAdapterPlus", "set_model_patch_replace"),
    "PuLID": ("PULID_COMFYUI_PATH", "pulid", "set_model_patch_replace"),
    "InstantID": ("INSTANTID_PATH", "InstantID", "_set_model_patch_replace"),
}
INNER = 32  # inner dim of the tiny model's first cross-attention layer (IP-Adapter module key "1")


@contextmanager
def _facexlib_placeholder():
    """pulid.py imports two facexlib names at module level for face parsing, which the patch code never
    calls; without facexlib installed, empty placeholders stand in for the import only."""
    if importlib.util.find_spec("facexlib") is not None:
        yield
        return
    names = ["facexlib", "facexlib.parsing", "facexlib.utils", "facexlib.utils.face_restoration_helper"]
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    sys.modules["facexlib.parsing"].init_parsing_model = None
    sys.modules["facexlib.utils.face_restoration_helper"].FaceRestoreHelper = None
    try:
        yield
    finally:
        for name in names:
            sys.modules.pop(name, None)


def _pack_module(env: str, module: str):
    path = os.environ.get(env)
    if not path or not (Path(path) / f"{module}.py").is_file():
        pytest.skip(f"set {env} to a checkout of the pack to run this test")
    package = f"bolid_test_{env.lower()}"
    if package not in sys.modules:
        holder = types.ModuleType(package)
        holder.__path__ = [path]  # import the pack's modules without running its __init__ (node registration)
        sys.modules[package] = holder
    with _facexlib_placeholder():
        return importlib.import_module(f"{package}.{module}")


def _pack_patch(name: str):
    """(set_model_patch_replace, kwargs) for one pack, with tiny random K/V layers at module key "1"."""
    env, module_name, setter = PACKS[name]
    module = _pack_module(env, module_name)
    gen = torch.Generator().manual_seed(21)
    state_dict = {f"1.to_{x}_ip.weight": 0.3 * torch.randn(INNER, CONTEXT_DIM, generator=gen) for x in "kv"}
    cond = torch.randn(1, 4, CONTEXT_DIM, generator=gen)
    common = {"weight": 0.9, "cond": cond, "uncond": torch.zeros_like(cond), "mask": None,
              "sigma_start": 1e9, "sigma_end": 0.0, "module_key": "1"}
    if name == "IPAdapter_plus":
        proj = _pack_module(env, "image_proj_models").ImageProjModel(CONTEXT_DIM, 32, 4)
        ipadapter = module.IPAdapter({"image_proj": proj.state_dict(), "ip_adapter": state_dict},
                                     cross_attention_dim=CONTEXT_DIM, output_cross_attention_dim=CONTEXT_DIM,
                                     clip_embeddings_dim=32, clip_extra_context_tokens=4)
        kwargs = {**common, "ipadapter": ipadapter, "cond_alt": None, "weight_type": "linear",
                  "unfold_batch": False, "embeds_scaling": "V only"}
    elif name == "InstantID":
        kwargs = {**common, "ipadapter": types.SimpleNamespace(ip_layers=module.To_KV(state_dict)),
                  "cond_alt": None, "weight_type": "linear", "unfold_batch": False, "embeds_scaling": "V only"}
    else:
        kwargs = {**common, "pulid": types.SimpleNamespace(ip_layers=module.To_KV(state_dict)), "ortho": False,
                  "ortho_v2": False}
    return getattr(module, setter), kwargs


@pytest.fixture(scope="module")
def tiny_bolid(comfyui, pack):
    import comfy_tiny

    patcher, unet = comfy_tiny.tiny_comfy_sd15()
    config = adapter_config_for_unet(unet, body_dim=16, face_tokens=4, body_tokens=2)
    adapter = randomize_(init_adapter_from_unet(unet, config), std=0.15, seed=11).eval()
    loaded = pack.nodes.adapter_nodes.LoadedAdapter(adapter, "tiny")
    torch.manual_seed(3)
    body = pack.bolid.identity.BodyID(torch.randn(16))
    face = pack.bolid.identity.FaceEmbeds(torch.nn.functional.normalize(torch.randn(512), dim=0))

    def apply_bolid(model):
        node = pack.nodes.adapter_nodes.ApplyBoLIDAdapter()
        return node.apply(model, loaded, 0.8, 1.2, 0.0, 1.0, body_id=body, face_embeds=face)[0]

    return patcher, apply_bolid


@pytest.mark.parametrize("key", [("input", 1), ("input", 1, 0)], ids=["sd15-keys", "sdxl-keys"])
@pytest.mark.parametrize("order", ["bolid-first", "pack-first"])
@pytest.mark.parametrize("pack_name", list(PACKS))
def test_real_pack_and_bolid_both_act(tiny_bolid, pack_name, order, key):
    set_patch, kwargs = _pack_patch(pack_name)
    patcher, apply_bolid = tiny_bolid

    def with_pack(model):
        model = model.clone()
        set_patch(model, dict(kwargs), key)
        return model

    stacked = with_pack(apply_bolid(patcher)) if order == "bolid-first" else apply_bolid(with_pack(patcher))
    plain = _first_cross_attention(patcher)
    bolid = _first_cross_attention(apply_bolid(patcher)) - plain
    other = _first_cross_attention(with_pack(patcher)) - plain
    assert bolid.abs().max() > 1e-3 and other.abs().max() > 1e-3
    torch.testing.assert_close(_first_cross_attention(stacked), plain + bolid + other, atol=1e-5, rtol=1e-4)
