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
           adapter_file="tiny.safetensors", **inputs):
    loader = nodes.NODE_CLASS_MAPPINGS["BoLIDLoadAdapter"]()
    assert adapter_file in loader.INPUT_TYPES()["required"]["adapter_name"][0]
    (loaded,) = loader.load(adapter_file)
    module = type(loaded).__module__.rsplit(".", 2)[0]
    identity = __import__(f"{module}.bolid.identity", fromlist=["BodyID"])
    apply = nodes.NODE_CLASS_MAPPINGS["BoLIDApplyAdapter"]()
    (patched,) = apply.apply(patcher, loaded, weight_face, weight_body, start_at, end_at,
                             body_id=identity.BodyID(body[0]), face_embeds=identity.FaceEmbeds(face[0]), **inputs)
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
    layer_keys = [k for k in keys if len(k) == 3]
    assert len(layer_keys) == 17 and ("middle", 0, 1) in keys and ("output", 2, 1) in keys
    assert {k for k in keys if len(k) == 2} == {k[:2] for k in layer_keys}
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


def patch_state(patched):
    """The shared state of the registered layer patches (the outermost BoLID)."""
    patches = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    return next(p for key, p in patches.items() if len(key) == 3).state


def init_adapter_copy(patched):
    """The adapter module the patch actually uses (shared state of the registered patches)."""
    return patch_state(patched).adapter


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


def test_identity_kv_managed_counted_and_released_on_unload(comfy_nodes, tiny):
    import comfy.model_management as mm

    patcher, _, face, body = tiny
    patched = _apply(comfy_nodes, patcher, face, body, attn_mask=torch.ones(1, 32, 32))
    state = patch_state(patched)
    extra = patched.model_patches_models()
    assert {id(m) for m in extra} == {id(extra[0])} and extra[0].model is state.identity_kv
    kv_bytes = sum(p.numel() * p.element_size() for p in state.identity_kv.parameters())
    assert extra[0].model_size() == kv_bytes > 0, "ComfyUI's memory accounting sees the K/V"
    mm.load_models_gpu([patched])
    assert any(loaded.model is extra[0] for loaded in mm.current_loaded_models)
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    assert {p.device for p in state.identity_kv.parameters()} == {load_device}
    _sample(patched)
    assert state.device_tensors()
    # a resized mask left on another device (as after sampling on a GPU) must go when the model is unloaded
    state.spatial_mask("face", [1, 32, 8, 8], 2, 1, torch.device("meta"), torch.float32)
    mm.unload_all_models()
    assert not any(loaded.model is extra[0] for loaded in mm.current_loaded_models)
    assert {t.device for t in state.device_tensors()} == {offload_device}
    if load_device.type == "cuda":
        assert not any(t.is_cuda for t in state.device_tensors())


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


PRECISIONS = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_patched_model_samples_in_every_precision(comfy_nodes, tiny, precision, monkeypatch):
    """fp8 as ComfyUI's fp8 weight option stores it (computed in the manual-cast dtype), fp16 and bf16 UNets."""
    import comfy.cli_args
    import comfy.model_management as mm
    import comfy_tiny

    _, _, face, body = tiny
    weight_dtype = PRECISIONS[precision]
    manual_cast = mm.unet_manual_cast(weight_dtype, torch.device("cpu")) if precision.startswith("fp8") else None
    model = comfy_tiny.tiny_comfy_model(weight_dtype=weight_dtype, manual_cast_dtype=manual_cast)
    assert model.model.get_dtype() == weight_dtype
    if precision.startswith("fp8"):  # --fp8_e4m3fn-unet: what the adapter loader sees as ComfyUI's UNet dtype
        monkeypatch.setattr(comfy.cli_args.args, "fp8_e4m3fn_unet", True)
        assert mm.unet_dtype() == torch.float8_e4m3fn
    patched = _apply(comfy_nodes, model, face, body)
    state = patch_state(patched)
    assert {p.dtype for p in state.adapter.parameters()} <= {torch.float16, torch.bfloat16, torch.float32}
    assert {p.dtype for p in state.identity_kv.parameters()} == {manual_cast or weight_dtype}
    plain = _sample(model)
    active = _sample(patched)
    assert torch.isfinite(active).all()
    assert not torch.equal(active, plain)
    assert torch.equal(_sample(_apply(comfy_nodes, model, face, body, 0.0, 0.0)), plain)


def _errors_module(comfy_nodes):
    module = comfy_nodes.NODE_CLASS_MAPPINGS["BoLIDApplyAdapter"].__module__.rsplit(".", 2)[0]
    return __import__(f"{module}.bolid.errors", fromlist=["UnsupportedModelError"])


@pytest.mark.parametrize(("family", "config", "message"), [
    ("Flux", "TINY_FLUX", r"the model is Flux \(Flux\), not a UNet with SD1.5/SDXL cross-attention blocks"),
    ("SD3", "TINY_SD3", r"the model is SD3 \(OpenAISignatureMMDITWrapper\), not a UNet"),
    ("SD20", "TINY_SD2_UNET", r"the model is SD2.x \(SD20, text context 1024\); BoLID has no SD2 adapter"),
])
def test_other_families_refused_by_name(comfy_nodes, tiny, family, config, message):
    import comfy_tiny

    _, _, face, body = tiny
    model = comfy_tiny.tiny_comfy_model(family, getattr(comfy_tiny, config))
    with pytest.raises(_errors_module(comfy_nodes).UnsupportedModelError, match=message):
        _apply(comfy_nodes, model, face, body)


def _first_cross_attention(model, seed=5):
    """The first cross-attention layer's output (before to_out) for one forward of the model's UNet: at this
    layer every model variant sees the same input, so differences are the patches' own."""
    torch.manual_seed(seed)
    x, ctx, t = torch.randn(2, 4, 16, 16), torch.randn(2, 7, CONTEXT_DIM), torch.full((2,), 500.0)
    options = dict(copy.copy(model.model_options["transformer_options"]), cond_or_uncond=[1, 0],
                   sigmas=torch.full((2,), 3.0))
    unet = model.model.diffusion_model
    captured = []
    handle = unet.input_blocks[1][1].transformer_blocks[0].attn2.to_out.register_forward_pre_hook(
        lambda module, args: captured.append(args[0]))
    try:
        with torch.no_grad():
            unet(x, timesteps=t, context=ctx, transformer_options=options)
    finally:
        handle.remove()
    return captured[0]  # [2, 16*16, inner]


def test_two_identities_with_disjoint_masks_act_only_inside_them(comfy_nodes, tiny):
    """Two Apply nodes on one model, left and right half: each identity acts only inside its mask (the
    first one through the per-branch masks, the second through attn_mask)."""
    patcher, _, face, body = tiny
    torch.manual_seed(8)
    face_b, body_b = torch.nn.functional.normalize(torch.randn(1, 512), dim=-1), torch.randn(1, BODY_DIM)
    left = torch.zeros(1, 32, 32)
    left[..., :16] = 1.0
    both = _apply(comfy_nodes, _apply(comfy_nodes, patcher, face, body, attn_mask_face=left, attn_mask_body=left),
                  face_b, body_b, attn_mask=1.0 - left)
    out = _first_cross_attention(both)
    only_a = _first_cross_attention(_apply(comfy_nodes, patcher, face, body))
    only_b = _first_cross_attention(_apply(comfy_nodes, patcher, face_b, body_b))
    plain = _first_cross_attention(patcher)
    in_left = (torch.arange(16 * 16) % 16) < 8
    torch.testing.assert_close(out[:, in_left], only_a[:, in_left], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, ~in_left], only_b[:, ~in_left], atol=1e-5, rtol=1e-5)
    assert (only_a - plain).abs().max() > 1e-3 and (only_a - only_b)[:, in_left].abs().max() > 1e-3
    assert torch.isfinite(_sample(both)).all()
