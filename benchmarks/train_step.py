"""Stage-2 training step time and peak memory, with and without the auxiliary losses (L_id, L_CLIP).

    python benchmarks/train_step.py [--steps 3] [--sizes tiny,sd15] [--latent 8] [--batch 2] [--device cpu|cuda]

Each configuration runs in its own process (so peak RSS is per configuration): "tiny" = the test models (tiny
UNet/VAE, stand-in pose and CLIP); "sd15" = SD1.5-size UNet and VAE (random weights, real architecture), the
YOLO11n-pose network and an open_clip ViT-B-32 (random weights). Auxiliary losses run on every row (timestep
threshold 1000) so the figure is their full cost; in training they only run below the threshold. One step =
forward, backward and AdamW update of the adapter. With ``--device cuda`` the models and inputs live on the GPU,
each step is timed between ``torch.cuda.synchronize()`` calls and the peak is ``torch.cuda.max_memory_allocated``
(float32 weights; peak RSS is then host memory only).

The Lightning branch (``--lightning``): in ONE process per size, four variants of the step share the models and
are timed in interleaved rounds (every variant once per round, shuffled; ratios taken within a round, median and
range over rounds, as ``benchmarks/interleave.py`` does): aux losses off, L_id + L_CLIP on the one-step x0 (every
row), and on the Lightning branch's K-step image (every row, no CFG as SDXL-Lightning samples) with the gradient
through the last step or through all steps (each UNet call recomputed in the backward pass). Memory per call: on
CUDA the exact ``max_memory_allocated`` of the call; on the CPU the peak RSS above the RSS at the call's start,
sampled every 5 ms by a thread (an estimate: the allocator may keep freed memory). A memory ratio is only given
when the one-step call's own peak is at least 50 MB (below that it is allocator noise).

    python benchmarks/train_step.py --lightning [--sizes sd15] [--k 4] [--rounds 3] [--latent 8] [--batch 2]
        [--out benchmarks/results/train_step_lightning_cpu.json]
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

from bolid.safetensors_io import atomic_write_text  # noqa: E402


def sd15_components():
    import open_clip
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from bolid.pose import ultralytics_offline_env
    from training.models import OpenClipFunctions, YoloPoseNet
    from training.stage2_components import Stage2Components

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
    from training.stage2_components import cast_frozen
    from training.stage2_model import LossConfig, Stage2Model
    from training.stage2_sampling import SamplingConfig, Stage2Data, Stage2Identity

    torch.set_num_threads(os.cpu_count() or 1)
    comp = T.components("sd15") if size == "tiny" else sd15_components()
    comp.freeze()
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    cast_frozen(comp, dev, torch.float32)  # every frozen module onto the device
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


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 5 ms (Linux /proc/self/statm)."""

    def __enter__(self) -> PeakRSS:
        import threading

        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.start) / 2 ** 20


def run_lightning(size: str, k: int, rounds: int, latent: int, batch: int, device: str) -> dict:
    """Interleaved step time and per-call peak memory of off / one-step / Lightning (last, all) at one size."""
    import random
    import statistics

    import stage2_tiny as T
    import torch

    from bolid.diffusers_integration import adapter_config_for_unet, init_adapter_from_unet
    from training.lightning_branch import LightningConfig
    from training.stage2_components import cast_frozen
    from training.stage2_model import LossConfig, Stage2Model
    from training.stage2_sampling import SamplingConfig, Stage2Data, Stage2Identity

    torch.set_num_threads(os.cpu_count() or 1)
    comp = T.components("sd15") if size == "tiny" else sd15_components()
    comp.freeze()
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    cast_frozen(comp, dev, torch.float32)
    ctx = comp.unet.config.cross_attention_dim
    config = adapter_config_for_unet(comp.unet, body_dim=128 if size == "sd15" else T.BODY_DIM)
    adapter = init_adapter_from_unet(comp.unet, config).to(dev)
    idents = T.identities(n=2, views=3, shapes=((latent, latent),))
    if size == "sd15":
        idents = [Stage2Identity(i.name, i.samples, i.captions, torch.randn(3, 128), torch.zeros(3, 128),
                                 i.body_weights, i.keypoints, i.face, i.face_valid) for i in idents]
    text = {c: (torch.randn(77, ctx), None) for i in idents for c in i.captions + [""]}
    data = Stage2Data(idents, SamplingConfig(drop_text=0, drop_face=0, drop_body=0, drop_all=0), text_cache=text)
    aux = LossConfig(id_weight=0.1, clip_weight=0.1, id_max_timestep=1000, clip_max_timestep=1000)
    variants = {"aux off": (LossConfig(), LightningConfig()),
                "one-step x0": (aux, LightningConfig()),
                f"Lightning K={k}, grad last step": (aux, LightningConfig(x0_source="lightning", steps=k)),
                f"Lightning K={k}, grad all steps": (aux, LightningConfig(x0_source="lightning", steps=k,
                                                                          grad_steps="all"))}
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-4)
    times: dict[str, list[float]] = {v: [] for v in variants}
    mems: dict[str, list[float]] = {v: [] for v in variants}
    rows: dict[str, float] = {}
    counter = [0]

    def one_step(name: str, record: bool) -> None:
        lc, lcfg = variants[name]
        model = Stage2Model(adapter, comp, lc, lcfg)
        model.set_uncond_text(text[""])
        b = data.batch(counter[0], batch)
        counter[0] += 1
        noise = torch.randn(b["sample"].shape).to(dev)
        branch_noise = torch.randn(b["sample"].shape).to(dev) if lcfg.branch else None
        timesteps = torch.randint(0, 1000, (batch,)).to(dev)
        if cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            base_mem = torch.cuda.memory_allocated(dev)
        with PeakRSS() as peak:
            t0 = time.perf_counter()
            out = model(b, noise, timesteps, branch_noise)
            out["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize(dev)
            elapsed = time.perf_counter() - t0
        model.detach_unet()
        rows[name] = float(out["id_rows"])
        if record:
            times[name].append(elapsed)
            mems[name].append((torch.cuda.max_memory_allocated(dev) - base_mem) / 2 ** 20 if cuda else peak.delta_mb)

    for name in variants:  # warm-up
        one_step(name, False)
    rng = random.Random(0)
    order = list(variants)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            one_step(name, True)
    base = "one-step x0"
    table = []
    for name in variants:
        ratio_t = [v / b for v, b in zip(times[name], times[base], strict=True)]
        base_mb = statistics.median(mems[base])
        ratio_m = [v / b for v, b in zip(mems[name], mems[base], strict=True)] if base_mb >= 50 else None
        table.append({"variant": name, "step_s": statistics.median(times[name]),
                      "time_ratio": statistics.median(ratio_t), "time_ratio_range": [min(ratio_t), max(ratio_t)],
                      "peak_mb": statistics.median(mems[name]),
                      "mem_ratio": statistics.median(ratio_m) if ratio_m else None,
                      "aux_rows": rows[name], "step_s_all": times[name], "peak_mb_all": mems[name]})
    return {"size": size, "device": device, "k": k, "rounds": rounds, "latent": latent, "batch": batch,
            "memory": "cuda max_memory_allocated per call" if cuda else "peak RSS above the call's start (5 ms)",
            "rows": table}


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main_lightning(args: argparse.Namespace) -> int:
    results = []
    for size in args.sizes.split(","):
        res = run_lightning(size, args.k, args.rounds, args.latent, args.batch, args.device)
        results.append(res)
        print(json.dumps(res), flush=True)
    if args.out:
        setup = {"cpu_cores": os.cpu_count(), "device": args.device, "batch": args.batch, "latent": args.latent,
                 "k": args.k, "rounds": args.rounds, "load_average_at_end": os.getloadavg(),
                 "torch_threads": _torch_threads()}
        atomic_write_text(Path(args.out), json.dumps({"setup": setup, "sizes": results}, indent=1))
    print(f"\n{os.cpu_count()} CPU cores, device {args.device}, batch {args.batch}, latent {args.latent}x{args.latent}, "
          f"{args.rounds} interleaved rounds after 1 warm-up; ratios vs the one-step x0 within each round")
    print(f"{'model':6} {'variant':34} {'s/step':>8} {'time ratio (min..max)':>24} {'peak MB':>9} {'mem ratio':>9}")
    for res in results:
        for r in res["rows"]:
            lo, hi = r["time_ratio_range"]
            mem = "-" if r["mem_ratio"] is None else f"{r['mem_ratio']:.2f}"
            print(f"{res['size']:6} {r['variant']:34} {r['step_s']:8.2f} {r['time_ratio']:8.2f} ({lo:.2f}..{hi:.2f})"
                  f"{'':5} {r['peak_mb']:9.0f} {mem:>9}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sizes", default="tiny,sd15")
    parser.add_argument("--latent", type=int, default=8, help="latent side (image side = 8x for SD1.5-size)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    parser.add_argument("--lightning", action="store_true", help="time the Lightning branch beside the one-step x0")
    parser.add_argument("--k", type=int, default=4, help="--lightning: steps of the branch")
    parser.add_argument("--rounds", type=int, default=3, help="--lightning: interleaved rounds")
    parser.add_argument("--out", default="", help="--lightning: also write the figures and the setup as JSON here")
    args = parser.parse_args()
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: torch sees no CUDA device")
    os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="bolid-yolo-"))
    if args.lightning:
        return main_lightning(args)
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
