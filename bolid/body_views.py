"""The Body-ID encoder's inputs: the square person crop of a photo, its keypoints, and their heatmaps.

One crop path serves training and inference: the prepare step stores :func:`person_view` in the dataset cache,
Encode Body cuts the same view, and both reach the network through :func:`views_to_tensor` and
:func:`resize_views` (tested to give identical inputs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .keypoints import PersonPose


def render_heatmaps(keypoints: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Gaussian blobs [..., 17, size, size] at crop-normalised keypoints [..., 17, 3], scaled by confidence."""
    centres = (torch.arange(size, device=keypoints.device, dtype=keypoints.dtype) + 0.5) / size
    dx = (centres.view(1, size) - keypoints[..., 0:1]) ** 2  # [..., 17, size] along x
    dy = (centres.view(1, size) - keypoints[..., 1:2]) ** 2
    gx = torch.exp(-dx / (2 * sigma * sigma))
    gy = torch.exp(-dy / (2 * sigma * sigma))
    return keypoints[..., 2, None, None] * gy.unsqueeze(-1) * gx.unsqueeze(-2)


def crop_box(pose: PersonPose, image_size: tuple[int, int], margin: float) -> tuple[float, float, float]:
    """Square crop (x0, y0, side) around the person: the box, or the seen keypoints if the box is degenerate."""
    x1, y1, x2, y2 = (float(v) for v in pose.box)
    if not (x2 - x1 > 1 and y2 - y1 > 1):
        seen = pose.keypoints[pose.keypoints[:, 2] > 0]
        if len(seen) == 0:
            w, h = image_size
            x1, y1, x2, y2 = 0.0, 0.0, float(w), float(h)
        else:
            x1, y1 = seen[:, :2].min(0)
            x2, y2 = seen[:, :2].max(0)
    side = max(x2 - x1, y2 - y1, 2.0) * margin
    cx, cy = 0.5 * (x1 + x2), 0.5 * (y1 + y2)
    return cx - side / 2, cy - side / 2, side


def crop_person(image: np.ndarray, pose: PersonPose, size: int, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Square person crop (uint8 [size, size, 3], black outside the image) and keypoints in crop units [0, 1].

    A square crop scales x and y equally, so proportions measured in crop units equal those in the photo.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"crop_person needs an HxWx3 uint8 RGB image, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    x0, y0, side = crop_box(pose, (w, h), margin)
    pil = Image.fromarray(image)
    # PIL pads with black where the box leaves the image
    region = pil.crop((int(math.floor(x0)), int(math.floor(y0)),
                       int(math.floor(x0)) + int(math.ceil(side)), int(math.floor(y0)) + int(math.ceil(side))))
    crop = np.asarray(region.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)
    real_side = float(int(math.ceil(side)))
    kp = pose.keypoints.copy()
    kp[:, 0] = (kp[:, 0] - math.floor(x0)) / real_side
    kp[:, 1] = (kp[:, 1] - math.floor(y0)) / real_side
    return crop, kp.astype(np.float32)


def person_view(image: np.ndarray, pose: PersonPose, view_size: int, margin: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """The one crop path of training and inference: a person view as stored (uint8, ``view_size``) + keypoints.

    The prepare step stores exactly this in the dataset cache; Encode Body cuts the same view at the size the
    encoder was trained with (``BodyEncoder.view_size``), and :func:`views_to_tensor` then
    :meth:`BodyEncoder.encode_views` turn both into identical network inputs (tested).
    """
    return crop_person(image, pose, view_size, margin)


def views_to_tensor(crops: np.ndarray | torch.Tensor | Sequence[np.ndarray]) -> torch.Tensor:
    """Stored views uint8 [N, S, S, 3] -> float [N, 3, S, S] in 0..1 (float32), as training reads the cache."""
    if isinstance(crops, torch.Tensor):
        t = crops
    else:
        t = torch.from_numpy(np.ascontiguousarray(np.stack(list(crops)) if not isinstance(crops, np.ndarray)
                                                  else crops))
    if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"views must be uint8 [N, S, S, 3], got {t.dtype} {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2).float() / 255.0


def resize_views(crops: torch.Tensor, size: int) -> torch.Tensor:
    """float [N, 3, S, S] -> [N, 3, size, size] (bilinear, antialiased; unchanged when S == size)."""
    if crops.shape[-1] == size and crops.shape[-2] == size:
        return crops
    return F.interpolate(crops, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
