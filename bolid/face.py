"""InsightFace on onnxruntime: the largest face per image, its normed ArcFace embedding, averaged over images.

Model packs (antelopev2, buffalo_l, or any folder with a detector and a recogniser .onnx) live in
``<root>/models/<name>/``, the layout users of other ComfyUI packs already have. InsightFace tries to download
a pack whose folder is missing, so the folder is checked first and a missing one is an immediate error that
says which files go where. Detection retries smaller sizes (640, 512, 384, 256) before giving up on an image,
and a face-less image is either an error naming that image or skipped, as the caller chooses.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .errors import BoLIDError
from .identity import FaceEmbeds
from .onnx_providers import check_active_provider, resolve_providers
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


class FaceAnalyzer:
    """An InsightFace detector + ArcFace recogniser pair; stateless after construction, shareable."""

    def __init__(self, folder: str | os.PathLike, provider: str = "auto", det_thresh: float = 0.5,
                 det_sizes: Sequence[int] = DET_SIZES) -> None:
        folder = Path(folder)
        check_face_model_dir(folder)
        providers = resolve_providers(provider)
        try:
            from insightface.app import FaceAnalysis
        except ImportError as exc:
            raise FaceModelError("InsightFace is not installed: run `pip install --no-deps insightface` in ComfyUI's "
                                 "Python (plus exactly one of onnxruntime-gpu / onnxruntime)") from exc

        try:
            # a folder path as ``name`` makes InsightFace load it directly (no download path is taken)
            app = FaceAnalysis(name=str(folder.resolve()), allowed_modules=["detection", "recognition"],
                               providers=providers)
        except AssertionError as exc:  # InsightFace asserts that a detector was found
            raise FaceModelError(f"no face detector recognised in {folder}: it needs {EXPECTED_FILES}") from exc
        except Exception as exc:  # onnxruntime/protobuf types for a damaged file: name the file
            files = check_face_model_dir(folder)
            raise FaceModelError(onnx_failure_message(files, exc, "InsightFace model")) from exc
        if "recognition" not in app.models:
            raise FaceModelError(f"no ArcFace recogniser recognised in {folder}: it needs {EXPECTED_FILES}")
        if not det_sizes:
            raise ValueError("det_sizes must name at least one detection size")
        self.det_sizes = tuple(int(s) for s in det_sizes)
        app.prepare(ctx_id=0, det_thresh=det_thresh, det_size=(self.det_sizes[0], self.det_sizes[0]))
        self.app = app
        self.folder = folder
        self.name = folder.name
        self.detector = app.models["detection"]
        self.recognizer = app.models["recognition"]
        self.provider = check_active_provider(self.detector.session.get_providers(), providers,
                                              f"InsightFace {self.name}")

    def describe(self) -> str:
        return f"InsightFace {self.name} ({self.provider})"

    def largest_face(self, image: np.ndarray):
        """The largest face of an RGB image (uint8 or float 0..1) with its embedding, or None.

        Tries each detection size in turn: a face too big or too small for one size is often found at another.
        """
        from insightface.app.common import Face

        bgr = np.ascontiguousarray(to_uint8_rgb(image)[..., ::-1])
        for size in self.det_sizes:
            bboxes, kpss = self.detector.detect(bgr, input_size=(size, size), max_num=0)
            if bboxes is None or len(bboxes) == 0:
                logger.debug("BoLID: no face at detection size %d", size)
                continue
            areas = (bboxes[:, 2] - bboxes[:, 0]) * (bboxes[:, 3] - bboxes[:, 1])
            i = int(np.argmax(areas))
            face = Face(bbox=bboxes[i, :4], kps=None if kpss is None else kpss[i], det_score=bboxes[i, 4])
            self.recognizer.get(bgr, face)
            face.det_size = size
            return face
        return None

    def embed_one(self, image: np.ndarray) -> np.ndarray | None:
        """Normed 512-d embedding of the image's largest face, or None without a face."""
        face = self.largest_face(image)
        if face is None:
            return None
        emb = np.asarray(face.embedding, dtype=np.float32).ravel()
        return emb / max(float(np.linalg.norm(emb)), 1e-12)

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
