"""Images per second: BoLID's onnxruntime pose/face path vs ultralytics' torch predict / the insightface package.

    python benchmarks/perception.py [--weights yolo11n-pose.pt] [--face-pack DIR] [--rounds 7] [--device cpu|cuda]
                                    [--json OUT.json]

The two runners of a task are timed in interleaved rounds (each round runs both once, in a shuffled order; the
speed ratio is taken within a round, its median over rounds printed, with min..max): timed one after the other,
the ratio swung from 2x to 0.7x between runs on a shared machine (benchmarks/interleave.py).

Without --weights a random-weight yolo11n-pose (person class) is built from ultralytics' yaml: the same network
cost as the real one (post-processing differs a little with the number of detections). Without --face-pack a
tiny stand-in pack from the tests is used, which times only the pipeline around the networks (detector
letterbox, alignment, recogniser call), not a real SCRFD/ArcFace. Images: photos shipped in installed packages.
``--device cuda`` runs onnxruntime on the CUDA provider (an error if the installed onnxruntime lacks it; the log
warns if it falls back to CPU) and ultralytics on GPU 0; each timed call returns host arrays, so it includes the
transfers and ends synchronised.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from interleave import environment, measure, throughput_rows, write_json_report  # noqa: E402

from bolid.pose import PoseRunner, export_pose_onnx, ultralytics_offline_env  # noqa: E402

ultralytics_offline_env()
PACKAGES = ("torch", "ultralytics", "onnxruntime", "onnxruntime-gpu", "insightface", "numpy", "opencv-python-headless")


def photos() -> list[np.ndarray]:
    import cv2
    import insightface
    import skimage.data
    import ultralytics

    assets = Path(ultralytics.__file__).parent / "assets"
    files = [assets / "zidane.jpg", assets / "bus.jpg", Path(insightface.__file__).parent / "data/images/t1.jpg"]
    return [np.ascontiguousarray(cv2.imread(str(f))[..., ::-1]) for f in files] + [skimage.data.astronaut()]


def random_pose_weights(folder: Path) -> Path:
    import ultralytics
    import yaml
    from ultralytics import YOLO

    cfg = yaml.safe_load((Path(ultralytics.__file__).parent / "cfg/models/11/yolo11-pose.yaml").read_text())
    cfg["nc"] = 1
    (folder / "yolo11n-pose.yaml").write_text(yaml.safe_dump(cfg))
    path = folder / "yolo11n-pose-random.pt"
    YOLO(str(folder / "yolo11n-pose.yaml")).save(str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None, help="a local yolo11*-pose.pt (default: random yolo11n-pose)")
    parser.add_argument("--face-pack", default=None, help="an InsightFace pack folder (default: tiny stand-in)")
    parser.add_argument("--rounds", "--repeats", dest="rounds", type=int, default=7)
    parser.add_argument("--conf", type=float, default=0.25)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cpu (default) or cuda: onnxruntime CUDA provider, ultralytics on GPU 0")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures, settings and environment here")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch threads for ultralytics (default: ultralytics' own choice, os.cpu_count() - 1, "
                             "which it sets when predict first runs; onnxruntime uses its default, one per core)")
    args = parser.parse_args()
    env_start = environment(PACKAGES)
    cuda = args.device == "cuda"
    provider = "CUDA" if cuda else "CPU"
    torch_device = "0" if cuda else "cpu"  # ultralytics' device syntax

    import torch
    from ultralytics import YOLO

    images = photos()
    work = Path(tempfile.mkdtemp(prefix="bolid-bench-"))
    weights = Path(args.weights) if args.weights else random_pose_weights(work)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"torch threads {torch.get_num_threads()}; {len(images)} photos; {args.rounds} interleaved rounds")
    if cuda:
        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device")
        print(f"device: {torch.cuda.get_device_name(0)} (onnxruntime provider {provider}, ultralytics device 0)")
    print(f"pose weights: {weights.name}")
    print("| task | BoLID onnxruntime | other runner | median speed ratio, BoLID vs other (min..max) |")
    print("|---|---|---|---|")
    rows = []
    yolo = YOLO(str(weights))
    bgr = [np.ascontiguousarray(im[..., ::-1]) for im in images]
    for imgsz in (320, 640):
        out = work / f"pose-{imgsz}"
        out.mkdir()
        onnx_path = export_pose_onnx(weights, imgsz=imgsz, output=out / f"pose-{imgsz}.onnx")
        runner = PoseRunner(onnx_path, provider)
        yolo.predict(bgr[0], imgsz=imgsz, conf=args.conf, rect=False, verbose=False, device=torch_device)
        if args.torch_threads:  # after ultralytics' first predict, which resets torch's thread count
            torch.set_num_threads(args.torch_threads)
        torch_threads = torch.get_num_threads()
        times = measure({
            "ours": lambda r=runner: [r.detect(im, conf=args.conf) for im in images],
            "ultralytics": lambda s=imgsz: [yolo.predict(im, imgsz=s, conf=args.conf, rect=False, verbose=False,
                                                         device=torch_device) for im in bgr],
        }, args.rounds)
        (_, ours, ratio, lo, hi), (_, theirs, *_) = throughput_rows(times, len(images), "ultralytics")
        print(f"| pose, imgsz {imgsz} | {ours:.1f} img/s | ultralytics torch {theirs:.1f} img/s | "
              f"x{ratio:.2f} ({lo:.2f}..{hi:.2f}) |")
        rows.append({"task": f"pose, imgsz {imgsz}", "other": "ultralytics torch", "images": len(images),
                     "bolid_img_per_s": ours, "other_img_per_s": theirs, "median_speed_ratio": ratio,
                     "ratio_min": lo, "ratio_max": hi, "bolid_seconds_per_round": times["ours"],
                     "other_seconds_per_round": times["ultralytics"], "ultralytics_torch_threads": torch_threads})

    from face import compare, default_packs

    if args.face_pack:
        packs = [(Path(args.face_pack).name, Path(args.face_pack), images)]
    else:
        packs = default_packs(work)
    for label, pack, face_images in packs:
        ((_, ours, ratio, lo, hi), (_, theirs, *_)), times = compare(pack, face_images, args.rounds, provider)
        print(f"| face embedding ({label}) | {ours:.1f} img/s | insightface package {theirs:.1f} img/s | "
              f"x{ratio:.2f} ({lo:.2f}..{hi:.2f}) |")
        rows.append({"task": f"face embedding ({label})", "other": "insightface package", "images": len(face_images),
                     "bolid_img_per_s": ours, "other_img_per_s": theirs, "median_speed_ratio": ratio,
                     "ratio_min": lo, "ratio_max": hi, "bolid_seconds_per_round": times["BoLID onnxruntime"],
                     "other_seconds_per_round": times["insightface package"]})
    if args.json:
        write_json_report(args.json, "benchmarks/perception.py",
                          {"rounds": args.rounds, "device": args.device, "conf": args.conf,
                           "torch_threads_requested": args.torch_threads, "pose_weights": str(args.weights or
                                                                                         "random yolo11n-pose"),
                           "face_pack": args.face_pack or "tests' tiny stand-in packs"}, env_start, rows, PACKAGES)


if __name__ == "__main__":
    main()
