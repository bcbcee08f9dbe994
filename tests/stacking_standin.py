"""A stand-in for the attention-patch stacking protocol of ComfyUI_IPAdapter_plus, PuLID_ComfyUI and
ComfyUI_InstantID, written here from its observable contract so that CI tests it without those packs:

- a pack registers at a ``patches_replace["attn2"]`` key; if an object is already there it calls
  ``existing.add(callback, **kwargs)`` on it, else it puts its own object there;
- its object computes the text attention, then adds ``callback(out, q, k, v, extra_options, **kwargs)`` for
  every callback whose ``kwargs["sigma_end"] <= sigma <= kwargs["sigma_start"]``.

Also a stand-in ModelPatcher (clone deep-copies model_options, ComfyUI's key rule) and ComfyUI's lookup of
an attn2 patch (the (block, number, index) key first, then (block, number)). The gated tests in
test_stacking_packs.py run the real packs' code.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from bolid.attention import sdpa_attention


class StandInReplace:
    def __init__(self, callback, **kwargs) -> None:
        self.callback = [callback]
        self.kwargs = [kwargs]

    def add(self, callback, **kwargs) -> None:
        self.callback.append(callback)
        self.kwargs.append(kwargs)

    def __call__(self, q, k, v, extra_options):
        out = sdpa_attention(q, k, v, extra_options["n_heads"])
        sigmas = extra_options.get("sigmas")
        sigma = float(sigmas[0]) if sigmas is not None else 1e9
        for callback, kwargs in zip(self.callback, self.kwargs, strict=True):
            if kwargs["sigma_end"] <= sigma <= kwargs["sigma_start"]:
                out = out + callback(out, q, k, v, extra_options, **kwargs)
        return out


def extra_tokens_attention(out, q, k, v, extra_options, tokens_k=None, tokens_v=None, weight=1.0, **_):
    """The stand-in pack's contribution: weighted attention over its own fixed tokens."""
    batch = q.shape[0]
    return weight * sdpa_attention(q, tokens_k.expand(batch, -1, -1), tokens_v.expand(batch, -1, -1),
                                   extra_options["n_heads"])


def stack_patch(model: Any, kwargs: dict, key: tuple) -> None:
    """Register like those packs: ``.add`` on whatever is at ``key``, else a new StandInReplace there."""
    options = model.model_options["transformer_options"].copy()
    options["patches_replace"] = dict(options.get("patches_replace", {}))
    options["patches_replace"]["attn2"] = dict(options["patches_replace"].get("attn2", {}))
    existing = options["patches_replace"]["attn2"].get(key)
    if existing is None:
        options["patches_replace"]["attn2"][key] = StandInReplace(extra_tokens_attention, **kwargs)
        model.model_options["transformer_options"] = options
    else:
        existing.add(extra_tokens_attention, **kwargs)


class StandInModelPatcher:
    """What BoLID and the packs use of ComfyUI's ModelPatcher."""

    def __init__(self, diffusion_model: Any, family: str = "SD15") -> None:
        self.diffusion_model = diffusion_model
        self.model_options: dict = {"transformer_options": {}}
        self.model = type("BaseModel", (), {"model_config": type(family, (), {})()})()

    def clone(self) -> StandInModelPatcher:
        other = StandInModelPatcher(self.diffusion_model)
        other.model = self.model
        other.model_options = copy.deepcopy(self.model_options)
        return other

    def get_model_object(self, name: str) -> Any:
        return {"diffusion_model": self.diffusion_model}[name]

    def set_model_attn2_replace(self, patch, block_name, number, transformer_index=None) -> None:
        attn2 = self.model_options["transformer_options"].setdefault("patches_replace", {}).setdefault("attn2", {})
        attn2[(block_name, number) if transformer_index is None else (block_name, number, transformer_index)] = patch


def call_attn2(model: Any, block: tuple[str, int], index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               extra_options: dict) -> torch.Tensor:
    """One cross-attention layer as ComfyUI runs it: 3-tuple key first, then the block's 2-tuple key."""
    patches = model.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
    key = (*block, index)
    if key not in patches:
        key = block
    if key not in patches:
        return sdpa_attention(q, k, v, extra_options["n_heads"])
    return patches[key](q, k, v, {**extra_options, "block": block, "block_index": index})
