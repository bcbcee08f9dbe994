"""The Body-Condition Module: face and body token projections plus per-layer K/V for each branch.

Key names follow IP-Adapter conventions so that each branch exports as a stock FaceID-style IP-Adapter file:
projections ``proj.0`` / ``proj.2`` / ``norm`` and layer entries numbered 1, 3, 5, ... (the odd attention
processors of a diffusers UNet, i.e. the cross-attention ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from .config import AdapterConfig
from .errors import BoLIDError, EmbeddingError

Branch = Literal["face", "body"]
BRANCHES: tuple[Branch, ...] = ("face", "body")
NO_BODY_BRANCH = ("this BoLID adapter has no body branch (a face branch imported from IP-Adapter FaceID); the body "
                  "branch is added by stage-2 training (README: 'Adapter training (stage 2)')")


class MissingBranchError(BoLIDError):
    """The adapter file holds no such branch (e.g. a FaceID import has no body branch)."""


def layer_key(index: int) -> str:
    """IP-Adapter numbering of cross-attention layer ``index`` (0-based, diffusers order)."""
    return str(2 * index + 1)


class TokenProjection(nn.Module):
    """MLP from one embedding vector to ``num_tokens`` context tokens (FaceID projection layout)."""

    def __init__(self, in_dim: int, context_dim: int, num_tokens: int, mult: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.context_dim = context_dim
        self.num_tokens = num_tokens
        self.proj = nn.Sequential(nn.Linear(in_dim, in_dim * mult), nn.GELU(), nn.Linear(in_dim * mult, context_dim * num_tokens))
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(embeds).reshape(embeds.shape[0], self.num_tokens, self.context_dim)
        return self.norm(tokens)


class LayerKV(nn.Module):
    """New key/value projections of one cross-attention layer, one pair per branch (face only without body)."""

    def __init__(self, context_dim: int, hidden_size: int, body: bool = True) -> None:
        super().__init__()
        self.to_k_face = nn.Linear(context_dim, hidden_size, bias=False)
        self.to_v_face = nn.Linear(context_dim, hidden_size, bias=False)
        if body:
            self.to_k_body = nn.Linear(context_dim, hidden_size, bias=False)
            self.to_v_body = nn.Linear(context_dim, hidden_size, bias=False)

    def projections(self, branch: Branch) -> tuple[nn.Linear, nn.Linear]:
        if branch == "face":
            return self.to_k_face, self.to_v_face
        if not hasattr(self, "to_k_body"):
            raise MissingBranchError(NO_BODY_BRANCH)
        return self.to_k_body, self.to_v_body


class BoLIDAdapter(nn.Module):
    """Everything BoLID trains in stage 2 (the base UNet stays frozen)."""

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.face_proj = TokenProjection(c.face_embed_dim, c.context_dim, c.face_tokens, c.proj_mult)
        if c.body_branch:
            self.body_proj = TokenProjection(c.body_dim, c.context_dim, c.body_tokens, c.proj_mult)
        self.layers = nn.ModuleDict({layer_key(i): LayerKV(c.context_dim, h, c.body_branch)
                                     for i, h in enumerate(c.hidden_sizes)})

    @property
    def branches(self) -> tuple[Branch, ...]:
        """The branches this adapter holds: both, or only "face" for a FaceID import."""
        return BRANCHES if self.config.body_branch else ("face",)

    def layer(self, index: int) -> LayerKV:
        return self.layers[layer_key(index)]

    def projection(self, branch: Branch) -> TokenProjection:
        if branch == "face":
            return self.face_proj
        if not self.config.body_branch:
            raise MissingBranchError(NO_BODY_BRANCH)
        return self.body_proj

    @torch.no_grad()
    def init_kv_from_base(self, base_kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Initialise every branch's K/V from the UNet's own to_k / to_v weights (diffusers layer order)."""
        if len(base_kv) != self.config.num_layers:
            raise ValueError(f"expected {self.config.num_layers} (to_k, to_v) pairs, got {len(base_kv)}")
        for i, (w_k, w_v) in enumerate(base_kv):
            layer = self.layer(i)
            for branch in self.branches:
                to_k, to_v = layer.projections(branch)
                if to_k.weight.shape != w_k.shape or to_v.weight.shape != w_v.shape:
                    raise ValueError(f"layer {i}: base to_k/to_v shape {tuple(w_k.shape)} does not match "
                                     f"adapter {tuple(to_k.weight.shape)}")
                to_k.weight.copy_(w_k)
                to_v.weight.copy_(w_v)

    def tokens(self, branch: Branch, embeds: torch.Tensor) -> torch.Tensor:
        """Project [B, dim] embeddings (validated) to [B, N, context_dim] tokens."""
        proj = self.projection(branch)
        embeds = check_embedding(embeds, proj.in_dim, branch)
        ref = proj.norm.weight
        return proj(embeds.to(device=ref.device, dtype=ref.dtype))

    def branch_kv(self, index: int, branch: Branch, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        to_k, to_v = self.layer(index).projections(branch)
        return to_k(tokens), to_v(tokens)


def check_embedding(embeds: torch.Tensor, dim: int, what: str) -> torch.Tensor:
    """Accept [dim] or [B, dim]; refuse wrong sizes and non-finite values with a specific message."""
    if not isinstance(embeds, torch.Tensor):
        raise EmbeddingError(f"{what} embedding must be a tensor, got {type(embeds).__name__}")
    if embeds.ndim == 1:
        embeds = embeds.unsqueeze(0)
    if embeds.ndim != 2 or embeds.shape[-1] != dim:
        raise EmbeddingError(f"{what} embedding has shape {tuple(embeds.shape)}; this adapter expects [B, {dim}]")
    if not torch.isfinite(embeds).all():
        raise EmbeddingError(f"{what} embedding contains NaN or Inf values; re-encode the {what} from its images")
    return embeds
