"""A tiny SD1.5-architecture model inside a real ComfyUI, and the same weights as a diffusers UNet.

Only used by tests that have a real ComfyUI (COMFYUI_PATH); ComfyUI's ops leave parameters uninitialised, so
every parameter is filled from a seeded generator.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

CONTEXT_DIM = 64
TINY_SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 32, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 2, 2], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": CONTEXT_DIM, "num_head_channels": -1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


def use_cpu() -> None:
    import comfy.cli_args

    comfy.cli_args.args.cpu = True


def tiny_comfy_sd15(seed: int = 0):
    """(ModelPatcher, diffusers UNet with identical weights)."""
    use_cpu()
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    model = comfy.supported_models.SD15(dict(TINY_SD15_UNET)).get_model({})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if name.endswith("norm.weight") or ".norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))
    model.eval()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64, 64),
        cross_attention_dim=CONTEXT_DIM, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    comfy_sd = model.diffusion_model.state_dict()
    mapping = comfy.utils.unet_to_diffusers(model.model_config.unet_config)
    diffusers_sd = {k: comfy_sd[v] for k, v in mapping.items() if v in comfy_sd}
    missing, unexpected = unet.load_state_dict(diffusers_sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weight mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return patcher, unet.eval().requires_grad_(False)


# SDXL's block layout scaled down: no attention at the first level, several transformer layers per attention,
# a multi-layer middle block, linear proj_in/out. (The text_time "adm" input is left out: it does not touch
# cross-attention, and the layer mapping is what this model is for.)
TINY_SDXL_LAYOUT_UNET = {
    **TINY_SD15_UNET, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 2],
    "transformer_depth": [0, 0, 1, 1, 2, 2], "transformer_depth_middle": 2,
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2], "use_linear_in_transformer": True,
}


def tiny_comfy_sdxl_layout(seed: int = 0):
    """(ModelPatcher, diffusers UNet with identical weights) with SDXL's cross-attention layout."""
    use_cpu()
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    model = comfy.supported_models.SD15(dict(TINY_SDXL_LAYOUT_UNET)).get_model({})
    _fill(model.diffusion_model, seed)
    model.eval()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
        cross_attention_dim=CONTEXT_DIM, attention_head_dim=8, transformer_layers_per_block=(1, 1, 2),
        use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )
    _copy_weights(model, unet)
    return patcher, unet.eval().requires_grad_(False)


def _fill(module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):  # norm scales (GroupNorm/LayerNorm): around 1
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))


def _copy_weights(model, unet) -> None:
    import comfy.utils

    comfy_sd = model.diffusion_model.state_dict()
    mapping = comfy.utils.unet_to_diffusers(model.model_config.unet_config)
    missing, unexpected = unet.load_state_dict({k: comfy_sd[v] for k, v in mapping.items() if v in comfy_sd},
                                               strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weight mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")


def tiny_comfy_model(config_class: str = "SD15", unet_config: dict | None = None, seed: int = 0,
                     weight_dtype: torch.dtype | None = None, manual_cast_dtype: torch.dtype | None = None):
    """A ModelPatcher around a tiny random model of any ComfyUI family (``comfy.supported_models`` class name),
    optionally stored in ``weight_dtype`` and computed in ``manual_cast_dtype``, as ComfyUI's loaders do."""
    use_cpu()
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = getattr(comfy.supported_models, config_class)(dict(unet_config or TINY_SD15_UNET))
    if weight_dtype is not None:
        config.set_inference_dtype(weight_dtype, manual_cast_dtype)
    model = config.get_model({})
    _fill(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


# Layouts BoLID must refuse, kept tiny: a Flux DiT, an SD3 MMDiT, and SD2's UNet (text context 1024).
TINY_FLUX = {"image_model": "flux", "in_channels": 4, "out_channels": 4, "vec_in_dim": 8, "context_in_dim": 16,
             "hidden_size": 32, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
             "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": False}
TINY_SD3 = {"in_channels": 4, "out_channels": 4, "patch_size": 2, "depth": 2, "pos_embed_max_size": 16,
            "num_patches": 256, "adm_in_channels": 8, "pos_embed_scaling_factor": None,
            "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 16, "out_features": 128}}}
TINY_SD2_UNET = {**TINY_SD15_UNET, "model_channels": 64, "context_dim": 1024, "use_linear_in_transformer": True}
