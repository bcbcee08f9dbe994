"""Checks of values at BoLID's boundaries, before they reach letterbox, InsightFace, OpenCV or the adapter.

A NaN pixel becomes black after the uint8 cast, an empty image divides by zero in the letterbox, a 1x300 strip
makes InsightFace's resize assert, and an identity vector of 1e30 turns the latent into NaN many steps later.
Each of these is refused here with a message naming the input and the item, so the error points at the cause.
Everything here is pure (numbers, tensors, paths; torch is imported only where a tensor is checked); the node
layer (nodes/validate.py) applies it to every node input by socket type.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import BoLIDError, EmbeddingError

# An image longer than this many times its width (or wider than tall) is refused: no photo of a person is, and
# beyond 256 InsightFace's detector resizes one side to 0 pixels (an OpenCV assertion).
MAX_ASPECT_RATIO = 16.0
# c_body lives near N(0, I): prior draws have an RMS of ~1 (Sample Body ID's maximum temperature 3 gives ~3),
# encoder posteriors less. Far above that the body tokens are outside anything the adapter saw in training.
MAX_BODY_RMS = 10.0
# Face embeddings are L2-normalised ArcFace vectors (norm 1); a raw, unnormalised ArcFace output has a norm of
# ~20..30 and would act as a much stronger face weight than the widget says.
FACE_NORM_RANGE = (0.25, 4.0)

if TYPE_CHECKING:  # torch is imported where tensors are checked: the pose runner needs only numpy and OpenCV
    import torch


class InputValueError(BoLIDError):
    """An input holds unusable values: NaN/Inf, an empty or extreme image shape, a NaN number."""


def check_finite_number(value: object, what: str) -> None:
    """A float/int widget value must be a finite number (ComfyUI's min/max check lets NaN through)."""
    if not isinstance(value, float):  # ints (seeds, counts) are always finite
        return
    if not math.isfinite(value):
        raise InputValueError(f"{what} is {value}; it must be a finite number: type a value in the widget or "
                              "fix the node that computes it")


def check_image_size(height: int, width: int, what: str) -> None:
    """Refuse an empty image and one too elongated for the pose and face models (see MAX_ASPECT_RATIO)."""
    if height < 1 or width < 1:
        raise InputValueError(f"{what} is empty ({height}x{width} pixels); connect a real image (a crop or "
                              "resize upstream produced nothing?)")
    ratio = max(height / width, width / height)
    if ratio > MAX_ASPECT_RATIO:
        raise InputValueError(f"{what} is {height}x{width} pixels (aspect ratio {ratio:.0f}:1); BoLID accepts "
                              f"up to {MAX_ASPECT_RATIO:.0f}:1: crop or pad it to a photo-like shape")


def nonfinite_counts(batch: torch.Tensor) -> list[int]:
    """Per batch item (first dim), how many values are NaN or Inf."""
    import torch

    if not isinstance(batch, torch.Tensor) or batch.ndim == 0:
        return []
    if not (batch.is_floating_point() or batch.is_complex()):
        return [0] * batch.shape[0]
    bad = ~torch.isfinite(batch.detach())
    return bad.reshape(batch.shape[0], -1).sum(dim=1).tolist()


def check_finite_batch(batch: torch.Tensor, names: Sequence[str], what: str) -> None:
    """Refuse a batch with NaN/Inf values, naming the first bad item and how many items are affected."""
    counts = nonfinite_counts(batch)
    bad = [(name, count) for name, count in zip(names, counts, strict=False) if count]
    if not bad:
        return
    name, count = bad[0]
    total = batch[0].numel()
    more = f" ({len(bad)} of {len(counts)} items are affected)" if len(bad) > 1 else ""
    raise InputValueError(f"{what}: {name} has {count} NaN or Inf values of {total}{more}; they would silently "
                          "become black pixels or a NaN result: fix or replace the node that produced it")


def _vector(value: object, what: str) -> torch.Tensor:
    import torch

    if not isinstance(value, torch.Tensor):
        raise EmbeddingError(f"{what} must be a tensor, got {type(value).__name__}")
    value = value.detach().double().reshape(-1)  # float64: the norm of 1e30 values must not overflow
    if value.numel() == 0:
        raise EmbeddingError(f"{what} is empty")
    if not torch.isfinite(value).all():
        raise EmbeddingError(f"{what} contains NaN or Inf values; re-encode it from its images or load another file")
    return value


def check_body_vector(c_body: torch.Tensor, what: str = "body identity c_body") -> None:
    """c_body must be finite and of the magnitude the Body-ID encoder's latent space has (RMS <= MAX_BODY_RMS)."""
    value = _vector(c_body, what)
    rms = float(value.norm()) / math.sqrt(value.numel())
    if not rms <= MAX_BODY_RMS:
        raise EmbeddingError(f"{what} has an RMS value of {rms:.3g}; identities from the Body-ID encoder or its "
                             f"prior have about 1, and BoLID accepts up to {MAX_BODY_RMS:g}: use an identity from "
                             "Encode Body From Images, Load Body ID or Sample Body ID")


def check_face_vector(embedding: torch.Tensor, what: str = "face embedding") -> None:
    """A face embedding must be finite and L2-normalised ArcFace-like: norm within FACE_NORM_RANGE."""
    value = _vector(embedding, what)
    norm = float(value.norm())
    low, high = FACE_NORM_RANGE
    if not low <= norm <= high:
        raise EmbeddingError(f"{what} has norm {norm:.3g}; BoLID expects the L2-normalised ArcFace embedding "
                             f"(norm 1, accepted {low:g}..{high:g}) that Encode Face produces: normalise it")


def find_corrupt_onnx(files: Sequence[str | os.PathLike]) -> tuple[Path, str] | None:
    """The first .onnx file that does not parse as an ONNX model, with the parser's reason; None if all parse.

    Used after onnxruntime (or InsightFace on top of it) failed on a folder of models, to name the bad file.
    """
    import onnx

    for file in files:
        try:
            model = onnx.load(str(file), load_external_data=False)
        except Exception as exc:  # protobuf and onnx raise many types for damaged files
            return Path(file), f"{type(exc).__name__}: {exc}"
        if not model.graph.node:  # an empty file parses as an empty model
            return Path(file), "it holds no model graph (empty or not an ONNX file)"
    return None


def onnx_failure_message(files: Sequence[str | os.PathLike], exc: BaseException, what: str) -> str:
    """A message for a failed onnxruntime load of ``files`` that names the damaged file when one is found."""
    corrupt = find_corrupt_onnx(files)
    if corrupt is not None:
        path, reason = corrupt
        return (f"{what} file {path} is damaged or not an ONNX model ({reason}); re-download it (the other files "
                "of the folder are fine)")
    names = ", ".join(str(f) for f in files)
    return (f"{what} files ({names}) parse as ONNX, but onnxruntime cannot load them ({type(exc).__name__}: "
            f"{exc}); they may need a newer onnxruntime, or one of them is not the model it should be")
