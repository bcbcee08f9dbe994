"""Stage-2 training step time and peak memory, with and without the auxiliary losses (L_id, L_CLIP).

    python benchmarks/train_step.py [--steps 3] [--sizes tiny,sd15] [--latent 8] [--batch 2] [--device cpu|cuda]

Each configuration runs in its own process (so peak RSS is per configuration): "tiny" = the test models (tiny
UNet/VAE, stand-in pose and CLIP); "sd15" = SD1.5-size UNet and VAE (random weights, real architecture), the
YOLO11n-pose network and an open_clip ViT-B-32 (random weights). Auxiliary losses run on every row (timestep
threshold 1000) so the figure is their full cost; in training they only run below the threshold. One step =
forward, backward and AdamW update of the adapter. With ``--device cuda`` the models and inputs live on the GPU,
each step is timed between ``torch.cuda.synchronize()`` calls and the peak is ``torch.cuda.max_memory_allocated``
(float32 weights; peak RSS is then host memory only).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def sd15_components():
    import open_clip
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from bolid.pose import ultralytics_offline_env
    from training.models import OpenClipFunctions, YoloPoseNet
    from training.stage2_core import Stage2Components

    ultralytics_offline_env()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    pose = YoloPoseNet.from_file("yolo11n-pose.yaml", imgsz=64)
    clip = OpenClipFunctions.from_model(open_clip.create_model("ViT-B-32"), open_clip.get_tokenizer("ViT-B-32"))
    return Stage2Components(unet=unet, noise_scheduler=DDPMScheduler(), vae=vae, pose_net=pose,
                            clip_image=clip.image, clip_text=clip.text, base_model="sd15-size random")


def run_config(size: str, aux: bool, steps: int, latent: int, batch: int, device: str, queue) -> None:
    import stage2_tiny as T
    import torch

    from bolid.diffusers_integration import adapter_config_for_unet, init_adapter_from_unet
    from training.stage2_core import (
        LossConfig,
        SamplingConfig,
        Stage2Data,
        Stage2Identity,
        Stage2Model,
        _cast_frozen,
    )

    torch.set_num_threads(os.cpu_count() or 1)
    comp = T.components("sd15") if size == "tiny" else sd15_components()
    comp.freeze()
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    _cast_frozen(comp, dev, torch.float32)  # every frozen module onto the device
    ctx = comp.unet.config.cross_attention_dim
    config = adapter_config_for_unet(comp.unet, body_dim=128 if size == "sd15" else T.BODY_DIM)
    adapter = init_adapter_from_unet(comp.unet, config).to(dev)
    idents = T.identities(n=2, views=3, shapes=((latent, latent),))
    if size == "sd15":  # body dim and text context of the real sizes
        idents = [Stage2Identity(i.name, i.samples, i.captions, torch.randn(3, 128), torch.zeros(3, 128),
                                 i.body_weights, i.keypoints, i.face, i.face_valid) for i in idents]
    text = {c: (torch.randn(77, ctx), None) for i in idents for c in i.captions + [""]}
    data = Stage2Data(idents, SamplingConfig(drop_text=0, drop_face=0, drop_body=0, drop_all=0), text_cache=text)
    lc = LossConfig(id_weight=0.1 if aux else 0.0, clip_weight=0.1 if aux else 0.0, id_max_timestep=1000,
                    clip_max_timestep=1000)
    model = Stage2Model(adapter, comp, lc)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-4)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for step in range(steps + 1):  # step 0 is a warm-up
        b = data.batch(step, batch)
        noise = torch.randn(b["sample"].shape).to(dev)
        timesteps = torch.randint(0, 1000, (batch,)).to(dev)
        if cuda:
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        out = model(b, noise, timesteps)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"size": size, "aux": aux, "device": device, "step_s": sum(times[1:]) / steps,
               "peak_rss_mb": peak / 1024, "rss_before_steps_mb": rss_before / 1024,
               "peak_cuda_mb": torch.cuda.max_memory_allocated(dev) / 2 ** 20 if cuda else None,
               "id_rows": float(out["id_rows"]), "clip_rows": float(out["clip_rows"])})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sizes", default="tiny,sd15")
    parser.add_argument("--latent", type=int, default=8, help="latent side (image side = 8x for SD1.5-size)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    args = parser.parse_args()
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: torch sees no CUDA device")
    os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="bolid-yolo-"))
    ctx = mp.get_context("spawn")
    rows = []
    for size in args.sizes.split(","):
        for aux in (False, True):
            queue = ctx.Queue()
            proc = ctx.Process(target=run_config, args=(size, aux, args.steps, args.latent, args.batch, args.device,
                                                         queue))
            proc.start()
            rows.append(queue.get())
            proc.join()
            print(json.dumps(rows[-1]), flush=True)
    where = args.device
    if args.device.startswith("cuda"):
        import torch

        where = f"{args.device} ({torch.cuda.get_device_name(torch.device(args.device))})"
    print(f"\n{os.cpu_count()} CPU cores, device {where}, batch {args.batch}, latent {args.latent}x{args.latent}, "
          f"{args.steps} timed steps after 1 warm-up")
    print(f"{'model':6} {'aux losses':10} {'s/step':>8} {'peak RSS MB':>12} {'RSS before steps MB':>20} "
          f"{'peak CUDA MB':>13}")
    for r in rows:
        cuda_mb = "-" if r["peak_cuda_mb"] is None else f"{r['peak_cuda_mb']:.0f}"
        print(f"{r['size']:6} {'on' if r['aux'] else 'off':10} {r['step_s']:8.3f} {r['peak_rss_mb']:12.0f} "
              f"{r['rss_before_steps_mb']:20.0f} {cuda_mb:>13}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
