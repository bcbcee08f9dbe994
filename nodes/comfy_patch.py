"""BoLID's cross-attention patch for ComfyUI models (``set_model_attn2_replace``).

ComfyUI calls a replace function after to_q/to_k/to_v and before to_out: ``fn(q, k, v, extra_options)``.
We return the text attention (or a wrapped foreign patch's output) plus the weighted face and body branches,
computed by the single implementation in ``bolid.attention``, plus whatever other packs stacked on the same
layer through the ``.add(callback, **kwargs)`` protocol that ComfyUI_IPAdapter_plus, PuLID_ComfyUI and
ComfyUI_InstantID share.

Branch keys/values depend only on the adapter and the identity: they are computed once, when the node runs,
into a small module (two rows per layer and branch: cond and uncond) that ComfyUI's memory manager loads with
the UNet, counts, and offloads with it. Per batch layout they are expanded, never copied into a cache.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
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
from ..bolid.errors import MaskError
from ..bolid.identity import no_identity_like
from .comfy_env import comfy_optimized_attention
from .comfy_layers import ComfyLayer, compute_dtype

logger = logging.getLogger("bolid")

COND, UNCOND = 0, 1


def normalize_mask(mask: torch.Tensor | None, name: str) -> torch.Tensor | None:
    """A MASK input as [B, H, W] float32: [H, W], [B, H, W] and [B, 1, H, W] are accepted.

    The batch rule (checked when sampling, where the latent batch is known): one mask for every latent, or
    one per latent. ComfyUI may run cond and uncond in one batch or two; the same mask rows serve both.
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise MaskError(f"Apply BoLID Adapter: {name} must be a MASK tensor, got {type(mask).__name__}")
    shape = tuple(mask.shape)
    if mask.ndim == 4 and shape[1] == 1:
        mask = mask[:, 0]
    elif mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise MaskError(f"Apply BoLID Adapter: {name} has shape {list(shape)}; expected a MASK [H, W], "
                        "[B, H, W] or [B, 1, H, W] (one channel)")
    if mask.numel() == 0:
        raise MaskError(f"Apply BoLID Adapter: {name} is empty (shape {list(shape)})")
    mask = mask.detach().to("cpu", torch.float32)
    if not torch.isfinite(mask).all():
        raise MaskError(f"Apply BoLID Adapter: {name} contains NaN or Inf values; fix the node that made it")
    return mask


class IdentityKV(torch.nn.Module):
    """Keys and values of the identity branches at every layer, as frozen parameters.

    One [2 (key, value), 2 (cond, uncond), tokens, inner] tensor per layer and active branch; the uncond row
    comes from the zero embedding, as in training. Parameters rather than a dict cache, so that a
    ModelPatcher around this module lets ComfyUI load it with the UNet, count it, and offload it on unload.
    """

    def __init__(self, adapter: BoLIDAdapter, embeds: dict[Branch, torch.Tensor], branches: Sequence[Branch],
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.kv = torch.nn.ParameterDict()
        with torch.no_grad():
            for branch in branches:
                embed = embeds[branch]
                tokens = adapter.tokens(branch, torch.cat([embed, no_identity_like(embed)]))
                for layer in range(adapter.config.num_layers):
                    # a partly loaded adapter (low VRAM) has layers on both devices: follow each layer's weights
                    weight = adapter.layer(layer).projections(branch)[0].weight
                    key, value = adapter.branch_kv(layer, branch, tokens.to(weight.device, weight.dtype))
                    pair = torch.stack([key, value]).to(tokens.device)
                    self.kv[f"{branch}_{layer}"] = torch.nn.Parameter(
                        pair.to(compute_dtype(dtype) if dtype is not None else pair.dtype), requires_grad=False)

    def batch(self, layer: int, branch: Branch, chunks: Sequence[int], per_chunk: int, device: torch.device,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, tokens, inner] keys/values for a batch of ``chunks`` (0 cond, 1 uncond) of ``per_chunk`` rows:
        expanded views of the cond/uncond rows (a per-call concatenation when cond and uncond are mixed)."""
        pair = self.kv[f"{branch}_{layer}"].to(device=device, dtype=dtype)  # no-op once ComfyUI loaded it
        rows = [UNCOND if c == UNCOND else COND for c in chunks]
        _, _, tokens, inner = pair.shape
        if all(r == rows[0] for r in rows):
            kv = pair[:, rows[0]:rows[0] + 1].expand(2, per_chunk * len(rows), tokens, inner)
        else:
            kv = torch.cat([pair[:, r:r + 1].expand(2, per_chunk, tokens, inner) for r in rows], dim=1)
        return kv[0], kv[1]


@dataclass
class BoLIDPatchState:
    """What every layer patch of one "Apply BoLID Adapter" shares: identity K/V, weights, schedule, masks.

    The embeddings are fixed when the node runs and the K/V are derived from them and the adapter weights
    once, so sharing one state between deep-copied patches is safe.
    """

    adapter: BoLIDAdapter
    embeds: dict[Branch, torch.Tensor]  # branch -> [1, dim]
    weights: dict[Branch, float]
    sigma_start: float = float("inf")
    sigma_end: float = 0.0
    mask: torch.Tensor | None = None  # both branches, unless branch_masks has one for the branch
    branch_masks: dict[Branch, torch.Tensor] = field(default_factory=dict)
    kv_dtype: torch.dtype | None = None
    memory_models: list[Any] = field(default_factory=list)  # ModelPatcher(s) for ComfyUI's memory manager
    identity_kv: IdentityKV | None = None
    _masks: dict = field(default_factory=dict, repr=False)
    _mask_cache: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _last_sigma: tuple | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        shared = normalize_mask(self.mask, "attn_mask")
        for branch in ("face", "body"):
            own = normalize_mask(self.branch_masks.get(branch), f"attn_mask_{branch}")
            if own is not None:
                self._masks[branch] = (f"attn_mask_{branch}", own)
            elif shared is not None:
                self._masks[branch] = ("attn_mask", shared)
        if self.identity_kv is None:
            self.identity_kv = IdentityKV(self.adapter, self.embeds, self.active_branches(), self.kv_dtype)

    def active_branches(self) -> list[Branch]:
        return [b for b in ("face", "body") if b in self.embeds and self.weights.get(b, 0.0) != 0.0]

    def current_sigma(self, extra_options: dict) -> float | None:
        sigmas = extra_options.get("sigmas")
        if sigmas is None:
            return None
        # every layer of one step sees the same sigmas tensor: read it (a device sync) once per step, not per layer
        last = self._last_sigma
        if last is not None and last[0]() is sigmas:
            return last[1]
        sigma = float(sigmas.reshape(-1)[0])
        self._last_sigma = (weakref.ref(sigmas), sigma)
        return sigma

    def in_schedule(self, extra_options: dict) -> bool:
        sigma = self.current_sigma(extra_options)
        return sigma is None or self.sigma_end <= sigma <= self.sigma_start

    def spatial_mask(self, branch: Branch, activations_shape: Sequence[int] | None, chunks: int, per_chunk: int,
                     device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """The branch's mask resized to this layer's exact h x w, as [1 or B, h*w, 1]; None without a mask.

        One mask acts on every latent; n masks need a latent batch of n (cond and uncond reuse the rows).
        """
        entry = self._masks.get(branch)
        if entry is None:
            return None
        name, source = entry
        n = source.shape[0]
        if n not in (1, per_chunk):
            raise MaskError(f"Apply BoLID Adapter: {name} is a batch of {n} masks and the latent batch is "
                            f"{per_chunk}; connect one mask (used for every latent) or exactly one per latent")
        if activations_shape is None:
            raise MaskError(f"Apply BoLID Adapter: {name} is connected, but this ComfyUI does not report the "
                            "latent size to attention patches; update ComfyUI (see README, Works with)")
        h, w = int(activations_shape[-2]), int(activations_shape[-1])
        key = (id(source), h, w, device, dtype)
        resized = self._mask_cache.get(key)
        if resized is None:
            with self._lock:
                resized = F.interpolate(source.to(device).unsqueeze(1), size=(h, w), mode="bilinear",
                                        align_corners=False)
                resized = resized.reshape(n, h * w, 1).to(dtype)
                self._mask_cache[key] = resized
        return resized.repeat(chunks, 1, 1) if n > 1 and chunks > 1 else resized

    def release_device_caches(self, keep: torch.device) -> None:
        """Drop resized masks held on any device but ``keep`` (called when ComfyUI moves the patches)."""
        with self._lock:
            for key in [k for k in self._mask_cache if k[3] != keep]:
                del self._mask_cache[key]

    def device_tensors(self) -> list[torch.Tensor]:
        """Every tensor this state keeps between steps (for memory checks)."""
        kv = list(self.identity_kv.parameters()) if self.identity_kv is not None else []
        return kv + list(self._mask_cache.values())


_NO_SIGMA = 999999999.9  # the sigma the stacking packs assume when none is reported


class BoLIDAttn2Patch:
    """The attn2 replace function for one layer.

    Wraps a foreign patch found at the same key when BoLID is applied, and accepts patches stacked later
    through ``.add(callback, **kwargs)``, the protocol of ComfyUI_IPAdapter_plus, PuLID_ComfyUI and
    ComfyUI_InstantID.
    """

    def __init__(self, state: BoLIDPatchState, layer_index: int, wrapped: Callable | None = None) -> None:
        self.state = state
        self.layer_index = layer_index
        self.wrapped = wrapped
        self.callback: list[Callable] = []
        self.kwargs: list[dict] = []

    def add(self, callback: Callable, **kwargs: Any) -> None:
        """Stack another pack's callback: ``callback(out, q, k, v, extra_options, **kwargs)`` is added to
        the output while ``kwargs["sigma_end"] <= sigma <= kwargs["sigma_start"]``."""
        self.callback.append(callback)
        self.kwargs.append(kwargs)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        attention = _attention_fn(extra_options)
        if self.wrapped is not None:
            out = self.wrapped(q, k, v, extra_options)
        else:
            out = attention(q, k, v, extra_options["n_heads"])
        out = self._add_identity(out, q, k, v, extra_options, attention)
        if self.callback:
            out = self._add_stacked(out, q, k, v, extra_options)
        return out

    def _add_identity(self, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      extra_options: dict, attention: Callable[..., torch.Tensor]) -> torch.Tensor:
        state = self.state
        branches = state.active_branches()
        if not branches or not state.in_schedule(extra_options):
            return out
        chunks = tuple(int(c) for c in extra_options.get("cond_or_uncond") or (COND,))
        if q.shape[0] % len(chunks):
            raise ValueError(f"BoLID: batch {q.shape[0]} does not split into cond_or_uncond chunks {list(chunks)}")
        per_chunk = q.shape[0] // len(chunks)
        shape = extra_options.get("activations_shape")
        kv = []
        for branch in branches:
            key, value = state.identity_kv.batch(self.layer_index, branch, chunks, per_chunk, q.device, q.dtype)
            mask = state.spatial_mask(branch, shape, len(chunks), per_chunk, q.device, q.dtype)
            kv.append(BranchKV(key, value, state.weights[branch], mask))
        return decoupled_cross_attention(q, k, v, extra_options["n_heads"], kv, attention=attention, base=out)

    def _add_stacked(self, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     extra_options: dict) -> torch.Tensor:
        sigma = self.state.current_sigma(extra_options)
        sigma = _NO_SIGMA if sigma is None else sigma
        dtype = q.dtype
        for callback, kwargs in zip(self.callback, self.kwargs, strict=True):
            if kwargs.get("sigma_end", 0.0) <= sigma <= kwargs.get("sigma_start", float("inf")):
                out = out + callback(out, q, k, v, extra_options, **kwargs)
        return out.to(dtype)

    def __deepcopy__(self, memo: dict) -> BoLIDAttn2Patch:
        # ComfyUI deep-copies model_options on clone(): share the identity state, copy what others stacked
        # (their own patch objects are deep-copied the same way), so a clone's .add leaves the source alone.
        other = BoLIDAttn2Patch(self.state, self.layer_index, copy.deepcopy(self.wrapped, memo))
        other.callback = list(self.callback)
        other.kwargs = copy.deepcopy(self.kwargs, memo)
        return other

    def to(self, device_or_dtype: Any) -> BoLIDAttn2Patch:
        # The K/V module is moved by ComfyUI's memory manager through models(); resized masks on another
        # device than the one the patches move to are dropped, so nothing stays behind on unload.
        if isinstance(device_or_dtype, (torch.device, str)):
            self.state.release_device_caches(torch.device(device_or_dtype))
        if self.wrapped is not None and hasattr(self.wrapped, "to"):
            self.wrapped = self.wrapped.to(device_or_dtype)
        return self

    def models(self) -> list[Any]:
        models = list(self.state.memory_models)
        if self.wrapped is not None and hasattr(self.wrapped, "models"):
            models += self.wrapped.models()
        return models


class BoLIDBlockPatch:
    """Registered at a block's 2-tuple key ``(block, number)`` next to BoLID's per-layer 3-tuple keys.

    ComfyUI prefers 3-tuple keys, so a pack that later stacks at the 2-tuple key (SD1.5-style keys, e.g.
    IPAdapter_plus) would be shadowed; finding this object there, its ``.add`` reaches every BoLID layer
    patch of the block instead.
    """

    def __init__(self, layers: dict[int, BoLIDAttn2Patch]) -> None:
        self.layers = layers

    def add(self, callback: Callable, **kwargs: Any) -> None:
        for patch in self.layers.values():
            patch.add(callback, **kwargs)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        # only reached for a transformer index BoLID did not register (none in a supported UNet)
        index = int(extra_options.get("block_index", 0))
        if index in self.layers:
            return self.layers[index](q, k, v, extra_options)
        return _attention_fn(extra_options)(q, k, v, extra_options["n_heads"])


def register_patches(model: Any, state: BoLIDPatchState, ordered: Sequence[ComfyLayer]) -> Any:
    """A clone of ``model`` with BoLID at every layer's 3-tuple key (wrapping what was there) and a
    :class:`BoLIDBlockPatch` at each block's 2-tuple key."""
    patched = model.clone()
    existing = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    blocks: dict[tuple[str, int], dict[int, BoLIDAttn2Patch]] = {}
    for index, layer in enumerate(ordered):
        wrapped = existing.get(layer.key)
        if wrapped is None:
            wrapped = existing.get(layer.key[:2])
            if isinstance(getattr(wrapped, "layers", None), dict):  # another BoLID's block patch
                wrapped = wrapped.layers.get(layer.key[2])
        patch = BoLIDAttn2Patch(state, index, wrapped)
        patched.set_model_attn2_replace(patch, *layer.key)
        blocks.setdefault(layer.key[:2], {})[layer.key[2]] = patch
    for (block, number), layers in blocks.items():
        patched.set_model_attn2_replace(BoLIDBlockPatch(layers), block, number)
    return patched


@dataclass(frozen=True)
class AttentionSignature:
    """What keywords ComfyUI's attention function takes (it changed across releases)."""

    fn: Callable[..., torch.Tensor]
    keywords: frozenset[str]
    var_keyword: bool


_TENSOR_ARGS = frozenset({"q", "k", "v", "heads", "query", "key", "value", "mask", "skip_reshape",
                          "skip_output_reshape"})


def describe_attention(fn: Callable[..., torch.Tensor]) -> AttentionSignature:
    """Read the keywords of an attention function once (through functools.wraps wrappers)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: the oldest common keyword only
        return AttentionSignature(fn, frozenset({"attn_precision"}), False)
    keywords = frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return AttentionSignature(fn, keywords, any(p.kind == p.VAR_KEYWORD for p in params))


def attention_kwargs(signature: AttentionSignature, extra_options: dict) -> dict[str, Any]:
    """The per-layer options ComfyUI itself would pass, limited to what this release's function takes:
    attn_precision, transformer_options (0.3.57+), and any other named keyword found in the options."""
    kwargs: dict[str, Any] = {}
    if "attn_precision" in signature.keywords:
        kwargs["attn_precision"] = extra_options.get("attn_precision")
    if "transformer_options" in signature.keywords or signature.var_keyword:
        kwargs["transformer_options"] = extra_options
    for name in signature.keywords - _TENSOR_ARGS - kwargs.keys():
        if not name.startswith("_") and name in extra_options:
            kwargs[name] = extra_options[name]
    return kwargs


@functools.cache
def comfy_attention_signature() -> AttentionSignature | None:
    fn = comfy_optimized_attention()
    return None if fn is None else describe_attention(fn)


def _attention_fn(extra_options: dict) -> Callable[..., torch.Tensor]:
    """ComfyUI's optimized_attention with the layer's precision and options, or SDPA outside ComfyUI."""
    signature = comfy_attention_signature()
    if signature is None:
        return sdpa_attention
    kwargs = attention_kwargs(signature, extra_options)
    return partial(signature.fn, **kwargs) if kwargs else signature.fn
