"""Random weights of the real SD1.5 architecture, built with ComfyUI's own classes, plus a matching BoLID adapter.

    python tests/comfy_random_sd15.py COMFYUI_PATH CHECKPOINT.safetensors ADAPTER.safetensors [--body-dim 32]
        [--controlnet CONTROLNET.safetensors]

Writes a single-file SD1.5 checkpoint (UNet + CLIP-L text encoder + VAE, fp16, ~2 GB) that ComfyUI's
CheckpointLoaderSimple detects as SD1.5, and a BoLID adapter for it whose per-layer face/body K/V start as copies
of the UNet's own to_k/to_v (diffusers layer order, as training initialises them). Run as a separate process so
the ~4 GB of fp32 weights are freed before ComfyUI loads the file. ComfyUI's ops leave parameters uninitialised,
so every parameter is filled from a seeded generator: 1-D weights (norm scales) 1, biases 0, matrices
N(0, 1/fan_in). (Filling norm scales with 0 would make every ResBlock an identity and the UNet's output 0.)
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
# diffusers' cross-attention order (down blocks, up blocks, mid block) = BoLID's adapter layer order
DIFFUSERS_ATTN2 = ([f"down_blocks.{b}.attentions.{a}" for b in range(3) for a in range(2)]
                   + [f"up_blocks.{b}.attentions.{a}" for b in range(1, 4) for a in range(3)]
                   + ["mid_block.attentions.0"])


@torch.no_grad()
def fill_(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim <= 1:  # 1-D weights are norm scales (GroupNorm "in_layers.0", "out.0", LayerNorm, ...)
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        else:
            fan_in = math.prod(p.shape[1:])
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))


def build(comfyui: Path, checkpoint: Path, adapter_path: Path, body_dim: int = 32) -> None:
    sys.path.insert(0, str(comfyui))
    sys.path.insert(0, str(REPO))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.ldm.models.autoencoder
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.utils
    from safetensors.torch import save_file

    from bolid.adapter import BoLIDAdapter
    from bolid.adapter_io import save_adapter
    from bolid.config import AdapterConfig

    model = comfy.supported_models.SD15(dict(SD15_UNET)).get_model({})
    fill_(model.diffusion_model, 1)
    clip = comfy.sd1_clip.SD1ClipModel(device="cpu")
    fill_(clip, 2)
    vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(SD_VAE), embed_dim=4)
    fill_(vae, 3)
    state = model.state_dict_for_saving(clip.state_dict(), vae.state_dict())
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise RuntimeError(f"non-finite weights after filling: {bad[:5]}")
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()},
              str(checkpoint))

    # the adapter: K/V of every branch initialised from the UNet's own to_k/to_v, in diffusers order
    unet_sd = model.diffusion_model.state_dict()
    to_comfy = comfy.utils.unet_to_diffusers(model.model_config.unet_config)
    base_kv = [(unet_sd[to_comfy[f"{p}.transformer_blocks.0.attn2.to_k.weight"]],
                unet_sd[to_comfy[f"{p}.transformer_blocks.0.attn2.to_v.weight"]]) for p in DIFFUSERS_ATTN2]
    config = AdapterConfig(context_dim=768, hidden_sizes=tuple(int(k.shape[0]) for k, _ in base_kv),
                           body_dim=body_dim, face_tokens=4, body_tokens=4)
    torch.manual_seed(4)
    adapter = BoLIDAdapter(config)
    with torch.no_grad():
        adapter.init_kv_from_base([(k.float(), v.float()) for k, v in base_kv])
    adapter_path.parent.mkdir(parents=True, exist_ok=True)
    save_adapter(adapter, adapter_path)


@torch.no_grad()
def build_controlnet(comfyui: Path, path: Path) -> None:
    """A random-weight ControlNet of the SD1.5 architecture (ComfyUI's own cldm.ControlNet, 3-channel hint), in
    the layout ComfyUI's ControlNetLoader detects (zero_convs / input_hint_block / middle_block_out keys), fp16."""
    sys.path.insert(0, str(comfyui))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.cldm.cldm
    from safetensors.torch import save_file

    config = {k: v for k, v in SD15_UNET.items() if k != "out_channels"}
    control = comfy.cldm.cldm.ControlNet(hint_channels=3, device="cpu", dtype=torch.float32, **config)
    fill_(control, 5)
    state = control.state_dict()
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise RuntimeError(f"non-finite ControlNet weights after filling: {bad[:5]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}, str(path))


if __name__ == "__main__":
    args = sys.argv[1:]
    dim = 32
    if "--controlnet" in args:
        i = args.index("--controlnet")
        build_controlnet(Path(args[0]), Path(args[i + 1]))
        del args[i:i + 2]
    if "--body-dim" in args:
        i = args.index("--body-dim")
        dim = int(args[i + 1])
        del args[i:i + 2]
    build(Path(args[0]), Path(args[1]), Path(args[2]), dim)
