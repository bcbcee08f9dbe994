"""Batch helpers shared by the node modules: ComfyUI IMAGE -> uint8 arrays, progress bar, cancellation.

ComfyUI is imported inside the functions (leaf modules via ``from ... import``), so outside ComfyUI the
progress and cancellation helpers do nothing and the pack still imports.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..bolid.errors import BoLIDError


class ImageBatchError(BoLIDError):
    """An IMAGE input is not a non-empty [B, H, W, C] batch with 1, 3 or 4 channels."""


def image_batch_to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """ComfyUI IMAGE [B, H, W, C] (or one [H, W, C]) float 0..1 -> list of HxWx3 uint8 RGB arrays.

    Grey images are repeated to RGB, an alpha channel is dropped, values are clamped and rounded.
    """
    if isinstance(images, torch.Tensor) and images.ndim == 3:
        images = images[None]
    if (not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0
            or images.shape[-1] not in (1, 3, 4)):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ImageBatchError(f"expected a non-empty IMAGE batch [B, H, W, C] with 1, 3 or 4 channels, got {shape}")
    if images.shape[-1] == 1:
        images = images.expand(*images.shape[:-1], 3)
    rgb = (images[..., :3].detach().to("cpu", torch.float32).clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    return [np.ascontiguousarray(im) for im in rgb]


def image_list_to_uint8(images: Any) -> list[np.ndarray]:
    """IMAGE input of a list node (``INPUT_IS_LIST``): a list of IMAGE batches of any sizes, or one batch -> arrays.

    Why: a list carries photos of different sizes as they are (core Image Batch rescales and centre-crops every
    photo to the first one's size, cutting heads or feet off). Each item may itself be a batch; order is kept.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise ImageBatchError("expected at least one IMAGE, got an empty list")
        out: list[np.ndarray] = []
        for item in images:
            out.extend(image_batch_to_uint8(item))
        return out
    return image_batch_to_uint8(images)


def one(value: Any) -> Any:
    """A widget or model input of a list node (``INPUT_IS_LIST``): ComfyUI hands every input as a list; the node
    uses its first value. Plain values (direct calls) pass through unchanged."""
    if isinstance(value, list):
        if not value:
            raise ImageBatchError("an input of the node received an empty list")
        return value[0]
    return value


def image_names(count: int) -> list[str]:
    """How messages, logs and previews name the images of a batch: "image 1 of 3", ... (1-based)."""
    return [image_name(i, count) for i in range(count)]


def image_name(index: int, count: int) -> str:
    """The user-facing name of batch item ``index`` (0-based) of ``count``: "image <index + 1> of <count>"."""
    return f"image {index + 1} of {count}"


def check_interrupted() -> None:
    """Raise ComfyUI's interruption exception when the user cancelled the run; nothing outside ComfyUI."""
    try:
        from comfy.model_management import throw_exception_if_processing_interrupted  # type: ignore[import-not-found]
    except ImportError:
        return
    throw_exception_if_processing_interrupted()


def batch_progress(total: int) -> Callable[[int], None]:
    """A step function ``step(done)`` for a batch of ``total`` items: stops on cancellation, advances the bar.

    Outside ComfyUI the step does nothing.
    """
    try:
        from comfy.utils import ProgressBar  # type: ignore[import-not-found]
    except ImportError:
        return lambda done: None
    bar = ProgressBar(total)

    def step(done: int) -> None:
        check_interrupted()
        bar.update_absolute(done, total)

    return step
