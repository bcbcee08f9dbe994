"""One prepared GPU check, ready for the few minutes a GPU is lent: adapter overhead, perception, a training step.

    python benchmarks/gpu_check.py OUT_DIR [--comfyui /path/to/ComfyUI] [--face-pack DIR] [--pose-weights PT]
    python benchmarks/gpu_check.py OUT_DIR --device cpu --tiny      # shape and flow only (the test suite runs this)

Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md. Needs the README's install line, plus ``onnxruntime-gpu``
for the CUDA column of the perception part and a ComfyUI checkout (``--comfyui`` or COMFYUI_PATH) for the ComfyUI
rows. A part (or a row) whose dependency is missing is written as skipped with the reason; a part that fails is
written as an error and the others still run. Every model has random weights (nothing is downloaded).

1. ``adapter``: one UNet step at SDXL size (1024x1024 -> 128x128 latent, batch 1, fp16, 77 text tokens): unpatched,
   BoLID with both branches active, BoLID with weights 0, and diffusers' stock IP-Adapter processors holding
   BoLID's two exported branches; then ComfyUI's SDXL UNet unpatched / Apply BoLID Adapter active / weights 0.
   Each round times every variant once in a shuffled order (``torch.cuda.synchronize`` around each call);
   ratios are taken within a round and the median over the rounds is reported.
2. ``perception``: images per second of BoLID's pose runner (a random yolo11n-pose exported to ONNX at 640, or
   ``--pose-weights``) and face embedder (a tiny stand-in pack, or ``--face-pack``) on onnxruntime's CPU and
   CUDA providers.
3. ``train``: the stage-2 training loop (``training.stage2_loop.train_stage2_loop``, accelerate's mixed precision)
   at SD1.5 size (512x512, SD1.5-size UNet and VAE, YOLO11n-pose, open_clip ViT-B-32) in fp16 and bf16, auxiliary
   losses off and on (on every row: the full cost): median seconds per optimizer step after one warm-up step and
   the peak ``torch.cuda.max_memory_allocated`` over the run.

``--tiny`` swaps every model for the test suite's tiny ones (seconds on a CPU): the figures then mean nothing,
only the flow and the output files are checked.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import importlib.util
import json
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import torch  # noqa: E402

logger = logging.getLogger("bolid.gpu_check")

SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2048,
                 attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
COMFY_SDXL_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
                   "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
                   "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
                   "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
                   "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
                   "use_temporal_attention": False, "use_temporal_resblock": False}
FACE_TOKENS, BODY_TOKENS, BODY_DIM = 4, 4, 128
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class Skip(Exception):  # noqa: N818 - a part's "not run, and why", not a failure
    """A part or row cannot run here (a dependency or a device is missing); the message says why."""


def _require(module: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise Skip(f"{module} is not installed ({what})")


class Clock:
    """Wall time of one call, synchronised with the device so queued GPU work is counted."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object]) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start


def interleaved(variants: dict[str, Callable[[], object]], rounds: int, clock: Clock, base: str,
                seed: int = 0) -> list[dict[str, Any]]:
    """Each round times every variant once in a shuffled order; per-round ratios to ``base``, medians over rounds."""
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for fn in variants.values():  # warm-up: kernels, caches, the adapter's K/V
            fn()
            fn()
        for _ in range(rounds):
            order = list(variants)
            rng.shuffle(order)
            for name in order:
                times[name].append(clock.time(variants[name]))
    rows = []
    for name, values in times.items():
        ratios = [v / b for v, b in zip(values, times[base], strict=True)]
        rows.append({"variant": name, "median_ms": 1000 * statistics.median(values),
                     "median_ratio": statistics.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios),
                     "rounds": rounds})
    return rows


# ----------------------------------------------------------------------------------------------- 1. adapter


def diffusers_variants(device: torch.device, dtype: torch.dtype, tiny: bool) -> dict[str, Callable[[], object]]:
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from bolid.adapter_io import export_ip_adapter
    from bolid.diffusers_integration import BoLIDDiffusers, adapter_config_for_unet, init_adapter_from_unet

    torch.manual_seed(0)
    if tiny:
        from tiny_unets import CTX, tiny_sdxl_unet

        unet, latent, ctx, pooled, tokens, body_dim = tiny_sdxl_unet(), 8, CTX, 8, 7, 16
    else:
        with torch.device(device):  # initialise on the device: 2.6 B parameters
            unet = UNet2DConditionModel(**SDXL_UNET)
        latent, ctx, pooled, tokens, body_dim = 128, 2048, 1280, 77, BODY_DIM
    unet = unet.to(device=device, dtype=dtype).eval().requires_grad_(False)
    config = adapter_config_for_unet(unet, body_dim=body_dim, face_tokens=FACE_TOKENS, body_tokens=BODY_TOKENS)
    adapter = init_adapter_from_unet(unet, config).to(device=device, dtype=dtype).eval().requires_grad_(False)
    face = torch.nn.functional.normalize(torch.randn(1, 512), dim=-1).to(device, dtype)
    body = torch.randn(1, body_dim).to(device, dtype)
    x = torch.randn(1, 4, latent, latent).to(device, dtype)
    t = torch.tensor([500], device=device)
    text = torch.randn(1, tokens, ctx).to(device, dtype)
    added = {"text_embeds": torch.randn(1, pooled).to(device, dtype),
             "time_ids": torch.tensor([[8.0 * latent, 8.0 * latent, 0, 0, 8.0 * latent, 8.0 * latent]]).to(device, dtype)}

    with tempfile.TemporaryDirectory() as folder:
        export_ip_adapter(adapter, "face", Path(folder) / "face.safetensors")
        export_ip_adapter(adapter, "body", Path(folder) / "body.safetensors")
        pipe = StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                         tokenizer_2=None, unet=copy.deepcopy(unet), scheduler=DDIMScheduler(),
                                         image_encoder=None, feature_extractor=None)
        pipe.load_ip_adapter([folder, folder], subfolder=["", ""], image_encoder_folder=None,
                             weight_name=["face.safetensors", "body.safetensors"])
        pipe.set_ip_adapter_scale([1.0, 1.0])
        stock = pipe.unet.to(device=device, dtype=dtype)
    stock_added = {**added, "image_embeds": [face[:, None], body[:, None]]}

    base_processors = dict(unet.attn_processors)
    controller = BoLIDDiffusers.attach(unet, adapter, 1.0, 1.0)
    bolid_processors = dict(unet.attn_processors)
    controller.set_identity(face, body)

    def run(processors: dict, weights: tuple[float, float] | None = None) -> Callable[[], object]:
        def step() -> object:
            unet.set_attn_processor(dict(processors))
            if weights is not None:
                controller.set_weights(*weights)
            return unet(x, t, encoder_hidden_states=text, added_cond_kwargs=added).sample
        return step

    return {"diffusers unpatched": run(base_processors),
            "diffusers BoLID active": run(bolid_processors, (1.0, 1.0)),
            "diffusers BoLID weights 0": run(bolid_processors, (0.0, 0.0)),
            "diffusers stock IP-Adapter x2": lambda: stock(x, t, encoder_hidden_states=text,
                                                           added_cond_kwargs=stock_added).sample}


def _load_pack() -> Any:
    if "bolid_pack" in sys.modules:
        return sys.modules["bolid_pack"]
    spec = importlib.util.spec_from_file_location("bolid_pack", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["bolid_pack"] = pack
    spec.loader.exec_module(pack)
    return pack


def comfy_variants(comfy_path: Path, device: torch.device, dtype: torch.dtype, tiny: bool
                   ) -> dict[str, Callable[[], object]]:
    if not (comfy_path / "comfy").is_dir():
        raise Skip(f"{comfy_path} is not a ComfyUI checkout (no comfy/ folder)")
    sys.path.insert(0, str(comfy_path))
    import comfy.cli_args

    if device.type == "cpu":
        comfy.cli_args.args.cpu = True
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    pack = _load_pack()
    if tiny:
        from comfy_tiny import TINY_SDXL_LAYOUT_UNET

        unet_config = {**TINY_SDXL_LAYOUT_UNET, "num_classes": "sequential", "adm_in_channels": 16}
        latent, ctx, tokens, body_dim = 8, unet_config["context_dim"], 7, 16
    else:
        unet_config, latent, ctx, tokens, body_dim = dict(COMFY_SDXL_UNET), 128, 2048, 77, BODY_DIM
    model_config = comfy.supported_models.SDXL(unet_config)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():  # ComfyUI's ops leave parameters uninitialised
        for name, p in model.diffusion_model.named_parameters():
            scale, shift = (0.1, 1.0) if p.ndim == 1 and name.endswith("weight") else (0.02, 0.0)
            p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32) * scale + shift)
    model.diffusion_model.to(device=device, dtype=dtype)
    model.eval()
    patcher = comfy.model_patcher.ModelPatcher(model, device, comfy.model_management.unet_offload_device())
    comfy_layers = pack.nodes.comfy_layers
    layers = comfy_layers.adapter_layer_order(comfy_layers.enumerate_cross_attention_layers(model.diffusion_model))
    config = pack.bolid.config.AdapterConfig(context_dim=ctx, hidden_sizes=tuple(la.hidden_size for la in layers),
                                             body_dim=body_dim, face_tokens=FACE_TOKENS, body_tokens=BODY_TOKENS)
    adapter = pack.bolid.adapter.BoLIDAdapter(config).eval().requires_grad_(False)
    loaded = pack.nodes.adapter_nodes.LoadedAdapter(adapter, "gpu_check")
    identity = pack.bolid.identity
    face, body = identity.FaceEmbeds(torch.randn(512)), identity.BodyID(torch.randn(body_dim))
    apply = pack.nodes.adapter_nodes.ApplyBoLIDAdapter()
    active = apply.apply(patcher, loaded, 1.0, 1.0, 0.0, 1.0, body_id=body, face_embeds=face)[0]
    zero = apply.apply(patcher, loaded, 0.0, 0.0, 0.0, 1.0, body_id=body, face_embeds=face)[0]
    x = torch.randn(1, 4, latent, latent).to(device, dtype)
    t = torch.tensor([500.0], device=device)
    text = torch.randn(1, tokens, ctx).to(device, dtype)
    y = torch.randn(1, unet_config["adm_in_channels"]).to(device, dtype)
    sigma = model.model_sampling.sigma(torch.tensor(500.0)).reshape(1).to(device)

    def run(m: Any) -> Callable[[], object]:
        options = dict(m.model_options["transformer_options"], cond_or_uncond=[0], sigmas=sigma)
        return lambda: model.diffusion_model(x, timesteps=t, context=text, y=y, transformer_options=dict(options))

    return {"ComfyUI unpatched": run(patcher), "ComfyUI BoLID active": run(active),
            "ComfyUI BoLID weights 0": run(zero)}


def part_adapter(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    dtype = DTYPES[args.dtype]
    clock = Clock(device)
    result: dict[str, Any] = {"status": "ok", "dtype": args.dtype, "batch": 1,
                              "image": "64x64 (tiny)" if args.tiny else "1024x1024 (latent 128x128)", "tables": {}}
    result["tables"]["diffusers"] = interleaved(diffusers_variants(device, dtype, args.tiny), args.rounds, clock,
                                                "diffusers unpatched")
    _free(device)
    try:
        if not args.comfyui:
            raise Skip("no ComfyUI checkout (pass --comfyui or set COMFYUI_PATH)")
        result["tables"]["comfyui"] = interleaved(comfy_variants(Path(args.comfyui), device, dtype, args.tiny),
                                                  args.rounds, clock, "ComfyUI unpatched")
        version = Path(args.comfyui) / "comfyui_version.py"
        result["comfyui_version"] = version.read_text().split('"')[-2] if version.is_file() else "unknown"
    except Skip as exc:
        result["comfyui_skipped"] = str(exc)
    _free(device)
    return result


# ----------------------------------------------------------------------------------------------- 2. perception


def _tiny_pose_onnx(path: Path) -> Path:
    """A pose-shaped ONNX model (YOLO pose output layout and metadata) with a few convolutions: flow only."""
    import onnx

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4, padding=1), torch.nn.SiLU(),
                                           torch.nn.Conv2d(8, 56, 3, stride=4, padding=1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x).flatten(2)

    torch.manual_seed(0)
    torch.onnx.export(Head(), (torch.zeros(1, 3, 64, 64),), str(path), input_names=["images"],
                      output_names=["output0"], opset_version=17, dynamo=False)
    model = onnx.load(str(path))
    for key, value in {"task": "pose", "kpt_shape": "[17, 3]", "names": "{0: 'person'}", "stride": "32",
                       "imgsz": "[64, 64]"}.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


def _images_per_second(fn: Callable[[], object], n: int, repeats: int) -> float:
    fn()  # warm-up (session allocations, CUDA kernels)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return n / statistics.median(times)


def part_perception(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    _require("onnxruntime", "the perception runners")
    import numpy as np
    import onnxruntime as ort

    from bolid.face import FaceAnalyzer
    from bolid.pose import PoseRunner

    work = Path(tempfile.mkdtemp(prefix="bolid-gpu-check-"))
    providers = ["CPU"]
    skipped = {}
    if device.type != "cuda":
        skipped["CUDA"] = f"--device {device.type}"
    elif "CUDAExecutionProvider" not in ort.get_available_providers():
        skipped["CUDA"] = ("this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu, after "
                           f"uninstalling onnxruntime); available: {ort.get_available_providers()}")
    else:
        providers.append("CUDA")
    rng = np.random.default_rng(0)
    if args.tiny:
        pose_path, pose_label = _tiny_pose_onnx(work / "tiny-pose.onnx"), "tiny pose-shaped ONNX (64)"
        images = [rng.integers(0, 255, (96, 128, 3), dtype=np.uint8) for _ in range(2)]
    else:
        from bolid.pose import export_pose_onnx

        _require("ultralytics", "exporting the YOLO pose model")
        weights = Path(args.pose_weights) if args.pose_weights else None
        if weights is None:
            import ultralytics
            import yaml

            cfg = yaml.safe_load((Path(ultralytics.__file__).parent / "cfg/models/11/yolo11-pose.yaml").read_text())
            cfg["nc"] = 1
            weights = work / "yolo11n-pose.yaml"  # the "n" in the name selects the nano scale; random weights
            weights.write_text(yaml.safe_dump(cfg))
        pose_path = export_pose_onnx(weights, imgsz=640, output=work / "pose.onnx")
        pose_label = f"{'random yolo11n-pose' if not args.pose_weights else weights.name} (640)"
        images = [rng.integers(0, 255, (720, 1280, 3), dtype=np.uint8) for _ in range(8)]
    if args.face_pack:
        face_pack, face_label = Path(args.face_pack), Path(args.face_pack).name
    else:
        from test_face import build_tiny_pack, face_photo

        face_pack, face_label = build_tiny_pack(work / "tinypack"), "tiny stand-in pack"
    faces = [face_photo((480, 640), (200, 120, 220), seed=i) for i in range(4)] if not args.face_pack else images
    rows = []
    for provider in providers:
        runner = PoseRunner(pose_path, provider)
        pose_ips = _images_per_second(lambda r=runner: [r.detect(im) for im in images], len(images), args.repeats)
        analyzer = FaceAnalyzer(face_pack, provider)
        face_ips = _images_per_second(lambda a=analyzer: a.embed(faces, no_face="skip"), len(faces), args.repeats)
        rows.append({"provider": provider, "active_pose": runner.provider, "active_face": analyzer.provider,
                     "pose_images_per_s": pose_ips, "face_images_per_s": face_ips})
    return {"status": "ok", "pose_model": pose_label, "face_pack": face_label, "pose_images": len(images),
            "face_images": len(faces), "repeats": args.repeats, "rows": rows, "skipped": skipped,
            "onnxruntime": ort.__version__}


# ----------------------------------------------------------------------------------------------- 3. train


def sd15_size_components(device: torch.device, pose_imgsz: int) -> Any:
    _require("open_clip", "the CLIP loss")
    _require("ultralytics", "the pose loss")
    import open_clip
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from bolid.pose import ultralytics_offline_env
    from training.models import OpenClipFunctions, YoloPoseNet
    from training.stage2_components import Stage2Components

    ultralytics_offline_env()
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    pose = YoloPoseNet.from_file("yolo11n-pose.yaml", imgsz=pose_imgsz)
    clip = OpenClipFunctions.from_model(open_clip.create_model("ViT-B-32"), open_clip.get_tokenizer("ViT-B-32"))
    return Stage2Components(unet=unet, noise_scheduler=DDPMScheduler(), vae=vae, pose_net=pose,
                            clip_image=clip.image, clip_text=clip.text, base_model="sd15-size random")


def _reset_accelerate() -> None:
    """A fresh accelerate state, so the next loop may use another mixed precision in this process."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train_one(components: Any, precision: str, aux: bool, steps: int, batch: int, latent: int, tiny: bool,
              device: torch.device) -> dict[str, Any]:
    import stage2_tiny as T

    from bolid.diffusers_integration import adapter_config_for_unet, init_adapter_from_unet
    from training.stage2_loop import Stage2TrainingConfig, train_stage2_loop
    from training.stage2_model import LossConfig
    from training.stage2_sampling import SamplingConfig, Stage2Data, Stage2Identity

    ctx = components.unet.config.cross_attention_dim
    body_dim = T.BODY_DIM if tiny else BODY_DIM
    torch.manual_seed(0)
    config = adapter_config_for_unet(components.unet, body_dim=body_dim)
    adapter = init_adapter_from_unet(components.unet, config)
    idents = T.identities(n=2, views=3, shapes=((latent, latent),), image_scale=8 if not tiny else 2)
    if not tiny:  # the real body-ID width
        idents = [Stage2Identity(i.name, i.samples, i.captions, torch.randn(3, body_dim), torch.zeros(3, body_dim),
                                 i.body_weights, i.keypoints, i.face, i.face_valid) for i in idents]
    text = {c: (torch.randn(7 if tiny else 77, ctx), None) for i in idents for c in i.captions + [""]}
    data = Stage2Data(idents, SamplingConfig(drop_text=0, drop_face=0, drop_body=0, drop_all=0), text_cache=text)
    lc = LossConfig(id_weight=0.1 if aux else 0.0, clip_weight=0.1 if aux else 0.0, id_max_timestep=1000,
                    clip_max_timestep=1000)
    tc = Stage2TrainingConfig(max_steps=steps + 1, batch_size=batch, warmup_steps=0, mixed_precision=precision,
                              report_to="none", learning_rate=1e-5)
    clock = Clock(device)
    stamps: list[float] = []

    def on_step(step: int, logs: dict[str, float]) -> None:
        clock.sync()
        stamps.append(time.perf_counter())

    _reset_accelerate()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = train_stage2_loop(components, adapter, data, tc, lc, seed=0, on_step=on_step)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    last = result["losses"][-1]
    del adapter, result
    return {"precision": precision, "aux_losses": aux, "batch": batch, "steps_timed": steps,
            "median_step_s": statistics.median(b - a for a, b in zip(stamps, stamps[1:], strict=False)),
            "peak_cuda_mb": peak, "loss": last["loss"], "id_rows": last.get("id_rows", 0.0),
            "clip_rows": last.get("clip_rows", 0.0)}


def part_train(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    import stage2_tiny as T

    if args.tiny:
        components, latent, batch = T.components("sd15", pose=True, clip=True), 8, 1
    else:
        components, latent, batch = sd15_size_components(device, 512), 64, args.train_batch
    rows, skipped = [], {}
    try:
        for precision in ("fp16", "bf16"):
            if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
                skipped[precision] = f"{torch.cuda.get_device_name(device)} has no bf16"
                continue
            for aux in (False, True):
                rows.append(train_one(components, precision, aux, args.train_steps, batch, latent, args.tiny,
                                      device))
                _free(device)
                logger.info("train: %s", rows[-1])
    finally:
        _reset_accelerate()  # leave no mixed-precision state behind for the caller's process
    return {"status": "ok", "image": "16x16 (tiny)" if args.tiny else "512x512 (latent 64x64)", "rows": rows,
            "skipped": skipped}


# ----------------------------------------------------------------------------------------------- report


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def environment(device: torch.device) -> dict[str, Any]:
    import diffusers

    env = {"date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"), "python": platform.python_version(),
           "torch": torch.__version__, "diffusers": diffusers.__version__, "cpu": platform.processor() or
           platform.machine(), "cpu_cores": os.cpu_count(), "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["gpu_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 2 ** 30, 1)
    return env


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    where = env.get("gpu", f"CPU ({env['cpu']}, {env['cpu_cores']} cores)")
    lines = [f"# BoLID GPU check, {env['date_utc']} UTC, {where}", "",
             f"torch {env['torch']}" + (f", CUDA {env['cuda']}" if "cuda" in env else "") +
             f", diffusers {env['diffusers']}; {'TINY models: flow check only, figures mean nothing' if report['tiny'] else 'random weights at real sizes'}; "
             f"total {report['total_s']:.0f} s", ""]
    for name, part in report["parts"].items():
        lines.append(f"## {name}")
        if part["status"] != "ok":
            lines += ["", f"{part['status']}: {part['reason']}", ""]
            continue
        if name == "adapter":
            lines += ["", f"UNet step, {part['image']}, batch 1, {part['dtype']}; median over {report['rounds']} "
                          "interleaved rounds", "",
                      "| variant | median step (ms) | median ratio vs unpatched | min..max ratio |", "|---|---|---|---|"]
            for table in part["tables"].values():
                lines += [f"| {r['variant']} | {r['median_ms']:.1f} | x{r['median_ratio']:.3f} | "
                          f"{r['min_ratio']:.3f}..{r['max_ratio']:.3f} |" for r in table]
            if "comfyui_skipped" in part:
                lines.append(f"\nComfyUI rows skipped: {part['comfyui_skipped']}")
        elif name == "perception":
            lines += ["", f"pose: {part['pose_model']}, {part['pose_images']} images; face: {part['face_pack']}, "
                          f"{part['face_images']} images; onnxruntime {part['onnxruntime']}", "",
                      "| provider (active) | pose images/s | face embeds/s |", "|---|---|---|"]
            lines += [f"| {r['provider']} ({r['active_pose']}) | {r['pose_images_per_s']:.1f} | "
                      f"{r['face_images_per_s']:.1f} |" for r in part["rows"]]
        elif name == "train":
            lines += ["", f"stage-2 loop, {part['image']}, batch {part['rows'][0]['batch'] if part['rows'] else '-'}",
                      "", "| precision | aux losses | median s/step | peak CUDA MB |", "|---|---|---|---|"]
            for r in part["rows"]:
                peak = "-" if r["peak_cuda_mb"] is None else f"{r['peak_cuda_mb']:.0f}"
                lines.append(f"| {r['precision']} | {'on' if r['aux_losses'] else 'off'} | "
                             f"{r['median_step_s']:.3f} | {peak} |")
        for what, why in part.get("skipped", {}).items():
            lines.append(f"\n{what} skipped: {why}")
        lines.append("")
    return "\n".join(lines)


PARTS: dict[str, Callable[[argparse.Namespace, torch.device], dict[str, Any]]] = {
    "adapter": part_adapter, "perception": part_perception, "train": part_train}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny test models: checks the flow, not the speed")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="adapter part (default fp16 on GPU)")
    parser.add_argument("--rounds", type=int, default=None, help="adapter rounds (default 20, tiny 2)")
    parser.add_argument("--repeats", type=int, default=None, help="perception repeats (default 10, tiny 1)")
    parser.add_argument("--train-steps", type=int, default=None, help="timed training steps (default 5, tiny 1)")
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout (ComfyUI rows)")
    parser.add_argument("--face-pack", default=None, help="an InsightFace pack folder (default: tiny stand-in)")
    parser.add_argument("--pose-weights", default=None, help="a local yolo11*-pose.pt (default: random yolo11n-pose)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device (use --device cpu --tiny for a flow check)")
    args.dtype = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    args.rounds = args.rounds or (2 if args.tiny else 20)
    args.repeats = args.repeats or (1 if args.tiny else 10)
    args.train_steps = args.train_steps or (1 if args.tiny else 5)
    unknown = sorted(set(args.parts.split(",")) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; known: {sorted(PARTS)}")
    os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="bolid-yolo-"))
    start = time.perf_counter()
    report: dict[str, Any] = {"tiny": args.tiny, "rounds": args.rounds, "environment": environment(device),
                              "parts": {}}
    for name in args.parts.split(","):
        t0 = time.perf_counter()
        try:
            part = PARTS[name](args, device)
        except Skip as exc:
            part = {"status": "skipped", "reason": str(exc)}
        except Exception as exc:  # one failing part must not lose the figures of the others
            logger.error("part %s failed:\n%s", name, traceback.format_exc())
            part = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
        part["seconds"] = round(time.perf_counter() - t0, 1)
        report["parts"][name] = part
        logger.info("part %s: %s in %.1f s", name, part["status"], part["seconds"])
        _free(device)
    report["total_s"] = time.perf_counter() - start
    args.out_dir.mkdir(parents=True, exist_ok=True)
    from bolid.safetensors_io import atomic_write_text

    atomic_write_text(args.out_dir / "gpu_check.json", json.dumps(report, indent=2, default=str))
    atomic_write_text(args.out_dir / "gpu_check.md", markdown(report))
    logger.info("wrote %s and %s", args.out_dir / "gpu_check.json", args.out_dir / "gpu_check.md")
    return 1 if any(p["status"] == "error" for p in report["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
