"""BoLID inside a real ComfyUI (COMFYUI_PATH): the pack loads as a custom node, the patch matches the diffusers
path through ComfyUI's own UNet, and ComfyUI's own sampler reproduces a diffusers-computed reference."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch
from comfy_tiny import CONTEXT_DIM
from conftest import REPO_ROOT
from tiny_unets import randomize_

from bolid.adapter_io import save_adapter
from bolid.config import AdapterConfig
from bolid.diffusers_integration import BoLIDDiffusers, adapter_config_for_unet, init_adapter_from_unet
from bolid.errors import AdapterMismatchError

pytestmark = pytest.mark.comfyui
BODY_DIM = 16


@pytest.fixture(scope="module")
def comfy_nodes(comfyui, tmp_path_factory):
    """ComfyUI's ``nodes`` module with this repository loaded by ComfyUI's own custom-node loader."""
    import comfy_tiny

    comfy_tiny.use_cpu()
    import folder_paths

    import nodes

    extra = tmp_path_factory.mktemp("extra_bolid")
    folder_paths.add_model_folder_path("bolid", str(extra))  # as extra_model_paths.yaml would
    assert asyncio.run(nodes.load_custom_node(str(REPO_ROOT))) is True
    assert "BoLIDApplyAdapter" in nodes.NODE_CLASS_MAPPINGS
    nodes.bolid_extra_folder = extra
    return nodes


@pytest.fixture(scope="module")
def tiny(comfy_nodes):
    import comfy_tiny

    patcher, unet = comfy_tiny.tiny_comfy_sd15()
    config = adapter_config_for_unet(unet, body_dim=BODY_DIM, face_tokens=4, body_tokens=2)
    adapter = randomize_(init_adapter_from_unet(unet, config), std=0.15, seed=11).eval()
    save_adapter(adapter, comfy_nodes.bolid_extra_folder / "tiny.safetensors")
    torch.manual_seed(3)
    face = torch.nn.functional.normalize(torch.randn(1, 512), dim=-1)
    body = torch.randn(1, BODY_DIM)
    return patcher, unet, face, body


def _apply(nodes, patcher, face, body, weight_face=0.8, weight_body=1.2, start_at=0.0, end_at=1.0,
           adapter_file="tiny.safetensors"):
    loader = nodes.NODE_CLASS_MAPPINGS["BoLIDLoadAdapter"]()
    assert adapter_file in loader.INPUT_TYPES()["required"]["adapter_name"][0]
    (loaded,) = loader.load(adapter_file)
    module = type(loaded).__module__.rsplit(".", 2)[0]
    identity = __import__(f"{module}.bolid.identity", fromlist=["BodyID"])
    apply = nodes.NODE_CLASS_MAPPINGS["BoLIDApplyAdapter"]()
    (patched,) = apply.apply(patcher, loaded, weight_face, weight_body, start_at, end_at,
                             body_id=identity.BodyID(body[0]), face_embeds=identity.FaceEmbeds(face[0]))
    return patched


def _rows(layout, per_chunk, face, body):
    rows = torch.tensor(layout).repeat_interleave(per_chunk)[:, None]
    return torch.where(rows == 0, face, 0.0), torch.where(rows == 0, body, 0.0)


def test_pack_folder_keeps_extra_model_paths(comfy_nodes):
    import folder_paths

    paths = folder_paths.get_folder_paths("bolid")
    assert str(comfy_nodes.bolid_extra_folder) in paths
    assert any(p.endswith("bolid") and p != str(comfy_nodes.bolid_extra_folder) for p in paths)


@pytest.mark.parametrize("layout", [[1, 0], [0], [1, 0, 0]], ids=str)
def test_comfy_unet_with_patch_equals_diffusers(comfy_nodes, tiny, layout):
    patcher, unet, face, body = tiny
    patched = _apply(comfy_nodes, patcher, face, body)
    per_chunk = 1
    batch = per_chunk * len(layout)
    torch.manual_seed(0)
    x, ctx = torch.randn(batch, 4, 16, 16), torch.randn(batch, 7, CONTEXT_DIM)
    t = torch.full((batch,), 400.0)
    options = copy.copy(patched.model_options["transformer_options"])
    options.update(cond_or_uncond=layout, sigmas=torch.full((batch,), 2.0))
    controller = BoLIDDiffusers.attach(unet, init_adapter_copy(patched), 0.8, 1.2)
    controller.set_identity(*_rows(layout, per_chunk, face, body))
    with torch.no_grad():
        ours = patched.model.diffusion_model(x, timesteps=t, context=ctx, transformer_options=options)
        expected = unet(x, t, encoder_hidden_states=ctx).sample
        plain = patcher.model.diffusion_model(x, timesteps=t, context=ctx, transformer_options={})
    controller.detach()
    assert (ours - expected).abs().max().item() <= 1e-5
    assert (ours - plain).abs().max().item() > 1e-3


def test_sdxl_layout_layers_map_like_diffusers(comfy_nodes):
    """SDXL's layout (several transformer layers per block, multi-layer middle) through ComfyUI's real UNet."""
    import comfy_tiny

    patcher, unet = comfy_tiny.tiny_comfy_sdxl_layout()
    config = adapter_config_for_unet(unet, body_dim=BODY_DIM, face_tokens=2, body_tokens=3)
    save_adapter(randomize_(init_adapter_from_unet(unet, config), std=0.15, seed=12),
                 comfy_nodes.bolid_extra_folder / "tiny_sdxl.safetensors")
    torch.manual_seed(4)
    face, body = torch.nn.functional.normalize(torch.randn(1, 512), dim=-1), torch.randn(1, BODY_DIM)
    patched = _apply(comfy_nodes, patcher, face, body, adapter_file="tiny_sdxl.safetensors")
    keys = sorted(patched.model_options["transformer_options"]["patches_replace"]["attn2"])
    assert len(keys) == 17 and ("middle", 0, 1) in keys and ("output", 2, 1) in keys
    layout = [1, 0]
    x, ctx, t = torch.randn(2, 4, 16, 16), torch.randn(2, 7, CONTEXT_DIM), torch.full((2,), 300.0)
    options = dict(patched.model_options["transformer_options"], cond_or_uncond=layout,
                   sigmas=torch.full((2,), 2.0))
    controller = BoLIDDiffusers.attach(unet, init_adapter_copy(patched), 0.8, 1.2)
    controller.set_identity(*_rows(layout, 1, face, body))
    with torch.no_grad():
        ours = patched.model.diffusion_model(x, timesteps=t, context=ctx, transformer_options=options)
        expected = unet(x, t, encoder_hidden_states=ctx).sample
        plain = patcher.model.diffusion_model(x, timesteps=t, context=ctx, transformer_options={})
    controller.detach()
    assert (ours - expected).abs().max().item() <= 1e-4 * max(1.0, expected.abs().max().item())
    assert (ours - plain).abs().max().item() > 1e-3


def init_adapter_copy(patched):
    """The adapter module the patch actually uses (shared state of the registered patches)."""
    patches = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    return next(iter(patches.values())).state.adapter


def _sample(model, seed=0, steps=3):
    import comfy.sample

    torch.manual_seed(99)
    pos, neg = torch.randn(1, 7, CONTEXT_DIM), torch.randn(1, 7, CONTEXT_DIM)
    latent = torch.zeros(1, 4, 16, 16)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, 3.0, "euler", "normal", [[pos, {}]], [[neg, {}]], latent,
                               disable_pbar=True, seed=seed)


def test_comfy_sampling_matches_diffusers_reference(comfy_nodes, tiny):
    patcher, unet, face, body = tiny
    patched = _apply(comfy_nodes, patcher, face, body)
    ours = _sample(patched)

    controller = BoLIDDiffusers.attach(unet, init_adapter_copy(patched), 0.8, 1.2)
    sampling = patcher.get_model_object("model_sampling")

    def diffusers_model(apply_model, args):
        x, sigma, layout = args["input"], args["timestep"], args["cond_or_uncond"]
        controller.set_identity(*_rows(layout, x.shape[0] // len(layout), face, body))
        xc = sampling.calculate_input(sigma, x)
        out = unet(xc, sampling.timestep(sigma).float(), encoder_hidden_states=args["c"]["c_crossattn"]).sample
        return sampling.calculate_denoised(sigma, out, x)

    reference_model = patcher.clone()
    reference_model.set_model_unet_function_wrapper(diffusers_model)
    with torch.no_grad():
        reference = _sample(reference_model)
    controller.detach()
    plain = _sample(patcher)
    assert (ours - reference).abs().max().item() <= 1e-4 * max(1.0, reference.abs().max().item())
    assert (ours - plain).abs().max().item() > 1e-3


def test_zero_weights_and_empty_range_are_bit_identical(comfy_nodes, tiny):
    patcher, _, face, body = tiny
    plain = _sample(patcher)
    assert torch.equal(_sample(_apply(comfy_nodes, patcher, face, body, 0.0, 0.0)), plain)
    # a window between the first two sampled sigmas: the patch is registered but never active
    between_steps = _sample(_apply(comfy_nodes, patcher, face, body, start_at=0.001, end_at=0.01))
    assert torch.equal(between_steps, plain)
    first_step_only = _sample(_apply(comfy_nodes, patcher, face, body, start_at=0.0, end_at=0.01))
    assert not torch.equal(first_step_only, plain)


def test_adapter_registered_with_memory_manager(comfy_nodes, tiny):
    import comfy.model_management as mm

    patcher, _, face, body = tiny
    patched = _apply(comfy_nodes, patcher, face, body)
    extra = patched.model_patches_models()
    assert {id(m) for m in extra} == {id(extra[0])} and extra[0].model is init_adapter_copy(patched)
    mm.load_models_gpu([patched])
    assert any(loaded.model is extra[0] for loaded in mm.current_loaded_models)


def test_wrong_family_is_named_at_apply_time(comfy_nodes, tiny):
    import types

    patcher, _, face, body = tiny
    sdxl = AdapterConfig(context_dim=2048, hidden_sizes=(640,) * 4 + (1280,) * 66, body_dim=BODY_DIM)
    apply_cls = comfy_nodes.NODE_CLASS_MAPPINGS["BoLIDApplyAdapter"]
    module = apply_cls.__module__.rsplit(".", 2)[0]
    nodes_mod = __import__(f"{module}.nodes.adapter_nodes", fromlist=["LoadedAdapter"])
    identity = __import__(f"{module}.bolid.identity", fromlist=["BodyID"])
    errors = __import__(f"{module}.bolid.errors", fromlist=["AdapterMismatchError"])
    loaded = nodes_mod.LoadedAdapter(types.SimpleNamespace(config=sdxl), "sdxl")  # the check reads only the config
    with pytest.raises(errors.AdapterMismatchError, match=r"adapter is SDXL \(70 layers, ctx 2048\), model is "
                                                          r"custom \(16 layers, ctx 64\)"):
        apply_cls().apply(patcher, loaded, 1.0, 1.0, 0.0, 1.0, body_id=identity.BodyID(body[0]))
    assert AdapterMismatchError is not errors.AdapterMismatchError  # two copies: top-level and as loaded by ComfyUI
