"""YOLO11-pose on onnxruntime: export from ultralytics, letterbox, decode, NMS, main-person choice.

The runner reproduces ultralytics' own predict pipeline (same letterbox, same thresholds, same NMS) so that an
exported model gives the same boxes and keypoints as ``YOLO(...).predict`` (tests check this within 1 px), while
needing only numpy, OpenCV and onnxruntime at run time. Export is the only part that imports ultralytics.

CLI: ``python -m bolid.pose export yolo11n-pose.pt [--imgsz 640] [--dynamic] [--output DIR]``.
"""

from __future__ import annotations

import argparse
import ast
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BoLIDError, reading
from .keypoints import NUM_KEYPOINTS, PERSON_CHOICES, PersonPose, select_person  # noqa: F401 - re-exported
from .onnx_providers import create_session
from .skeleton import draw_poses, to_uint8_rgb  # noqa: F401 - re-exported
from .validation import check_image_size

logger = logging.getLogger("bolid")

PAD_VALUE = 114  # ultralytics' letterbox grey
_MAX_NMS = 30000  # candidates kept before NMS (as ultralytics)
_MAX_WH = 7680.0  # class offset for class-aware NMS


class PoseModelError(BoLIDError):
    """A pose model file is missing, unreadable or not a YOLO pose export."""


# ----------------------------------------------------------------------------------------------------------------
# image helpers


@dataclass(frozen=True)
class Letterbox:
    """Where the resized image sits inside the network input: per-axis gain and top-left padding."""

    gain_x: float
    gain_y: float
    pad_x: int
    pad_y: int

    def to_original(self, xy: np.ndarray, width: int, height: int) -> np.ndarray:
        """Map [..., 2] network-input coordinates back to original pixels, clipped to the image."""
        out = np.empty_like(xy, dtype=np.float32)
        out[..., 0] = np.clip((xy[..., 0] - self.pad_x) / self.gain_x, 0, width)
        out[..., 1] = np.clip((xy[..., 1] - self.pad_y) / self.gain_y, 0, height)
        return out


def letterbox(image: np.ndarray, shape: tuple[int, int], stride: int = 32,
              minimal: bool = False) -> tuple[np.ndarray, Letterbox]:
    """Resize keeping the aspect ratio and pad with grey to ``shape`` (h, w), centred.

    ``minimal`` pads only up to the next multiple of ``stride`` (what ultralytics does for dynamic-shape models).
    """
    import cv2

    h0, w0 = image.shape[:2]
    th, tw = shape
    r = min(th / h0, tw / w0)
    nw, nh = max(round(w0 * r), 1), max(round(h0 * r), 1)
    dw, dh = tw - nw, th - nh
    if minimal:
        dw, dh = dw % stride, dh % stride
    left, top = round(dw / 2 - 0.1), round(dh / 2 - 0.1)
    right, bottom = dw - left, dh - top
    if (nw, nh) != (w0, h0):
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    out = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return out, Letterbox(nw / w0, nh / h0, left, top)


# ----------------------------------------------------------------------------------------------------------------
# decoding


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression on xyxy boxes; indices kept, highest score first."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes.T
    areas = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    keep: list[int] = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter + 1e-9)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def decode_raw(pred: np.ndarray, num_classes: int, conf: float, iou: float,
               max_det: int = 300) -> np.ndarray:
    """One image's raw head output [4 + nc + 17*3, anchors] -> rows [x1, y1, x2, y2, score, cls, 51 keypoints]."""
    pred = pred.T  # anchors, channels
    cls_scores = pred[:, 4:4 + num_classes]
    score = cls_scores.max(axis=1)
    keep = score > conf
    pred, cls_scores, score = pred[keep], cls_scores[keep], score[keep]
    if not len(pred):
        return np.zeros((0, 6 + NUM_KEYPOINTS * 3), dtype=np.float32)
    cls = cls_scores.argmax(axis=1).astype(np.float32)
    if len(pred) > _MAX_NMS:
        top = np.argsort(-score, kind="stable")[:_MAX_NMS]
        pred, score, cls = pred[top], score[top], cls[top]
    cx, cy, w, h = pred[:, 0], pred[:, 1], pred[:, 2], pred[:, 3]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    kept = nms(boxes + cls[:, None] * _MAX_WH, score, iou)[:max_det]
    rows = np.concatenate([boxes, score[:, None], cls[:, None], pred[:, 4 + num_classes:]], axis=1)
    return rows[kept].astype(np.float32)


def decode_end2end(pred: np.ndarray, conf: float, max_det: int = 300) -> np.ndarray:
    """One image's NMS-free output [detections, 6 + 51] (already xyxy, score, cls, keypoints)."""
    pred = pred[pred[:, 4] > conf][:max_det]
    return pred.astype(np.float32)


def rows_to_poses(rows: np.ndarray, box: Letterbox, width: int, height: int) -> list[PersonPose]:
    """Decoded rows in network-input coordinates -> PersonPose records in original pixels."""
    poses = []
    for row in rows:
        xyxy = box.to_original(row[:4].reshape(2, 2), width, height).reshape(4)
        kpts = row[6:6 + NUM_KEYPOINTS * 3].reshape(NUM_KEYPOINTS, 3).copy()
        kpts[:, :2] = box.to_original(kpts[:, :2], width, height)
        poses.append(PersonPose(box=xyxy, score=float(row[4]), keypoints=kpts))
    return poses


# ----------------------------------------------------------------------------------------------------------------
# the runner


def _literal(meta: dict[str, str], key: str, default=None):
    value = meta.get(key)
    if value is None:
        return default
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def _dim(value) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


class PoseRunner:
    """A YOLO pose ONNX model on onnxruntime. Stateless after construction; safe to share between calls.

    Works with static and dynamic exports: the input size comes from the model's input shape, else from the
    ``imgsz`` metadata ultralytics writes, else 640.
    """

    def __init__(self, path: str | os.PathLike, provider: str = "auto") -> None:
        path = Path(path)
        if not path.is_file():
            raise PoseModelError(f"pose model file not found: {path}. Export one with "
                                 "`python -m bolid.pose export yolo11n-pose.pt` and put the .onnx in models/bolid_pose")
        self.path = path
        try:
            self.session = create_session(str(path), provider, what=f"pose model {path.name}")
        except BoLIDError:
            raise
        except Exception as exc:  # onnxruntime raises its own types for corrupt files
            raise PoseModelError(f"cannot load pose model {path}: {exc}") from exc
        with reading(path, PoseModelError, "YOLO pose ONNX export"):  # crafted metadata or I/O: own error
            self.provider = self.session.get_providers()[0]
            meta = dict(self.session.get_modelmeta().custom_metadata_map)
            self.metadata = meta
            task = meta.get("task")
            if task is not None and task != "pose":
                raise PoseModelError(f"{path.name} is a YOLO {task!r} model, not a pose model: export a *-pose.pt")
            inp = self.session.get_inputs()[0]
            self.input_name = inp.name
            out = self.session.get_outputs()[0]
            self.output_name = out.name
            self.end2end = bool(_literal(meta, "end2end", False))
            kpt_shape = tuple(_literal(meta, "kpt_shape", (NUM_KEYPOINTS, 3)))
            if kpt_shape != (NUM_KEYPOINTS, 3):
                raise PoseModelError(f"{path.name} predicts keypoints of shape {kpt_shape}; BoLID needs COCO-17 with "
                                     "confidences (17, 3), as in the yolo11*-pose models")
            names = _literal(meta, "names", {0: "person"})
            self.num_classes = len(names) if isinstance(names, (dict, list)) else 1
            channels = out.shape[1] if not self.end2end else None
            if isinstance(channels, int) and channels != 4 + self.num_classes + NUM_KEYPOINTS * 3:
                raise PoseModelError(f"{path.name}: output has {channels} channels, expected "
                                     f"{4 + self.num_classes + NUM_KEYPOINTS * 3} (4 box + classes + 17x3 keypoints)")
            self.stride = int(_literal(meta, "stride", 32))
            batch, _, h, w = (list(inp.shape) + [None] * 4)[:4]
            self.fixed_batch = _dim(batch)
            self.dynamic = _dim(h) is None or _dim(w) is None
            imgsz = _literal(meta, "imgsz", None)
            if isinstance(imgsz, int):
                imgsz = (imgsz, imgsz)
            if not self.dynamic:
                self.imgsz = (int(h), int(w))
            elif isinstance(imgsz, (list, tuple)) and len(imgsz) == 2:
                self.imgsz = (int(imgsz[0]), int(imgsz[1]))
            else:
                self.imgsz = (640, 640)
            if len(inp.shape) != 4 or len(out.shape) != 3 or self.stride <= 0 or min(self.imgsz) <= 0:
                raise PoseModelError(f"{path}: input {inp.shape} / output {out.shape} / stride {self.stride} are not "
                                     "those of a YOLO pose export (input [B, 3, H, W], output [B, C, N])")
        logger.info("BoLID: pose model %s: input %s (%s), provider %s", path.name, self.imgsz,
                    "dynamic" if self.dynamic else "static", self.provider)

    def describe(self) -> str:
        return (f"{self.path.name}: {self.imgsz[0]}x{self.imgsz[1]} {'dynamic' if self.dynamic else 'static'}, "
                f"{self.provider}")

    def _input_shape(self, imgsz: int | tuple[int, int] | None) -> tuple[int, int]:
        if imgsz is None:
            return self.imgsz
        shape = (imgsz, imgsz) if isinstance(imgsz, int) else (int(imgsz[0]), int(imgsz[1]))
        if not self.dynamic and shape != self.imgsz:
            raise PoseModelError(f"{self.path.name} was exported with a fixed input of {self.imgsz}; it cannot run "
                                 f"at {shape}. Export with --dynamic or --imgsz {shape[0]}")
        if shape[0] % self.stride or shape[1] % self.stride:
            raise PoseModelError(f"input size {shape} must be a multiple of the model stride {self.stride}")
        return shape

    def _run(self, batch: np.ndarray) -> np.ndarray:
        try:
            return self._run_session(batch)
        except Exception as exc:  # onnxruntime's own types: a graph that loads but does not run as a pose model
            raise PoseModelError(f"pose model {self.path} failed to run on a {batch.shape} input "
                                 f"({type(exc).__name__}: {exc}); re-export it with `python -m bolid.pose export`") from exc

    def _run_session(self, batch: np.ndarray) -> np.ndarray:
        n = batch.shape[0]
        if self.fixed_batch is not None and self.fixed_batch != n:
            outs = []
            for start in range(0, n, self.fixed_batch):
                part = batch[start:start + self.fixed_batch]
                filled = np.zeros((self.fixed_batch, *part.shape[1:]), dtype=part.dtype)
                filled[:len(part)] = part
                outs.append(self.session.run([self.output_name], {self.input_name: filled})[0][:len(part)])
            return np.concatenate(outs, axis=0)
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def detect(self, images: Sequence[np.ndarray] | np.ndarray, conf: float = 0.25, iou: float = 0.7,
               imgsz: int | tuple[int, int] | None = None, max_det: int = 300,
               batch_size: int = 8) -> list[list[PersonPose]]:
        """All people in each image (RGB, HxWx3 uint8 or float 0..1), in original pixel coordinates.

        ``conf``/``iou`` mean what they mean in ultralytics' predict (defaults equal). A dynamic model pads each
        image only to the next stride multiple, as ultralytics does; a static one always runs at its export size.
        """
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        shape = self._input_shape(imgsz)
        prepared = []
        for index, image in enumerate(images):
            rgb = to_uint8_rgb(image)
            check_image_size(rgb.shape[0], rgb.shape[1], f"image {index + 1} of {len(images)}")
            lb_img, box = letterbox(rgb, shape, self.stride, minimal=self.dynamic)
            prepared.append((lb_img, box, rgb.shape[1], rgb.shape[0]))
        results: list[list[PersonPose] | None] = [None] * len(prepared)
        # images whose letterboxed sizes agree run together
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (lb_img, *_rest) in enumerate(prepared):
            groups.setdefault(lb_img.shape[:2], []).append(i)
        for indices in groups.values():
            for start in range(0, len(indices), max(1, batch_size)):
                chunk = indices[start:start + max(1, batch_size)]
                batch = np.stack([prepared[i][0] for i in chunk]).transpose(0, 3, 1, 2)
                batch = np.ascontiguousarray(batch, dtype=np.float32) / 255.0
                out = self._run(batch)
                for i, pred in zip(chunk, out, strict=True):
                    if self.end2end:
                        rows = decode_end2end(pred, conf, max_det)
                    else:
                        rows = decode_raw(pred, self.num_classes, conf, iou, max_det)
                    _, box, width, height = prepared[i]
                    results[i] = rows_to_poses(rows, box, width, height)
        return [r if r is not None else [] for r in results]

    def detect_main(self, images: Sequence[np.ndarray] | np.ndarray, conf: float = 0.25,
                    choice: str = "largest", **kwargs) -> list[PersonPose | None]:
        """The main person per image (see ``select_person``), None where nobody was found."""
        return [select_person(p, choice) for p in self.detect(images, conf=conf, **kwargs)]


# ----------------------------------------------------------------------------------------------------------------
# export (needs ultralytics; offline-safe)


def ultralytics_offline_env() -> None:
    """Make ultralytics offline-safe before it is imported: no network check, no auto-install, no home folder."""
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "false"
    if "YOLO_CONFIG_DIR" not in os.environ:
        os.environ["YOLO_CONFIG_DIR"] = tempfile.mkdtemp(prefix="bolid-yolo-")
    if "MPLCONFIGDIR" not in os.environ:  # matplotlib (imported by ultralytics) would write ~/.config otherwise
        os.environ["MPLCONFIGDIR"] = tempfile.mkdtemp(prefix="bolid-mpl-")
    if "ultralytics" in sys.modules:
        logger.debug("ultralytics was imported before BoLID set its offline environment")


def restore_pil_image_open() -> None:
    """Undo ultralytics' process-wide ``PIL.Image.open`` patch.

    On import, ultralytics replaces ``PIL.Image.open`` with a wrapper that, on an unidentified image, tries to
    install pi-heif: a corrupt photo then raises an install error instead of ``UnidentifiedImageError``, and
    BoLID's dataset could no longer report it as unreadable. ultralytics keeps the original as ``_image_open``.
    """
    patches = sys.modules.get("ultralytics.utils.patches")
    original = getattr(patches, "_image_open", None)
    if original is None:
        return
    from PIL import Image

    if Image.open is not original:
        Image.open = original


def import_ultralytics():
    """Import ultralytics offline-safe (no network, no auto-install, no home folder) and without its PIL patch."""
    ultralytics_offline_env()
    import ultralytics

    restore_pil_image_open()
    return ultralytics


_PICKLE_NOTED = False


def note_pickle_checkpoint(path: str | os.PathLike) -> None:
    """Log, once per process, that ultralytics loads a YOLO ``.pt`` checkpoint with pickle (it can run code)."""
    global _PICKLE_NOTED
    if _PICKLE_NOTED or Path(path).suffix.lower() != ".pt":
        return
    _PICKLE_NOTED = True
    logger.warning("BoLID: loading %s with ultralytics: .pt files are pickles: load only files you trust", path)


def export_pose_onnx(weights: str | os.PathLike, imgsz: int = 640, dynamic: bool = False,
                     output: str | os.PathLike | None = None, opset: int | None = None,
                     simplify: bool = True) -> Path:
    """Export a YOLO pose checkpoint (.pt, or a .yaml for random weights) to ONNX with ultralytics' metadata.

    Returns the .onnx path (next to the weights, or in/at ``output``). Nothing is downloaded.
    """
    ultralytics_offline_env()
    weights = Path(weights)
    if not weights.exists() and weights.suffix != ".yaml":
        raise PoseModelError(f"pose checkpoint not found: {weights} (nothing is downloaded: pass a local "
                             "yolo11*-pose.pt file)")
    YOLO = import_ultralytics().YOLO  # noqa: N806 - the library's class name

    note_pickle_checkpoint(weights)
    model = YOLO(str(weights))
    if model.task != "pose":
        raise PoseModelError(f"{weights.name} is a YOLO {model.task!r} model, not a pose model")
    kwargs = {"format": "onnx", "imgsz": imgsz, "dynamic": dynamic, "simplify": simplify, "device": "cpu"}
    if opset is not None:
        kwargs["opset"] = opset
    produced = Path(model.export(**kwargs))
    if output is None:
        return produced
    output = Path(output)
    target = output / produced.name if output.is_dir() else output
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.resolve() != produced.resolve():
        shutil.move(str(produced), target)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bolid.pose", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="export a YOLO pose .pt to ONNX (ultralytics, offline)")
    exp.add_argument("weights", help="local yolo11*-pose.pt (or a model .yaml for random weights)")
    exp.add_argument("--imgsz", type=int, default=640, help="input size (default 640)")
    exp.add_argument("--dynamic", action="store_true", help="dynamic batch and input size")
    exp.add_argument("--opset", type=int, default=None)
    exp.add_argument("--output", default=None, help="output file or folder (e.g. ComfyUI/models/bolid_pose)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = export_pose_onnx(args.weights, imgsz=args.imgsz, dynamic=args.dynamic, output=args.output,
                                opset=args.opset)
    except BoLIDError as exc:
        print(f"error: {exc}", file=sys.stderr)  # CLI output, not library logging
        return 2
    runner = PoseRunner(path, "CPU")
    print(f"exported {path} ({runner.describe()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
