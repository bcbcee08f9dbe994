"""Images per second: BoLID's onnxruntime pose/face path vs ultralytics' torch predict, side by side.

    python benchmarks/perception.py [--weights yolo11n-pose.pt] [--face-pack DIR] [--repeats 5] [--device cpu|cuda]

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
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bolid.pose import PoseRunner, export_pose_onnx, ultralytics_offline_env  # noqa: E402

ultralytics_offline_env()


def photos() -> list[np.ndarray]:
    import cv2
    import insightface
    import skimage.data
    import ultralytics

    assets = Path(ultralytics.__file__).parent / "assets"
    files = [assets / "zidane.jpg", assets / "bus.jpg", Path(insightface.__file__).parent / "data/images/t1.jpg"]
    return [np.ascontiguousarray(cv2.imread(str(f))[..., ::-1]) for f in files] + [skimage.data.astronaut()]


def median_ips(fn, n_images: int, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return n_images / statistics.median(times)


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
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--conf", type=float, default=0.25)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cpu (default) or cuda: onnxruntime CUDA provider, ultralytics on GPU 0")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    provider = "CUDA" if cuda else "CPU"
    torch_device = "0" if cuda else "cpu"  # ultralytics' device syntax

    import torch
    from ultralytics import YOLO

    images = photos()
    work = Path(tempfile.mkdtemp(prefix="bolid-bench-"))
    weights = Path(args.weights) if args.weights else random_pose_weights(work)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"torch threads {torch.get_num_threads()}; {len(images)} photos; median of {args.repeats} repeats")
    if cuda:
        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device")
        print(f"device: {torch.cuda.get_device_name(0)} (onnxruntime provider {provider}, ultralytics device 0)")
    print(f"pose weights: {weights.name}")
    print(f"{'task':<28}{'BoLID onnxruntime':>20}{'ultralytics torch':>20}")
    yolo = YOLO(str(weights))
    bgr = [np.ascontiguousarray(im[..., ::-1]) for im in images]
    for imgsz in (320, 640):
        out = work / f"pose-{imgsz}"
        out.mkdir()
        onnx_path = export_pose_onnx(weights, imgsz=imgsz, output=out / f"pose-{imgsz}.onnx")
        runner = PoseRunner(onnx_path, provider)
        ours = median_ips(lambda r=runner: [r.detect(im, conf=args.conf) for im in images], len(images),
                          args.repeats)
        theirs = median_ips(lambda s=imgsz: [yolo.predict(im, imgsz=s, conf=args.conf, rect=False, verbose=False,
                                                          device=torch_device) for im in bgr], len(images),
                             args.repeats)
        print(f"{f'pose, imgsz {imgsz}':<28}{ours:>16.1f} i/s{theirs:>16.1f} i/s")

    from bolid.face import FaceAnalyzer

    if args.face_pack:
        pack, label = Path(args.face_pack), Path(args.face_pack).name
    else:
        sys.path.insert(0, str(REPO / "tests"))
        from test_face import build_tiny_pack, face_photo

        pack, label = build_tiny_pack(work / "tinypack"), "tiny stand-in"
        images = [face_photo((480, 640), (200, 120, 220), seed=i) for i in range(4)]
    analyzer = FaceAnalyzer(pack, provider)
    bgr = [np.ascontiguousarray(im[..., ::-1]) for im in images]
    ours = median_ips(lambda: analyzer.embed(images, no_face="skip"), len(images), args.repeats)
    direct = median_ips(lambda: [analyzer.app.get(im) for im in bgr], len(images), args.repeats)
    print(f"{f'face embed ({label})':<28}{ours:>16.1f} i/s{'n/a (no torch path)':>20}")
    print(f"{'  InsightFace app.get':<28}{direct:>16.1f} i/s   (all faces, default det sizes 128+640)")


if __name__ == "__main__":
    main()
