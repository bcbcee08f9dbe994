"""BoLID's cross-attention patch for ComfyUI models (``set_model_attn2_replace``).

ComfyUI calls a replace function after to_q/to_k/to_v and before to_out: ``fn(q, k, v, extra_options)``.
We return the text attention (or a wrapped foreign patch's output) plus the weighted face and body branches,
computed by the single implementation in ``bolid.attention``. Branch keys/values depend only on the adapter
and the identity, so they are computed once per device/dtype and reused at every step.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from ..bolid.adapter import BoLIDAdapter, Branch
from ..bolid.attention import BranchKV, decoupled_cross_attention, sdpa_attention
from ..bolid.config import AdapterConfig, describe_layout
from ..bolid.errors import AdapterMismatchError
from .comfy_env import comfy_optimized_attention

COND, UNCOND = 0, 1
LayerKey = tuple[str, int, int]


@dataclass(frozen=True)
class ComfyLayer:
    """One cross-attention layer of a ComfyUI UNet: its replace-patch key and dimensions."""

    key: LayerKey
    hidden_size: int
    context_dim: int


def enumerate_cross_attention_layers(diffusion_model: torch.nn.Module) -> list[ComfyLayer]:
    """Cross-attention layers in ComfyUI firing order: input blocks, middle block (as ("middle", 0, i)), output."""
    layers: list[ComfyLayer] = []

    def visit(block_name: str, number: int, block: torch.nn.Module) -> None:
        for module in block.children() if isinstance(block, torch.nn.Sequential) else [block]:
            for index, transformer in enumerate(getattr(module, "transformer_blocks", ())):
                attn2 = getattr(transformer, "attn2", None)
                if attn2 is not None:
                    hidden, context = attn2.to_k.weight.shape
                    layers.append(ComfyLayer((block_name, number, index), int(hidden), int(context)))

    for number, block in enumerate(diffusion_model.input_blocks):
        visit("input", number, block)
    visit("middle", 0, diffusion_model.middle_block)
    for number, block in enumerate(diffusion_model.output_blocks):
        visit("output", number, block)
    return layers


def adapter_layer_order(layers: Sequence[ComfyLayer]) -> list[ComfyLayer]:
    """Reorder ComfyUI's layers (input, middle, output) into the adapter's diffusers order (down, up, mid)."""
    by_block = {name: [layer for layer in layers if layer.key[0] == name] for name in ("input", "output", "middle")}
    return by_block["input"] + by_block["output"] + by_block["middle"]


def check_adapter_fits(config: AdapterConfig, layers: Sequence[ComfyLayer]) -> list[ComfyLayer]:
    """Map the model's layers to adapter indices, or raise an error naming both layouts."""
    ordered = adapter_layer_order(layers)
    model_ctx = ordered[0].context_dim if ordered else 0
    model_desc = describe_layout(len(ordered), model_ctx)
    if len(ordered) != config.num_layers or model_ctx != config.context_dim:
        raise AdapterMismatchError(
            f"BoLID adapter is {config.describe()}, model is {model_desc}: load the adapter trained for this "
            "model family"
        )
    for index, (layer, hidden) in enumerate(zip(ordered, config.hidden_sizes, strict=True)):
        if layer.hidden_size != hidden or layer.context_dim != config.context_dim:
            raise AdapterMismatchError(
                f"BoLID adapter layer {index} expects inner dim {hidden} / ctx {config.context_dim}, model layer "
                f"{layer.key} has {layer.hidden_size} / {layer.context_dim} (adapter {config.describe()}, model "
                f"{model_desc})"
            )
    return ordered


@dataclass
class BoLIDPatchState:
    """What every layer patch of one "Apply BoLID Adapter" shares: weights, identity, schedule, caches.

    The embeddings are fixed when the node runs; caches only hold values derived from them and from the
    adapter weights, so sharing one state between deep-copied patches is safe.
    """

    adapter: BoLIDAdapter
    embeds: dict[Branch, torch.Tensor]  # branch -> [1, dim]
    weights: dict[Branch, float]
    sigma_start: float = float("inf")
    sigma_end: float = 0.0
    mask: torch.Tensor | None = None  # [Bm, H, W]
    adapter_models: list[Any] = field(default_factory=list)  # ModelPatcher(s) for ComfyUI's memory manager
    _kv_cache: dict = field(default_factory=dict, repr=False)
    _mask_cache: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _last_sigma: tuple | None = field(default=None, repr=False)

    def active_branches(self) -> list[Branch]:
        return [b for b in ("face", "body") if b in self.embeds and self.weights.get(b, 0.0) != 0.0]

    def in_schedule(self, extra_options: dict) -> bool:
        sigmas = extra_options.get("sigmas")
        if sigmas is None:
            return True
        # every layer of one step sees the same sigmas tensor: read it (a device sync) once per step, not per layer
        last = self._last_sigma
        if last is not None and last[0]() is sigmas:
            sigma = last[1]
        else:
            sigma = float(sigmas.reshape(-1)[0])
            self._last_sigma = (weakref.ref(sigmas), sigma)
        return self.sigma_end <= sigma <= self.sigma_start

    def branch_kv(self, layer: int, branch: Branch, chunks: tuple[int, ...], per_chunk: int,
                  device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, N, inner] keys/values for a batch laid out as ``chunks`` (0 = cond, 1 = uncond) of equal size."""
        key = (layer, branch, chunks, per_chunk, device, dtype)
        cached = self._kv_cache.get(key)
        if cached is not None:
            return cached
        with self._lock, torch.no_grad():
            pair_key = (layer, branch, device, dtype)
            pair = self._kv_cache.get(pair_key)
            if pair is None:
                embeds = self.embeds[branch]
                rows = torch.cat([embeds, torch.zeros_like(embeds)])  # cond, uncond (zero embedding)
                tokens = self.adapter.tokens(branch, rows)
                k, v = self.adapter.branch_kv(layer, branch, tokens)
                pair = (k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype))
                self._kv_cache[pair_key] = pair
            rows = torch.tensor(chunks, device=device).repeat_interleave(per_chunk)
            result = (pair[0][rows], pair[1][rows])
            self._kv_cache[key] = result
        return result

    def spatial_mask(self, activations_shape: Sequence[int], chunks: int, per_chunk: int,
                     device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """The attention mask resized to this layer's exact h x w, as [B or 1, h*w, 1]."""
        if self.mask is None:
            return None
        h, w = int(activations_shape[-2]), int(activations_shape[-1])
        key = (h, w, chunks, per_chunk, device, dtype)
        cached = self._mask_cache.get(key)
        if cached is not None:
            return cached
        mask = self.mask.to(device=device, dtype=torch.float32)
        resized = F.interpolate(mask.unsqueeze(1), size=(h, w), mode="bilinear", align_corners=False)
        resized = resized.reshape(resized.shape[0], h * w, 1)
        n = resized.shape[0]
        if n == per_chunk * chunks or n == 1:
            pass
        elif n == per_chunk:
            resized = resized.repeat(chunks, 1, 1)
        else:
            raise ValueError(f"BoLID attention mask has batch {n}; the latent batch is {per_chunk} "
                             "(use one mask or one per latent)")
        resized = resized.to(dtype)
        self._mask_cache[key] = resized
        return resized


class BoLIDAttn2Patch:
    """The attn2 replace function for one layer; wraps a foreign patch found at the same key."""

    def __init__(self, state: BoLIDPatchState, layer_index: int, wrapped: Callable | None = None) -> None:
        self.state = state
        self.layer_index = layer_index
        self.wrapped = wrapped

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]
        attention = _attention_fn(extra_options)
        if self.wrapped is not None:
            base = self.wrapped(q, k, v, extra_options)
        else:
            base = attention(q, k, v, heads)
        state = self.state
        branches = state.active_branches()
        if not branches or not state.in_schedule(extra_options):
            return base
        chunks = tuple(int(c) for c in extra_options.get("cond_or_uncond") or (COND,))
        if q.shape[0] % len(chunks):
            raise ValueError(f"BoLID: batch {q.shape[0]} does not split into cond_or_uncond chunks {list(chunks)}")
        per_chunk = q.shape[0] // len(chunks)
        mask = None
        if state.mask is not None and "activations_shape" in extra_options:
            mask = state.spatial_mask(extra_options["activations_shape"], len(chunks), per_chunk, q.device, q.dtype)
        kv = []
        for branch in branches:
            key, value = state.branch_kv(self.layer_index, branch, chunks, per_chunk, q.device, q.dtype)
            kv.append(BranchKV(key, value, state.weights[branch], mask))
        return decoupled_cross_attention(q, k, v, heads, kv, attention=attention, base=base)

    def __deepcopy__(self, memo: dict) -> BoLIDAttn2Patch:
        # ComfyUI deep-copies model_options on clone(): share the weights/caches, copy a wrapped foreign patch.
        return BoLIDAttn2Patch(self.state, self.layer_index, copy.deepcopy(self.wrapped, memo))

    def to(self, device_or_dtype: Any) -> BoLIDAttn2Patch:
        # Weights are moved by ComfyUI's memory manager through models(); caches are keyed by device/dtype.
        if self.wrapped is not None and hasattr(self.wrapped, "to"):
            self.wrapped = self.wrapped.to(device_or_dtype)
        return self

    def models(self) -> list[Any]:
        models = list(self.state.adapter_models)
        if self.wrapped is not None and hasattr(self.wrapped, "models"):
            models += self.wrapped.models()
        return models


def _attention_fn(extra_options: dict) -> Callable[..., torch.Tensor]:
    """ComfyUI's optimized_attention with the layer's precision and options, or SDPA outside ComfyUI."""
    comfy_attention = comfy_optimized_attention()
    if comfy_attention is None:
        return sdpa_attention
    return partial(comfy_attention, attn_precision=extra_options.get("attn_precision"),
                   transformer_options=extra_options)
