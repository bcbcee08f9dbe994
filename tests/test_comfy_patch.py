"""The ComfyUI attn2 patch against the diffusers path, per cond_or_uncond layout; schedule, mask, wrapping."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_unets import CTX, randomize_, tiny_sd15_unet

from bolid.diffusers_integration import (
    BoLIDAttnProcessor,
    BoLIDDiffusers,
    adapter_config_for_unet,
    cross_attention_modules,
    init_adapter_from_unet,
)

BODY_DIM = 16
LAYOUTS = [[1, 0], [0], [1], [1, 0, 0]]


@pytest.fixture(scope="module")
def setup():
    unet = tiny_sd15_unet()
    config = adapter_config_for_unet(unet, body_dim=BODY_DIM, face_tokens=4, body_tokens=2)
    adapter = randomize_(init_adapter_from_unet(unet, config), seed=7).eval()
    torch.manual_seed(0)
    face = torch.nn.functional.normalize(torch.randn(1, 512), dim=-1)
    body = torch.randn(1, BODY_DIM)
    return unet, adapter, face, body


def _state(pack, adapter, face, body, **kw):
    patch_mod = pack.nodes.comfy_patch
    args = {"adapter": adapter, "embeds": {"face": face, "body": body}, "weights": {"face": 0.8, "body": 1.2}}
    args.update(kw)
    return patch_mod.BoLIDPatchState(**args)


def _qkv(attn, batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 12, attn.to_q.weight.shape[1], generator=gen)
    ctx = torch.randn(batch, 5, CTX, generator=gen)
    return x, ctx, attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)


def _options(attn, layout, sigma=5.0, **extra):
    return {"n_heads": attn.heads, "dim_head": attn.to_q.weight.shape[0] // attn.heads, "attn_precision": None,
            "cond_or_uncond": layout, "sigmas": torch.tensor([sigma]), **extra}


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("layer", [0, 7, 15])
def test_patch_equals_diffusers_path(pack, setup, layout, layer):
    unet, adapter, face, body = setup
    _, attn = cross_attention_modules(unet)[layer]
    per_chunk = 2
    batch = per_chunk * len(layout)
    x, ctx, q, k, v = _qkv(attn, batch)
    # diffusers reference: cond rows carry the identity, uncond rows the zero embedding
    rows = torch.tensor(layout).repeat_interleave(per_chunk)
    controller = BoLIDDiffusers(unet, adapter, weight_face=0.8, weight_body=1.2)
    controller.set_identity(torch.where(rows[:, None] == 0, face, 0.0), torch.where(rows[:, None] == 0, body, 0.0))
    with torch.no_grad():
        expected = BoLIDAttnProcessor(controller, layer)(attn, x, ctx)
        patch = pack.nodes.comfy_patch.BoLIDAttn2Patch(_state(pack, adapter, face, body), layer)
        ours = attn.to_out[0](patch(q, k, v, _options(attn, layout)))
    assert (ours - expected).abs().max().item() <= 1e-5


def _unpatched(attn, q, k, v):
    from bolid.attention import sdpa_attention

    return sdpa_attention(q, k, v, attn.heads)


@pytest.mark.parametrize(
    ("weights", "sigma"), [({"face": 0.0, "body": 0.0}, 5.0), ({"face": 1.0, "body": 1.0}, 50.0),
                           ({"face": 1.0, "body": 1.0}, 0.5)], ids=["weights-0", "above-start", "below-end"])
def test_inactive_is_bit_identical(pack, setup, weights, sigma):
    unet, adapter, face, body = setup
    _, attn = cross_attention_modules(unet)[3]
    _, _, q, k, v = _qkv(attn, 2)
    state = _state(pack, adapter, face, body, weights=weights, sigma_start=10.0, sigma_end=1.0)
    with torch.no_grad():
        out = pack.nodes.comfy_patch.BoLIDAttn2Patch(state, 3)(q, k, v, _options(attn, [1, 0], sigma=sigma))
        assert torch.equal(out, _unpatched(attn, q, k, v))
        active = pack.nodes.comfy_patch.BoLIDAttn2Patch(_state(pack, adapter, face, body, sigma_start=10.0,
                                                               sigma_end=1.0), 3)
        assert not torch.equal(active(q, k, v, _options(attn, [1, 0], sigma=5.0)), out)


def test_kv_computed_once_and_expanded_not_copied(pack, setup):
    unet, adapter, face, body = setup
    _, attn = cross_attention_modules(unet)[0]
    _, _, q, k, v = _qkv(attn, 2)
    calls = []
    handle = adapter.face_proj.register_forward_hook(lambda *a: calls.append(1))
    try:
        state = _state(pack, adapter, face, body)
        patch = pack.nodes.comfy_patch.BoLIDAttn2Patch(state, 0)
        with torch.no_grad():
            first = patch(q, k, v, _options(attn, [1, 0]))
            second = patch(q, k, v, _options(attn, [1, 0]))
            patch(q, k, v, _options(attn, [0]))
    finally:
        handle.remove()
    assert torch.equal(first, second)
    assert len(calls) == 1, "the face tokens are projected once, when the state is made"
    # the state keeps two rows (cond, uncond) per layer and branch, whatever batch layouts were sampled
    tokens = {"face": adapter.config.face_tokens, "body": adapter.config.body_tokens}
    expected = sum(2 * 2 * tokens[b] * h for b in ("face", "body") for h in adapter.config.hidden_sizes)
    assert sum(t.numel() for t in state.device_tensors()) == expected
    # a uniform layout is a view of the stored row: no per-batch copy
    param = state.identity_kv.kv["face_0"]
    key, value = state.identity_kv.batch(0, "face", (0, 0, 0), 4, param.device, param.dtype)
    assert key.shape[0] == 12 and key.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()
    assert key.stride(0) == 0 and torch.equal(key[5], param[0, 0]) and torch.equal(value[11], param[1, 0])
    key, _ = state.identity_kv.batch(0, "face", (1, 0), 2, param.device, param.dtype)
    assert torch.equal(key[1], param[0, 1]) and torch.equal(key[2], param[0, 0])


def test_identity_kv_never_stored_in_fp8(pack, setup):
    _, adapter, face, body = setup
    for dtype, expected in [(torch.float8_e4m3fn, torch.float32), (torch.bfloat16, torch.bfloat16),
                            (torch.float16, torch.float16), (None, torch.float32)]:
        state = _state(pack, adapter, face, body, kv_dtype=dtype)
        assert {p.dtype for p in state.identity_kv.parameters()} == {expected}
    assert pack.nodes.comfy_layers.compute_dtype(torch.float8_e5m2) == torch.float32


def test_mask_resized_from_activations_shape(pack, setup):
    unet, adapter, face, body = setup
    _, attn = cross_attention_modules(unet)[0]
    h, w = 3, 4  # odd aspect ratio: 12 tokens
    _, _, q, k, v = _qkv(attn, 2)
    mask = torch.zeros(1, 30, 40)
    mask[:, :, :20] = 1.0  # left half
    state = _state(pack, adapter, face, body, mask=mask)
    opts = _options(attn, [1, 0], activations_shape=[2, 8, h, w])
    with torch.no_grad():
        masked = pack.nodes.comfy_patch.BoLIDAttn2Patch(state, 0)(q, k, v, opts)
        full = pack.nodes.comfy_patch.BoLIDAttn2Patch(_state(pack, adapter, face, body), 0)(q, k, v, opts)
    base = _unpatched(attn, q, k, v)
    tokens = torch.arange(h * w)
    left = (tokens % w) < w // 2
    assert torch.allclose(masked[:, left], full[:, left], atol=1e-6)
    assert torch.allclose(masked[:, ~left], base[:, ~left], atol=1e-6)
    assert not torch.allclose(full[:, ~left], base[:, ~left], atol=1e-4)


def test_wraps_foreign_patch_and_deepcopy_shares_weights(pack, setup):
    unet, adapter, face, body = setup
    _, attn = cross_attention_modules(unet)[2]
    _, _, q, k, v = _qkv(attn, 2)

    class Foreign:
        def __init__(self):
            self.calls = 0

        def __call__(self, q, k, v, extra_options):
            self.calls += 1
            return torch.zeros_like(q)

    foreign = Foreign()
    patch = pack.nodes.comfy_patch.BoLIDAttn2Patch(_state(pack, adapter, face, body), 2, foreign)
    clone = copy.deepcopy({"p": patch})["p"]
    assert clone.state is patch.state and clone.state.adapter is adapter
    assert clone.wrapped is not foreign and isinstance(clone.wrapped, Foreign)
    with torch.no_grad():
        out = patch(q, k, v, _options(attn, [1, 0]))
        only_branches = pack.nodes.comfy_patch.BoLIDAttn2Patch(_state(pack, adapter, face, body), 2)
        expected = only_branches(q, k, v, _options(attn, [1, 0])) - _unpatched(attn, q, k, v)
    assert foreign.calls == 1
    assert torch.allclose(out, expected, atol=1e-5)


def test_layer_order_maps_comfy_blocks_to_diffusers_order(pack):
    layers = [pack.nodes.comfy_layers.ComfyLayer(key, 8, 32) for key in
              [("input", 1, 0), ("input", 2, 0), ("middle", 0, 0), ("middle", 0, 1), ("output", 3, 0)]]
    ordered = pack.nodes.comfy_layers.adapter_layer_order(layers)
    assert [layer.key for layer in ordered] == [("input", 1, 0), ("input", 2, 0), ("output", 3, 0),
                                                ("middle", 0, 0), ("middle", 0, 1)]


def _mask_patch(pack, adapter, face, body, **kw):
    return pack.nodes.comfy_patch.BoLIDAttn2Patch(_state(pack, adapter, face, body, **kw), 0)


@pytest.mark.parametrize("layout", [[1, 0], [0], [1]], ids=str)
def test_mask_batch_rule_is_the_same_whatever_the_cond_batching(pack, setup, layout):
    """One mask, or one per latent; two masks for one latent fail the same way batched or not."""
    unet, adapter, face, body = setup
    errors = pack.bolid.errors
    _, attn = cross_attention_modules(unet)[0]
    left = torch.zeros(2, 6, 8)
    left[0, :, :4] = 1.0
    left[1, :, 4:] = 1.0  # latent 0: left half, latent 1: right half
    opts = _options(attn, layout, activations_shape=[2, 8, 3, 4])
    with torch.no_grad():
        _, _, q, k, v = _qkv(attn, len(layout))  # one latent
        with pytest.raises(errors.MaskError, match=r"attn_mask is a batch of 2 masks and the latent batch is 1"):
            _mask_patch(pack, adapter, face, body, mask=left)(q, k, v, opts)
        _, _, q, k, v = _qkv(attn, 2 * len(layout))  # two latents: mask row i for latent i, in cond and uncond
        per_latent = _mask_patch(pack, adapter, face, body, mask=left)(q, k, v, opts)
        for row in range(2 * len(layout)):
            one = _mask_patch(pack, adapter, face, body, mask=left[row % 2])
            single = one(q[row:row + 1], k[row:row + 1], v[row:row + 1],
                         _options(attn, [layout[row // 2]], activations_shape=[1, 8, 3, 4]))
            torch.testing.assert_close(per_latent[row:row + 1], single, atol=1e-6, rtol=1e-6)


def test_mask_shapes_accepted_or_refused_clearly(pack, setup):
    unet, adapter, face, body = setup
    errors = pack.bolid.errors
    _, attn = cross_attention_modules(unet)[0]
    _, _, q, k, v = _qkv(attn, 4)
    opts = _options(attn, [1, 0], activations_shape=[4, 8, 3, 4])
    masks = torch.rand(2, 6, 8)
    with torch.no_grad():
        three_d = _mask_patch(pack, adapter, face, body, mask=masks)(q, k, v, opts)
        four_d = _mask_patch(pack, adapter, face, body, mask=masks[:, None])(q, k, v, opts)  # [B, 1, H, W], B > 1
    assert torch.equal(three_d, four_d)
    for bad, message in [(torch.rand(1, 3, 6, 8), r"shape \[1, 3, 6, 8\]; expected a MASK"),
                         (torch.rand(6), r"shape \[6\]"), (torch.rand(0, 6, 8), "is empty"),
                         (torch.full((6, 8), float("nan")), "NaN")]:
        with pytest.raises(errors.MaskError, match=message):
            _state(pack, adapter, face, body, branch_masks={"body": bad})


def test_moving_patches_drops_masks_held_on_another_device(pack, setup):
    _, adapter, face, body = setup
    state = _state(pack, adapter, face, body, mask=torch.ones(1, 6, 8))
    state.spatial_mask("face", [1, 8, 3, 4], 2, 1, torch.device("meta"), torch.float32)
    state.spatial_mask("face", [1, 8, 3, 4], 2, 1, torch.device("cpu"), torch.float32)
    assert {t.device.type for t in state.device_tensors()} == {"cpu", "meta"}
    pack.nodes.comfy_patch.BoLIDAttn2Patch(state, 0).to(torch.device("cpu"))  # ComfyUI: model_patches_to(offload)
    assert {t.device.type for t in state.device_tensors()} == {"cpu"}


def test_attention_signature_detection(pack):
    patch_mod = pack.nodes.comfy_patch

    def old(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False):
        return q

    def new(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, **kwargs):
        return q

    def newer(q, k, v, heads, mask=None, attn_precision=None, preferred_attention=None, transformer_options=None):
        return q

    options = {"attn_precision": torch.float32, "n_heads": 2, "preferred_attention": "sage", "mask": "no"}
    assert patch_mod.attention_kwargs(patch_mod.describe_attention(old), options) == {"attn_precision": torch.float32}
    assert patch_mod.attention_kwargs(patch_mod.describe_attention(new), options) == {
        "attn_precision": torch.float32, "transformer_options": options}
    assert patch_mod.attention_kwargs(patch_mod.describe_attention(newer), options) == {
        "attn_precision": torch.float32, "transformer_options": options, "preferred_attention": "sage"}


def _stand_in_model(pack, diffusion_model, family):
    """A ModelPatcher stand-in whose model_config class is named like ComfyUI's for ``family``."""
    from stacking_standin import StandInModelPatcher

    return StandInModelPatcher(diffusion_model, family)


def test_unsupported_families_are_refused_by_name(pack):
    from test_adapter_nodes import _transformer

    errors = pack.bolid.errors
    flux = type("Flux", (torch.nn.Module,), {})()
    flux.double_blocks = torch.nn.ModuleList()
    with pytest.raises(errors.UnsupportedModelError, match=r"the model is Flux \(Flux\), not a UNet with SD1.5/SDXL"):
        pack.nodes.comfy_layers.supported_cross_attention_layers(_stand_in_model(pack, flux, "Flux"))
    with torch.device("meta"):
        sd2 = torch.nn.Module()
        sd2.input_blocks = torch.nn.ModuleList([torch.nn.Sequential(_transformer(320, ctx=1024))])
        sd2.middle_block = torch.nn.Sequential(_transformer(1280, ctx=1024))
        sd2.output_blocks = torch.nn.ModuleList()
    with pytest.raises(errors.UnsupportedModelError, match=r"the model is SD2.x \(SD20, text context 1024\)"):
        pack.nodes.comfy_layers.supported_cross_attention_layers(_stand_in_model(pack, sd2, "SD20"))
    video = type("VideoUNet", (torch.nn.Module,), {})()
    video.input_blocks, video.middle_block, video.output_blocks = sd2.input_blocks, sd2.middle_block, sd2.output_blocks
    with pytest.raises(errors.UnsupportedModelError, match=r"SVD_img2vid \(VideoUNet\), a video UNet"):
        pack.nodes.comfy_layers.supported_cross_attention_layers(_stand_in_model(pack, video, "SVD_img2vid"))
