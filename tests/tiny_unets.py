"""Tiny diffusers UNets with the block layouts of SD1.5 (16 cross-attention layers) and SDXL (70 -> scaled down).

Random weights, seeded; small enough for CPU tests in well under a second per forward.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

CTX = 32


def tiny_sd15_unet(seed: int = 0) -> UNet2DConditionModel:
    """SD1.5 layout: 3 cross-attn down blocks + 1 plain, mid with attention, 1 plain up + 3 cross-attn up."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(8, 16, 16, 16), norm_num_groups=4, cross_attention_dim=CTX, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    return unet.eval().requires_grad_(False)


def tiny_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """SDXL layout: plain first down block, several transformer layers per attention, text_time conditioning."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(8, 16, 16), norm_num_groups=4, cross_attention_dim=CTX, attention_head_dim=(2, 2, 4),
        transformer_layers_per_block=(1, 2, 3),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=4 * 6 + 8,
        use_linear_projection=True,
    )
    return unet.eval().requires_grad_(False)


def sdxl_added_cond(batch: int) -> dict[str, torch.Tensor]:
    return {"text_embeds": torch.randn(batch, 8), "time_ids": torch.randn(batch, 6)}


def randomize_(module: torch.nn.Module, std: float = 0.2, seed: int = 1) -> torch.nn.Module:
    """Give every parameter non-trivial random values (so branches differ from the base and each other)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module
