"""InsightFace packs on plain onnxruntime: the largest face per image, its normed ArcFace embedding, averaged.

The insightface package is not needed (it is the identity packs' most common install failure: a C++ build on
Windows, and a dependency on the CPU onnxruntime that replaces onnxruntime-gpu). BoLID uses two models of a pack
and runs them itself, with the pose runner's provider handling (:mod:`bolid.onnx_providers`):

- the SCRFD detector: letterbox to the detection size (top-left, zero padding), (pixel - 127.5) / 128 in RGB,
  anchor-point decoding of the boxes and 5 landmarks per stride (8/16/32, 2 anchors; or 8..128, 1 anchor),
  score threshold, NMS at IoU 0.4;
- the ArcFace recogniser: the standard 5-point similarity alignment (Umeyama) onto the ArcFace template at
  112x112 (or the model's own square size), then the network, normalisation read from the graph as InsightFace
  does (mxnet-converted models normalise inside).

The models are found by their ONNX signature, as InsightFace's model zoo routes them (>= 5 outputs: detector;
square input >= 112 and a multiple of 16, not 192 / 96 / two inputs: recogniser). Packs (antelopev2, buffalo_l,
or any folder with such a detector and recogniser) live in ``<root>/models/<name>/``, the layout users of other
ComfyUI packs already have; nothing is downloaded, and a missing folder is an immediate error that says which
files go where. Detection retries smaller sizes (640, 512, 384, 256) before giving up on an image, and a
face-less image is either an error naming that image or skipped, as the caller chooses.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import BoLIDError
from .identity import FaceEmbeds
from .onnx_providers import create_session, resolve_providers
from .pose import to_uint8_rgb
from .validation import onnx_failure_message

logger = logging.getLogger("bolid")

DET_SIZES: tuple[int, ...] = (640, 512, 384, 256)
NO_FACE_POLICIES: tuple[str, ...] = ("error", "skip")
EXPECTED_FILES = ("a face detector with 5 landmarks (SCRFD: e.g. scrfd_10g_bnkps.onnx in antelopev2, "
                  "det_10g.onnx in buffalo_l) and an ArcFace recogniser with a 112x112 input (e.g. glintr100.onnx "
                  "in antelopev2, w600k_r50.onnx in buffalo_l)")


class FaceModelError(BoLIDError):
    """An InsightFace model folder is missing or lacks a detector/recogniser."""


class NoFaceError(BoLIDError):
    """No face was found in an image (the message names it)."""


def face_model_dir(root: str | os.PathLike, name: str) -> Path:
    """``<root>/models/<name>`` (InsightFace's layout); ``name`` may also be a folder path of its own."""
    direct = Path(name).expanduser()
    if direct.is_absolute() or (direct.is_dir() and any(direct.glob("*.onnx"))):
        return direct
    return Path(root).expanduser() / "models" / name


def check_face_model_dir(folder: str | os.PathLike) -> list[Path]:
    """The folder's .onnx files, or an error that says what to put where (never a download)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FaceModelError(f"InsightFace model folder not found: {folder}. Create it and put {EXPECTED_FILES} "
                             "there (unzip antelopev2.zip or buffalo_l.zip so the .onnx files sit directly in it); "
                             "BoLID does not download models")
    files = sorted(folder.glob("*.onnx"))
    if not files:
        raise FaceModelError(f"InsightFace model folder {folder} holds no .onnx files; it needs {EXPECTED_FILES}. "
                             "If the zip made a nested folder, move its .onnx files up into this folder")
    return files


# The 5-point ArcFace template (eyes, nose tip, mouth corners) in a 112x112 crop: InsightFace's published
# reference points, which every ArcFace model of the packs was trained on.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)
NMS_IOU = 0.4


@dataclass
class DetectedFace:
    """One detected face: box (x1, y1, x2, y2) and 5 landmarks (x, y) in original pixels, its score, and the
    ArcFace embedding once recognised (``det_size``: the detection size that found it)."""

    bbox: np.ndarray
    kps: np.ndarray | None
    det_score: float
    embedding: np.ndarray | None = None
    det_size: int = 0

    @property
    def normed_embedding(self) -> np.ndarray | None:
        if self.embedding is None:
            return None
        return self.embedding / max(float(np.linalg.norm(self.embedding)), 1e-12)


@dataclass(frozen=True)
class OnnxSignature:
    """What routing needs from an ONNX file: input shapes, output shapes/names and the first node names."""

    inputs: list[tuple[str, list]]
    outputs: list[tuple[str, list]]
    first_nodes: list[str]


def onnx_signature(path: str | os.PathLike) -> OnnxSignature:
    """Read an ONNX file's graph signature without starting a session (initialisers are not inputs)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for damaged files
        raise FaceModelError(f"InsightFace model file {path} is damaged or not an ONNX model ({exc}); "
                             "re-download the pack") from exc
    graph = model.graph
    if not graph.node or not graph.input:  # an empty file parses as an empty model
        raise FaceModelError(f"InsightFace model file {path} is damaged or not an ONNX model (it holds no graph); "
                             "re-download the pack")
    init = {t.name for t in graph.initializer}

    def dims(value) -> list:
        return [d.dim_value if d.dim_value > 0 else (d.dim_param or None) for d in value.type.tensor_type.shape.dim]

    inputs = [(v.name, dims(v)) for v in graph.input if v.name not in init]
    outputs = [(v.name, dims(v)) for v in graph.output]
    return OnnxSignature(inputs, outputs, [n.name for n in graph.node[:8]])


def route_model(sig: OnnxSignature) -> str | None:
    """"detection", "recognition" or None (landmark, attribute, swapper and other models are not used)."""
    if not sig.inputs:
        return None
    shape = sig.inputs[0][1]
    if len(sig.outputs) >= 5:
        return "detection"
    if len(shape) != 4:
        return None
    h, w = shape[2], shape[3]
    if (h, w) in ((192, 192), (96, 96)) or (len(sig.inputs) == 2 and (h, w) == (128, 128)):
        return None
    if isinstance(h, int) and h == w and h >= 112 and h % 16 == 0:
        return "recognition"
    return None


class SCRFDDetector:
    """An SCRFD face detector with 5 landmarks on onnxruntime."""

    def __init__(self, path: str | os.PathLike, sig: OnnxSignature, provider: str = "auto",
                 det_thresh: float = 0.5, nms_thresh: float = NMS_IOU) -> None:
        self.path = Path(path)
        n_out = len(sig.outputs)
        layouts = {6: ((8, 16, 32), 2, False), 9: ((8, 16, 32), 2, True),
                   10: ((8, 16, 32, 64, 128), 1, False), 15: ((8, 16, 32, 64, 128), 1, True)}
        if n_out not in layouts:
            raise FaceModelError(f"{self.path}: a detector with {n_out} outputs is not an SCRFD model (6, 9, 10 or "
                                 f"15 outputs); it needs {EXPECTED_FILES}")
        self.strides, self.num_anchors, self.use_kps = layouts[n_out]
        if not self.use_kps:
            raise FaceModelError(f"{self.path}: this SCRFD detector has no landmark outputs; ArcFace alignment needs "
                                 f"the 5 landmarks ({EXPECTED_FILES})")
        self.fmc = len(self.strides)
        shape = sig.inputs[0][1]
        h, w = (shape[2], shape[3]) if len(shape) == 4 else (None, None)
        self.static_size = (int(w), int(h)) if isinstance(h, int) and isinstance(w, int) else None
        self.batched = len(sig.outputs[0][1]) == 3
        self.det_thresh = float(det_thresh)
        self.nms_thresh = float(nms_thresh)
        self.session = create_session(str(self.path), provider, what=f"face detector {self.path.name}")
        self.provider = self.session.get_providers()[0]
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._centers: dict[tuple[int, int, int], np.ndarray] = {}

    def sizes(self, requested: Sequence[int]) -> tuple[int, ...]:
        """Detection sizes to try: the requested ones, or the one size a static-shape model accepts."""
        if self.static_size is not None:
            return (self.static_size[0],)
        return tuple(dict.fromkeys(int(s) for s in requested))

    def _anchor_centers(self, height: int, width: int, stride: int) -> np.ndarray:
        key = (height, width, stride)
        if key not in self._centers:
            ys, xs = np.mgrid[:height, :width]
            centers = (np.stack([xs, ys], axis=-1).astype(np.float32) * stride).reshape(-1, 2)
            self._centers[key] = np.repeat(centers, self.num_anchors, axis=0)
        return self._centers[key]

    def detect(self, rgb: np.ndarray, size: int | tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """All faces of an RGB uint8 image: ([n, 5] x1, y1, x2, y2, score; [n, 5, 2] landmarks), best first."""
        in_w, in_h = self.static_size or ((size, size) if isinstance(size, int) else size)
        img_h, img_w = rgb.shape[:2]
        if img_h / img_w > in_h / in_w:
            new_h = in_h
            new_w = int(new_h / (img_h / img_w))
        else:
            new_w = in_w
            new_h = int(new_w * (img_h / img_w))
        scale = new_h / img_h
        import cv2

        canvas = np.zeros((in_h, in_w, 3), dtype=np.uint8)
        canvas[:new_h, :new_w] = cv2.resize(rgb, (new_w, new_h))
        blob = ((canvas.astype(np.float32) - 127.5) * np.float32(1.0 / 128.0)).transpose(2, 0, 1)[None]
        outs = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(blob)})
        if self.batched:
            outs = [o[0] for o in outs]
        boxes, scores, kpss = [], [], []
        for i, stride in enumerate(self.strides):
            centers = self._anchor_centers(in_h // stride, in_w // stride, stride)
            score = outs[i].reshape(-1)
            keep = np.where(score >= self.det_thresh)[0]
            if keep.size == 0:
                continue
            dist = outs[i + self.fmc].reshape(-1, 4)[keep] * stride
            c = centers[keep]
            boxes.append(np.concatenate([c - dist[:, :2], c + dist[:, 2:]], axis=1))
            kps = outs[i + 2 * self.fmc].reshape(-1, 10)[keep].reshape(-1, 5, 2) * stride
            kpss.append(c[:, None, :] + kps)
            scores.append(score[keep])
        if not scores:
            return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
        score = np.concatenate(scores)
        order = np.argsort(-score, kind="stable")
        dets = np.concatenate([np.concatenate(boxes) / scale, score[:, None]], axis=1).astype(np.float32)[order]
        kps = (np.concatenate(kpss) / scale)[order]
        keep = nms(dets, self.nms_thresh)
        return dets[keep], kps[keep].astype(np.float32)


def nms(dets: np.ndarray, iou: float) -> list[int]:
    """Greedy non-maximum suppression over [n, 5] (x1, y1, x2, y2, score), pixel-inclusive areas (+1), as SCRFD."""
    x1, y1, x2, y2, score = (dets[:, i] for i in range(5))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-score, kind="stable")
    keep: list[int] = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter) <= iou]
    return keep


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 least-squares similarity (rotation, uniform scale, translation) mapping ``src`` points onto ``dst``
    (Umeyama 1991, with the reflection correction)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    n, dim = src.shape
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sc, dc = src - mu_s, dst - mu_d
    cov = dc.T @ sc / n
    d = np.ones(dim)
    if np.linalg.det(cov) < 0:
        d[-1] = -1
    u, s, vt = np.linalg.svd(cov)
    rank = np.linalg.matrix_rank(cov)
    if rank == 0:
        raise BoLIDError("face landmarks are degenerate (all at one point): cannot align the face")
    if rank == dim - 1 and np.linalg.det(u) * np.linalg.det(vt) <= 0:
        r = u @ np.diag(np.r_[d[:-1], -1.0]) @ vt
    elif rank == dim - 1:
        r = u @ vt
    else:
        r = u @ np.diag(d) @ vt
    scale = float(s @ d) / sc.var(axis=0).sum()
    out = np.zeros((2, 3))
    out[:, :2] = scale * r
    out[:, 2] = mu_d - scale * r @ mu_s
    return out


def align_face(rgb: np.ndarray, kps: np.ndarray, size: int = 112) -> np.ndarray:
    """The face warped onto the ArcFace template at ``size`` x ``size`` (multiples of 112, or of 128 with the
    template shifted right by 8/128 of the size), black outside the photo."""
    import cv2

    if size % 112 == 0:
        template = ARCFACE_TEMPLATE * (size / 112.0)
    elif size % 128 == 0:
        template = ARCFACE_TEMPLATE * (size / 128.0) + np.array([8.0 * size / 128.0, 0.0], np.float32)
    else:
        raise FaceModelError(f"ArcFace input size {size} is neither a multiple of 112 nor of 128")
    matrix = similarity_transform(np.asarray(kps, np.float32).reshape(5, 2), template)
    return cv2.warpAffine(rgb, matrix, (size, size), borderValue=0.0)


class ArcFaceRecognizer:
    """An ArcFace recogniser on onnxruntime: aligned RGB crops -> embeddings (not normalised)."""

    def __init__(self, path: str | os.PathLike, sig: OnnxSignature, provider: str = "auto") -> None:
        self.path = Path(path)
        self.input_size = int(sig.inputs[0][1][2])
        # mxnet-converted models subtract and scale inside the graph (Sub and Mul among the first nodes)
        names = sig.first_nodes
        inside = any(n.startswith(("Sub", "_minus")) for n in names) and any(n.startswith(("Mul", "_mul"))
                                                                             for n in names)
        self.input_mean, self.input_std = (0.0, 1.0) if inside else (127.5, 127.5)
        self.session = create_session(str(self.path), provider, what=f"face recogniser {self.path.name}")
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def embed_aligned(self, aligned: Sequence[np.ndarray]) -> np.ndarray:
        """[n, d] embeddings of aligned RGB uint8 crops."""
        batch = np.stack([np.asarray(a, np.float32) for a in aligned])
        blob = ((batch - np.float32(self.input_mean)) * np.float32(1.0 / self.input_std)).transpose(0, 3, 1, 2)
        return self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(blob)})[0]

    def embed(self, rgb: np.ndarray, kps: np.ndarray) -> np.ndarray:
        return self.embed_aligned([align_face(rgb, kps, self.input_size)])[0].astype(np.float32).ravel()


def find_pack_models(folder: Path) -> dict[str, tuple[Path, OnnxSignature]]:
    """The first detector and the first recogniser of a pack folder (sorted file names, as InsightFace picks)."""
    found: dict[str, tuple[Path, OnnxSignature]] = {}
    for path in check_face_model_dir(folder):
        sig = onnx_signature(path)
        task = route_model(sig)
        if task is not None and task not in found:
            found[task] = (path, sig)
        logger.debug("BoLID: %s -> %s", path.name, task or "not used")
    return found


class FaceAnalyzer:
    """An InsightFace pack's detector + ArcFace recogniser on onnxruntime; stateless after construction."""

    def __init__(self, folder: str | os.PathLike, provider: str = "auto", det_thresh: float = 0.5,
                 det_sizes: Sequence[int] = DET_SIZES) -> None:
        folder = Path(folder)
        check_face_model_dir(folder)
        resolve_providers(provider)  # an unavailable provider is an error before any model is read
        if not det_sizes:
            raise ValueError("det_sizes must name at least one detection size")
        try:
            models = find_pack_models(folder)
            if "detection" not in models:
                raise FaceModelError(f"no face detector recognised in {folder}: it needs {EXPECTED_FILES}")
            if "recognition" not in models:
                raise FaceModelError(f"no ArcFace recogniser recognised in {folder}: it needs {EXPECTED_FILES}")
            self.detector = SCRFDDetector(*models["detection"], provider=provider, det_thresh=det_thresh)
            self.recognizer = ArcFaceRecognizer(*models["recognition"], provider=provider)
        except BoLIDError:
            raise
        except Exception as exc:  # onnx/onnxruntime/protobuf types for a damaged file: name the file
            raise FaceModelError(onnx_failure_message(check_face_model_dir(folder), exc, "InsightFace model")) from exc
        self.folder = folder
        self.name = folder.name
        self.det_sizes = self.detector.sizes(det_sizes)
        self.provider = self.detector.provider

    def describe(self) -> str:
        return f"InsightFace {self.name} ({self.detector.path.name} + {self.recognizer.path.name}, {self.provider})"

    def largest_face(self, image: np.ndarray) -> DetectedFace | None:
        """The largest face of an RGB image (uint8 or float 0..1) with its embedding, or None.

        Tries each detection size in turn: a face too big or too small for one size is often found at another.
        """
        rgb = to_uint8_rgb(image)
        for size in self.det_sizes:
            dets, kpss = self.detector.detect(rgb, size)
            if len(dets) == 0:
                logger.debug("BoLID: no face at detection size %d", size)
                continue
            areas = (dets[:, 2] - dets[:, 0]) * (dets[:, 3] - dets[:, 1])
            i = int(np.argmax(areas))
            face = DetectedFace(bbox=dets[i, :4], kps=kpss[i], det_score=float(dets[i, 4]), det_size=size)
            face.embedding = self.recognizer.embed(rgb, kpss[i])
            return face
        return None

    def embed_one(self, image: np.ndarray) -> np.ndarray | None:
        """Normed embedding of the image's largest face, or None without a face."""
        face = self.largest_face(image)
        return None if face is None else face.normed_embedding

    def embed(self, images: Sequence[np.ndarray] | np.ndarray, no_face: str = "error",
              names: Sequence[str] | None = None,
              callback: Callable[[int, int], None] | None = None) -> FaceEmbeds:
        """Average of the images' normed embeddings, renormalised (one identity from several photos).

        ``no_face="error"`` raises NoFaceError naming the first image without a face; ``"skip"`` leaves such
        images out (an error only if no image has a face). ``callback(done, total)`` runs after each image
        (progress bars, interruption checks).
        """
        if no_face not in NO_FACE_POLICIES:
            raise ValueError(f"no_face must be one of {NO_FACE_POLICIES}, got {no_face!r}")
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        images = list(images)
        if not images:
            raise NoFaceError("no images given to encode a face from")
        # the nodes' naming (nodes/comfy_batch.image_names): 1-based, "image K of N"
        names = list(names) if names is not None else [f"image {i + 1} of {len(images)}" for i in range(len(images))]
        found, skipped = [], []
        for done, (image, name) in enumerate(zip(images, names, strict=True), start=1):
            emb = self.embed_one(image)
            if callback is not None:
                callback(done, len(images))
            if emb is None:
                sizes = ", ".join(str(s) for s in self.det_sizes)
                if no_face == "error":
                    raise NoFaceError(f"no face found in {name} (tried detection sizes {sizes}); use a photo where "
                                      "the face is visible, or set no_face to 'skip'")
                logger.warning("BoLID: no face found in %s (detection sizes %s): skipped", name, sizes)
                skipped.append(name)
                continue
            found.append(emb)
        if not found:
            raise NoFaceError(f"no face found in any of the {len(images)} images ({', '.join(skipped)})")
        return FaceEmbeds(embedding=torch.from_numpy(average_embeddings(found)), num_images=len(found),
                          source=f"insightface:{self.name}")


def average_embeddings(embeddings: Sequence[np.ndarray]) -> np.ndarray:
    """Mean of L2-normalised embeddings, renormalised to unit length."""
    stack = np.stack([np.asarray(e, dtype=np.float32).ravel() for e in embeddings])
    stack /= np.maximum(np.linalg.norm(stack, axis=1, keepdims=True), 1e-12)
    mean = stack.mean(axis=0)
    norm = float(np.linalg.norm(mean))
    if norm < 1e-6:
        raise BoLIDError("the face embeddings cancel out (opposite directions): these photos are not one person")
    return (mean / norm).astype(np.float32)
