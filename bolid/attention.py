"""The one decoupled cross-attention used by every path (diffusers, ComfyUI, training).

    Z' = Attn(Q, K_t, V_t) + w_face * Attn(Q, K_f, V_f) + w_body * Attn(Q, K_b, V_b)

Tensors use the [B, seq, heads * dim_head] layout that both diffusers' projections and ComfyUI's
``optimized_attention`` work in; the attention function itself is injectable so ComfyUI can pass its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

AttentionFn = Callable[..., torch.Tensor]  # (q, k, v, heads) -> [B, seq, heads * dim_head]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None,
                   **_: object) -> torch.Tensor:
    """Multi-head attention on [B, seq, heads*dim] tensors, as diffusers' AttnProcessor2_0 computes it.

    ``mask`` is an additive or boolean mask broadcastable to [B, heads, q_len, k_len].
    """
    b, _, inner = q.shape
    dim_head = inner // heads
    dtype = q.dtype
    q, k, v = (t.reshape(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(b, -1, heads * dim_head).to(dtype)


@dataclass
class BranchKV:
    """Keys/values of one extra branch for the whole batch, its weight, and an optional spatial mask.

    ``mask`` broadcasts against the branch output [B, seq, inner] (typically [B or 1, seq, 1]).
    """

    key: torch.Tensor
    value: torch.Tensor
    scale: float
    mask: torch.Tensor | None = None


def decoupled_cross_attention(q: torch.Tensor, k_text: torch.Tensor, v_text: torch.Tensor, heads: int,
                              branches: Sequence[BranchKV], attention: AttentionFn = sdpa_attention,
                              base: torch.Tensor | None = None) -> torch.Tensor:
    """Text attention (or a precomputed ``base``) plus each weighted branch; zero-weight branches cost nothing."""
    out = attention(q, k_text, v_text, heads) if base is None else base
    for branch in branches:
        if branch.scale == 0:
            continue
        branch_out = attention(q, branch.key, branch.value, heads)
        if branch.mask is not None:
            branch_out = branch_out * branch.mask.to(branch_out.dtype)
        out = out + branch.scale * branch_out
    return out
