"""UNet step time with BoLID vs without, side by side in one run, as median ratios over alternating rounds.

    python benchmarks/adapter_overhead.py [--latent 64] [--batch 2] [--rounds 10] [--comfyui /path/to/ComfyUI]

SD1.5-size UNet with random weights (no download). Each round times every variant once, in a shuffled order, so
drift and noise hit all variants alike; ratios are taken within a round, then the median over rounds is printed.
Variants (diffusers): BoLID both branches active, BoLID with weights 0, and diffusers' stock IP-Adapter processors
with two adapters of the same token counts (BoLID's two branches exported). With --comfyui (or COMFYUI_PATH):
the same SD1.5 UNet built by ComfyUI, patched by "Apply BoLID Adapter": active, weights 0, and outside the
start/end range.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bolid.adapter_io import export_ip_adapter  # noqa: E402
from bolid.diffusers_integration import BoLIDDiffusers, adapter_config_for_unet, init_adapter_from_unet  # noqa: E402

logger = logging.getLogger("bolid.bench")
SD15_CONFIG = {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8,
               "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2}
FACE_TOKENS, BODY_TOKENS, BODY_DIM = 4, 4, 128


def diffusers_variants(latent: int, batch: int) -> dict[str, Callable[[], object]]:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_CONFIG).eval().requires_grad_(False)
    config = adapter_config_for_unet(unet, body_dim=BODY_DIM, face_tokens=FACE_TOKENS, body_tokens=BODY_TOKENS)
    adapter = init_adapter_from_unet(unet, config).eval().requires_grad_(False)
    face = torch.nn.functional.normalize(torch.randn(batch, 512), dim=-1)
    body = torch.randn(batch, BODY_DIM)
    x, t, text = torch.randn(batch, 4, latent, latent), torch.tensor([500] * batch), torch.randn(batch, 77, 768)

    with tempfile.TemporaryDirectory() as folder:
        export_ip_adapter(adapter, "face", Path(folder) / "face.safetensors")
        export_ip_adapter(adapter, "body", Path(folder) / "body.safetensors")
        pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=copy.deepcopy(unet),
                                       scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                       image_encoder=None, requires_safety_checker=False)
        pipe.load_ip_adapter([folder, folder], subfolder=["", ""], image_encoder_folder=None,
                             weight_name=["face.safetensors", "body.safetensors"])
        pipe.set_ip_adapter_scale([1.0, 1.0])
        stock_unet = pipe.unet
    stock_embeds = {"image_embeds": [face[:, None], body[:, None]]}

    base_processors = dict(unet.attn_processors)
    controller = BoLIDDiffusers.attach(unet, adapter, 1.0, 1.0)
    bolid_processors = dict(unet.attn_processors)
    controller.set_identity(face, body)

    def run(processors, weights=None):
        def step():
            unet.set_attn_processor(dict(processors))
            if weights is not None:
                controller.set_weights(*weights)
            return unet(x, t, encoder_hidden_states=text).sample
        return step

    return {
        "diffusers base": run(base_processors),
        "diffusers BoLID active": run(bolid_processors, (1.0, 1.0)),
        "diffusers BoLID weights 0": run(bolid_processors, (0.0, 0.0)),
        "diffusers stock IP-Adapter x2": lambda: stock_unet(x, t, encoder_hidden_states=text,
                                                            added_cond_kwargs=stock_embeds).sample,
    }


def comfy_variants(comfy_path: Path, latent: int, batch: int) -> dict[str, Callable[[], object]]:
    sys.path.insert(0, str(comfy_path))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import importlib.util

    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    spec = importlib.util.spec_from_file_location("bolid_pack", REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["bolid_pack"] = pack
    spec.loader.exec_module(pack)

    unet_config = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
                   "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
                   "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                   "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
                   "context_dim": 768, "num_head_channels": -1, "use_temporal_attention": False,
                   "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_resblock": False}
    model = comfy.supported_models.SD15(unet_config).get_model({})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    patcher = comfy.model_patcher.ModelPatcher(model, comfy.model_management.get_torch_device(),
                                               comfy.model_management.unet_offload_device())
    layers = pack.nodes.comfy_layers.adapter_layer_order(
        pack.nodes.comfy_layers.enumerate_cross_attention_layers(model.diffusion_model))
    config = pack.bolid.config.AdapterConfig(context_dim=768, hidden_sizes=tuple(la.hidden_size for la in layers),
                                             body_dim=BODY_DIM, face_tokens=FACE_TOKENS, body_tokens=BODY_TOKENS)
    adapter = pack.bolid.adapter.BoLIDAdapter(config).eval().requires_grad_(False)
    loaded = pack.nodes.adapter_nodes.LoadedAdapter(adapter, "bench")
    identity = pack.bolid.identity
    face, body = identity.FaceEmbeds(torch.randn(512)), identity.BodyID(torch.randn(BODY_DIM))
    apply = pack.nodes.adapter_nodes.ApplyBoLIDAdapter()
    active = apply.apply(patcher, loaded, 1.0, 1.0, 0.0, 1.0, body_id=body, face_embeds=face)[0]
    zero = apply.apply(patcher, loaded, 0.0, 0.0, 0.0, 1.0, body_id=body, face_embeds=face)[0]
    outside = apply.apply(patcher, loaded, 1.0, 1.0, 0.9, 1.0, body_id=body, face_embeds=face)[0]
    x, t, text = torch.randn(batch, 4, latent, latent), torch.tensor([500.0] * batch), torch.randn(batch, 77, 768)
    sigma = torch.tensor([float(model.model_sampling.sigma(torch.tensor(500.0)))] * batch)
    layout = [1, 0] if batch % 2 == 0 else [0]

    def run(m):
        options = dict(m.model_options["transformer_options"], cond_or_uncond=layout, sigmas=sigma)
        return lambda: model.diffusion_model(x, timesteps=t, context=text, transformer_options=dict(options))

    return {"comfy base": run(patcher), "comfy BoLID active": run(active), "comfy BoLID weights 0": run(zero),
            "comfy BoLID outside range": run(outside)}


def measure(variants: dict[str, Callable[[], object]], rounds: int, seed: int = 0) -> dict[str, list[float]]:
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for fn in variants.values():  # warm-up (first-call allocations, K/V caches)
            fn()
        for r in range(rounds):
            order = list(variants)
            rng.shuffle(order)
            for name in order:
                start = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - start)
            logger.info("round %d/%d: %s", r + 1, rounds, ", ".join(f"{n} {times[n][-1]:.2f}s" for n in variants))
    return times


def report(times: dict[str, list[float]], base: str) -> list[str]:
    lines = [f"| variant | median step (s) | median ratio vs {base} | min..max ratio |", "|---|---|---|---|"]
    for name, values in times.items():
        ratios = [v / b for v, b in zip(values, times[base], strict=True)]
        lines.append(f"| {name} | {statistics.median(values):.3f} | x{statistics.median(ratios):.3f} | "
                     f"{min(ratios):.3f}..{max(ratios):.3f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--comfyui", type=Path, default=os.environ.get("COMFYUI_PATH"))
    parser.add_argument("--skip-diffusers", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = [f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
           f"threads {torch.get_num_threads()}; SD1.5-size UNet, latent {args.latent}x{args.latent}, batch "
           f"{args.batch}, {args.rounds} rounds"]
    if not args.skip_diffusers:
        out += report(measure(diffusers_variants(args.latent, args.batch), args.rounds), "diffusers base")
    if args.comfyui:
        out += report(measure(comfy_variants(args.comfyui, args.latent, args.batch), args.rounds), "comfy base")
    print("\n".join(out))  # the benchmark's result table is its output


if __name__ == "__main__":
    main()
