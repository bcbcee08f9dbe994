"""BoLID on a diffusers ``UNet2DConditionModel``: attach, set the identity, run, detach.

The processors are plain objects (not submodules), so the UNet's own parameters stay exactly the frozen base
model; the adapter is moved and trained on its own. With gradients off (inference), each layer's branch K/V is
computed once per identity and reused at every denoising step; with gradients on (training) it is recomputed so
that gradients reach the projections and K/V weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from .adapter import BRANCHES, NO_BODY_BRANCH, BoLIDAdapter, Branch, MissingBranchError
from .attention import BranchKV, decoupled_cross_attention, sdpa_attention
from .config import AdapterConfig, describe_layout
from .errors import AdapterMismatchError
from .identity import complete_identity

logger = logging.getLogger("bolid")


def cross_attention_modules(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(processor name, Attention module) of every cross-attention layer, in diffusers order (down, up, mid)."""
    layers = []
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        module = unet.get_submodule(name[: -len(".processor")])
        if not getattr(module, "is_cross_attention", True):
            continue
        layers.append((name, module))
    return layers


def adapter_config_for_unet(unet: torch.nn.Module, **dims: Any) -> AdapterConfig:
    """An AdapterConfig whose layers match this UNet; ``dims`` sets token counts, body_dim, ..."""
    layers = cross_attention_modules(unet)
    return AdapterConfig(context_dim=int(layers[0][1].to_k.weight.shape[1]),
                         hidden_sizes=tuple(int(m.to_k.weight.shape[0]) for _, m in layers), **dims)


def init_adapter_from_unet(unet: torch.nn.Module, config: AdapterConfig) -> BoLIDAdapter:
    """A fresh adapter whose per-layer K/V start as copies of the UNet's to_k/to_v (design section 1)."""
    adapter = BoLIDAdapter(config)
    layers = _checked_layers(unet, config)
    adapter.init_kv_from_base([(m.to_k.weight.detach(), m.to_v.weight.detach()) for _, m in layers])
    return adapter


def _checked_layers(unet: torch.nn.Module, config: AdapterConfig) -> list[tuple[str, torch.nn.Module]]:
    layers = cross_attention_modules(unet)
    ctx = int(layers[0][1].to_k.weight.shape[1]) if layers else 0
    sizes = tuple(int(m.to_k.weight.shape[0]) for _, m in layers)
    if len(layers) != config.num_layers or ctx != config.context_dim or sizes != config.hidden_sizes:
        raise AdapterMismatchError(f"BoLID adapter is {config.describe()}, UNet is {describe_layout(len(layers), ctx)}"
                                   + ("" if len(layers) != config.num_layers else
                                      f" (layer inner dims {sizes} vs adapter {config.hidden_sizes})"))
    return layers


class BoLIDDiffusers:
    """Controls BoLID on one diffusers UNet. Use ``attach`` to create, ``set_identity`` per batch, ``detach``."""

    def __init__(self, unet: torch.nn.Module, adapter: BoLIDAdapter, weight_face: float = 1.0,
                 weight_body: float = 1.0) -> None:
        self.unet = unet
        self.adapter = adapter
        self.weights: dict[Branch, float] = {"face": float(weight_face), "body": float(weight_body)}
        self._tokens: dict[Branch, torch.Tensor] = {}
        self._kv_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._original_processors: dict[str, Any] | None = None

    @classmethod
    def attach(cls, unet: torch.nn.Module, adapter: BoLIDAdapter, weight_face: float = 1.0,
               weight_body: float = 1.0) -> BoLIDDiffusers:
        controller = cls(unet, adapter, weight_face, weight_body)
        layers = _checked_layers(unet, adapter.config)
        controller._original_processors = dict(unet.attn_processors)
        processors = dict(controller._original_processors)
        for index, (name, _) in enumerate(layers):
            processors[name] = BoLIDAttnProcessor(controller, index)
        unet.set_attn_processor(processors)
        return controller

    def detach(self) -> None:
        """Restore the UNet's original processors."""
        if self._original_processors is not None:
            self.unet.set_attn_processor(self._original_processors)
            self._original_processors = None

    def set_weights(self, weight_face: float | None = None, weight_body: float | None = None) -> None:
        if weight_face is not None:
            self.weights["face"] = float(weight_face)
        if weight_body is not None:
            self.weights["body"] = float(weight_body)

    def set_identity(self, face_embeds: torch.Tensor | None = None, body_embeds: torch.Tensor | None = None) -> None:
        """Per-row conditions for the next UNet calls: [B, 512] face and/or [B, body_dim] body (or [dim]).

        Rows that should carry no identity (CFG's unconditional half, condition dropout) use zero vectors; a
        branch passed as None while the other is given is the zero embedding too, as in training. Both None
        switches BoLID off (plain base model).
        """
        self._tokens = {}
        self._kv_cache = {}
        if body_embeds is not None and not self.adapter.config.body_branch:
            raise MissingBranchError(f"a body identity was given, but {NO_BODY_BRANCH}")
        if face_embeds is None and body_embeds is None:
            return
        face_embeds, body_embeds = complete_identity(self.adapter.config, face_embeds, body_embeds)
        for branch, embeds in (("face", face_embeds), ("body", body_embeds)):
            if branch in self.adapter.branches:
                self._tokens[branch] = self.adapter.tokens(branch, embeds)

    def branches(self, layer: int, batch: int, device: torch.device, dtype: torch.dtype) -> list[BranchKV]:
        """The active branches' K/V for one layer, broadcast to ``batch`` rows."""
        out = []
        for branch in BRANCHES:
            tokens = self._tokens.get(branch)
            if tokens is None or self.weights[branch] == 0:
                continue
            key, value = self._branch_kv(layer, branch, tokens)
            key, value = (t.to(device=device, dtype=dtype) for t in (key, value))
            if key.shape[0] != batch:
                if key.shape[0] != 1:
                    raise ValueError(f"BoLID {branch} identity has {key.shape[0]} rows, the UNet batch has {batch}")
                key, value = key.expand(batch, -1, -1), value.expand(batch, -1, -1)
            out.append(BranchKV(key, value, self.weights[branch]))
        return out

    def _branch_kv(self, layer: int, branch: Branch, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.is_grad_enabled():
            return self.adapter.branch_kv(layer, branch, tokens)
        cache_key = (layer, branch)
        if cache_key not in self._kv_cache:
            self._kv_cache[cache_key] = self.adapter.branch_kv(layer, branch, tokens)
        return self._kv_cache[cache_key]


class BoLIDAttnProcessor:
    """diffusers attention processor for one cross-attention layer (mirrors AttnProcessor2_0 plus branches)."""

    def __init__(self, controller: BoLIDDiffusers, layer_index: int,
                 attention: Callable[..., torch.Tensor] = sdpa_attention) -> None:
        self.controller = controller
        self.layer_index = layer_index
        self.attention = attention

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if isinstance(encoder_hidden_states, tuple):  # a UNet with an IP image projection passes (text, images)
            encoder_hidden_states = encoder_hidden_states[0]
        batch, sequence_length, _ = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        text = self.attention(query, key, value, attn.heads, mask=attention_mask)
        branches = self.controller.branches(self.layer_index, batch, query.device, query.dtype)
        hidden_states = decoupled_cross_attention(query, key, value, attn.heads, branches, self.attention, base=text)

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
