"""BoLID stacked with another identity/style adapter pack on one model (CI stand-in of the packs' protocol):
both orders, both key styles, BoLID active or not; and two BoLID identities in disjoint regions."""

from __future__ import annotations

import pytest
import torch
from stacking_standin import StandInModelPatcher, call_attn2, extra_tokens_attention, stack_patch
from test_adapter_nodes import SD15_ADAPTER_SIZES, fake_sd15_unet
from tiny_unets import randomize_

from bolid.adapter import BoLIDAdapter
from bolid.attention import sdpa_attention
from bolid.config import AdapterConfig

HEADS, HIDDEN, BODY_DIM = 8, 320, 32
BLOCK, INDEX = ("input", 1), 0  # SD1.5's first cross-attention layer (inner dim 320)


@pytest.fixture(scope="module")
def adapter():
    config = AdapterConfig(context_dim=768, hidden_sizes=SD15_ADAPTER_SIZES, body_dim=BODY_DIM)
    return randomize_(BoLIDAdapter(config), std=0.05, seed=5).eval()


def _identity(seed):
    gen = torch.Generator().manual_seed(seed)
    return {"face": torch.nn.functional.normalize(torch.randn(1, 512, generator=gen), dim=-1),
            "body": torch.randn(1, BODY_DIM, generator=gen)}


def _apply_bolid(pack, model, adapter, weights=(0.8, 1.2), seed=0, **state_kw):
    patch_mod = pack.nodes.comfy_patch
    state = patch_mod.BoLIDPatchState(adapter=adapter, embeds=_identity(seed),
                                      weights={"face": weights[0], "body": weights[1]}, **state_kw)
    layers = pack.nodes.comfy_layers
    ordered = layers.check_adapter_fits(adapter.config, layers.supported_cross_attention_layers(model))
    return patch_mod.register_patches(model, state, ordered)


def _tensors(batch=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 12, HIDDEN, generator=gen)
    k, v = torch.randn(batch, 7, HIDDEN, generator=gen), torch.randn(batch, 7, HIDDEN, generator=gen)
    return q, k, v


def _options(**extra):
    return {"n_heads": HEADS, "dim_head": HIDDEN // HEADS, "attn_precision": None, "cond_or_uncond": [1, 0],
            "sigmas": torch.tensor([5.0]), "activations_shape": [2, HIDDEN, 3, 4], **extra}


def _standin_kwargs(seed=2, weight=0.7, sigma_start=1e9, sigma_end=0.0):
    gen = torch.Generator().manual_seed(seed)
    return {"tokens_k": torch.randn(1, 3, HIDDEN, generator=gen), "tokens_v": torch.randn(1, 3, HIDDEN, generator=gen),
            "weight": weight, "sigma_start": sigma_start, "sigma_end": sigma_end}


@pytest.mark.parametrize("active", [True, False], ids=["bolid-active", "bolid-weight-0"])
@pytest.mark.parametrize("key", [BLOCK, (*BLOCK, INDEX)], ids=["sd15-keys", "sdxl-keys"])
@pytest.mark.parametrize("order", ["bolid-first", "pack-first"])
def test_both_contributions_present(pack, adapter, order, key, active):
    weights = (0.8, 1.2) if active else (0.0, 0.0)
    kwargs = _standin_kwargs()
    model = StandInModelPatcher(fake_sd15_unet())
    if order == "bolid-first":
        stacked = _apply_bolid(pack, model, adapter, weights).clone()
        stack_patch(stacked, kwargs, key)
    else:
        first = model.clone()
        stack_patch(first, kwargs, key)
        stacked = _apply_bolid(pack, first, adapter, weights)
    q, k, v = _tensors()
    with torch.no_grad():
        out = call_attn2(stacked, BLOCK, INDEX, q, k, v, _options())
        base = sdpa_attention(q, k, v, HEADS)
        bolid = call_attn2(_apply_bolid(pack, model, adapter, weights), BLOCK, INDEX, q, k, v, _options()) - base
        standin = extra_tokens_attention(base, q, k, v, _options(), **kwargs)
    assert standin.abs().mean() > 1e-2
    assert (bolid.abs().mean() > 1e-3) == active
    torch.testing.assert_close(out, base + bolid + standin, atol=1e-5, rtol=1e-5)


def test_stacked_callback_keeps_its_own_schedule_and_clones_stay_apart(pack, adapter):
    model = _apply_bolid(pack, StandInModelPatcher(fake_sd15_unet()), adapter)
    late = model.clone()
    stack_patch(late, _standin_kwargs(sigma_start=2.0, sigma_end=1.0), BLOCK)  # not active at sigma 5
    q, k, v = _tensors()
    with torch.no_grad():
        assert torch.equal(call_attn2(late, BLOCK, INDEX, q, k, v, _options()),
                           call_attn2(model, BLOCK, INDEX, q, k, v, _options()))
        inside = call_attn2(late, BLOCK, INDEX, q, k, v, _options(sigmas=torch.tensor([1.5])))
        assert not torch.equal(inside, call_attn2(model, BLOCK, INDEX, q, k, v, _options(sigmas=torch.tensor([1.5]))))
    patches = model.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert patches[(*BLOCK, INDEX)].callback == [], "stacking on a clone leaves the source model alone"


def test_block_key_add_reaches_every_layer_of_the_block(pack, adapter):
    patch_mod = pack.nodes.comfy_patch
    state = patch_mod.BoLIDPatchState(adapter=adapter, embeds=_identity(0), weights={"face": 1.0, "body": 1.0})
    layers = {0: patch_mod.BoLIDAttn2Patch(state, 0), 1: patch_mod.BoLIDAttn2Patch(state, 0)}
    patch_mod.BoLIDBlockPatch(layers).add(extra_tokens_attention, **_standin_kwargs())
    assert all(len(p.callback) == 1 for p in layers.values())


def test_two_identities_in_disjoint_regions(pack, adapter):
    """Two Apply nodes on one model, left and right masks: each identity acts only inside its own mask."""
    h, w = 3, 4
    left = torch.zeros(1, 30, 40)
    left[..., :20] = 1.0
    right = 1.0 - left
    model = StandInModelPatcher(fake_sd15_unet())
    both = _apply_bolid(pack, _apply_bolid(pack, model, adapter, seed=0, mask=left), adapter, seed=1, mask=right)
    q, k, v = _tensors()
    with torch.no_grad():
        out = call_attn2(both, BLOCK, INDEX, q, k, v, _options())
        only_a = call_attn2(_apply_bolid(pack, model, adapter, seed=0), BLOCK, INDEX, q, k, v, _options())
        only_b = call_attn2(_apply_bolid(pack, model, adapter, seed=1), BLOCK, INDEX, q, k, v, _options())
    in_left = (torch.arange(h * w) % w) < w // 2
    torch.testing.assert_close(out[:, in_left], only_a[:, in_left], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, ~in_left], only_b[:, ~in_left], atol=1e-5, rtol=1e-5)
    assert (only_a - only_b)[:, in_left].abs().max() > 1e-3


def test_face_and_body_masks_act_separately(pack, adapter):
    h, w = 3, 4
    left = torch.zeros(30, 40)  # [H, W] is accepted too
    left[:, :20] = 1.0
    model = StandInModelPatcher(fake_sd15_unet())
    q, k, v = _tensors()
    with torch.no_grad():
        split = call_attn2(_apply_bolid(pack, model, adapter, branch_masks={"face": left, "body": 1.0 - left}),
                           BLOCK, INDEX, q, k, v, _options())
        face_only = call_attn2(_apply_bolid(pack, model, adapter, (0.8, 0.0)), BLOCK, INDEX, q, k, v, _options())
        body_only = call_attn2(_apply_bolid(pack, model, adapter, (0.0, 1.2)), BLOCK, INDEX, q, k, v, _options())
        # attn_mask still covers a branch without its own mask
        shared = call_attn2(_apply_bolid(pack, model, adapter, mask=1.0 - left, branch_masks={"face": left}),
                            BLOCK, INDEX, q, k, v, _options())
    in_left = (torch.arange(h * w) % w) < w // 2
    torch.testing.assert_close(split[:, in_left], face_only[:, in_left], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split[:, ~in_left], body_only[:, ~in_left], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared, split, atol=1e-6, rtol=1e-6)
