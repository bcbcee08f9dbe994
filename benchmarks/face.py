"""Face embedding throughput: BoLID's onnxruntime face runner vs the insightface package, interleaved rounds.

    python benchmarks/face.py [--face-pack DIR] [--rounds 10] [--device cpu|cuda] [--json OUT.json]

Both run the same pack (SCRFD detector + ArcFace recogniser) on the same photos and return the largest face's
embedding per photo at one detection size (insightface: its SCRFD.detect, then ArcFaceONNX.get on the largest
face, which is what BoLID ran through insightface before). Each round
times both once, in a shuffled order; the ratio is taken within a round and its median over rounds is printed
(benchmarks/interleave.py). Without --face-pack the tests' tiny stand-in packs are used (texture stand-in on
four real photos from installed packages, bright-square stand-in on synthetic photos): that times only the
pipeline around two tiny networks (letterbox, decoding, NMS, alignment), not a real SCRFD/ArcFace.
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

from bolid.face import FaceAnalyzer  # noqa: E402

PACKAGES = ("onnxruntime", "onnxruntime-gpu", "insightface", "numpy", "opencv-python-headless")


def insightface_largest(app, bgr_images: list[np.ndarray], det_size: int) -> list[np.ndarray | None]:
    """insightface's SCRFD.detect, then ArcFaceONNX.get on the largest face (what BoLID did through insightface;
    FaceAnalysis.get would embed every face)."""
    from insightface.app.common import Face

    det, rec = app.models["detection"], app.models["recognition"]
    out = []
    for bgr in bgr_images:
        boxes, kpss = det.detect(bgr, input_size=(det_size, det_size), max_num=0)
        if len(boxes) == 0:
            out.append(None)
            continue
        i = int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
        face = Face(bbox=boxes[i, :4], kps=kpss[i], det_score=boxes[i, 4])
        rec.get(bgr, face)
        out.append(face.normed_embedding)
    return out


def compare(pack: Path, images: list[np.ndarray], rounds: int, provider: str, det_size: int = 640
            ) -> tuple[list[tuple[str, float, float, float, float]], dict[str, list[float]]]:
    """Rows of :func:`interleave.throughput_rows` for BoLID vs insightface on one pack, and the seconds per round
    of each runner."""
    from insightface.app import FaceAnalysis

    ours = FaceAnalyzer(pack, provider, det_sizes=(det_size,))
    ort_provider = ours.provider
    app = FaceAnalysis(name=str(pack.resolve()), allowed_modules=["detection", "recognition"],
                       providers=[ort_provider] + (["CPUExecutionProvider"] if ort_provider != "CPUExecutionProvider"
                                                    else []))
    app.prepare(ctx_id=0, det_thresh=0.5, det_size=(det_size, det_size))
    bgr = [np.ascontiguousarray(im[..., ::-1]) for im in images]
    times = measure({"BoLID onnxruntime": lambda: [ours.embed_one(im) for im in images],
                     "insightface package": lambda: insightface_largest(app, bgr, det_size)}, rounds)
    return throughput_rows(times, len(images), "insightface package"), times


def default_packs(work: Path) -> list[tuple[str, Path, list[np.ndarray]]]:
    sys.path.insert(0, str(REPO / "tests"))
    from test_face import build_tiny_pack, face_photo
    from test_pose import _photos

    real = list(_photos().values())
    synthetic = [face_photo((480, 640), (200, 120, 220), seed=i) for i in range(4)]
    return [("texture stand-in, 4 real photos", build_tiny_pack(work / "texturepack", texture=True), real),
            ("bright-square stand-in, 4 synthetic photos", build_tiny_pack(work / "tinypack"), synthetic)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--face-pack", default=None, help="an InsightFace pack folder (default: tiny stand-ins)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--json", type=Path, default=None, help="also write the figures, settings and environment here")
    args = parser.parse_args()
    provider = "CUDA" if args.device == "cuda" else "CPU"
    env_start = environment(PACKAGES)
    work = Path(tempfile.mkdtemp(prefix="bolid-bench-face-"))
    if args.face_pack:
        sys.path.insert(0, str(REPO / "tests"))
        from test_pose import _photos

        packs = [(Path(args.face_pack).name, Path(args.face_pack), list(_photos().values()))]
    else:
        packs = default_packs(work)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores; provider {provider}; "
          f"{args.rounds} interleaved rounds, detection size 640")
    print("| pack | runner | median img/s | median speed ratio vs insightface (min..max) |")
    print("|---|---|---|---|")
    rows = []
    for label, pack, images in packs:
        results, times = compare(pack, images, args.rounds, provider)
        for name, ips, ratio, lo, hi in results:
            print(f"| {label} | {name} | {ips:.1f} | x{ratio:.2f} ({lo:.2f}..{hi:.2f}) |")
            rows.append({"pack": label, "runner": name, "images": len(images), "median_img_per_s": ips,
                         "median_speed_ratio_vs_insightface": ratio, "ratio_min": lo, "ratio_max": hi,
                         "seconds_per_round": times[name]})
    if args.json:
        write_json_report(args.json, "benchmarks/face.py",
                          {"rounds": args.rounds, "provider": provider, "detection_size": 640,
                           "face_pack": args.face_pack or "tests' tiny stand-in packs"}, env_start, rows, PACKAGES)


if __name__ == "__main__":
    main()
