"""Is a generated image a well-formed person? The failed-render check of the experiment, and the broken images
that train and test it.

The world's pose model has a quality head trained on clean renders (positives) against deliberately broken ones
(:data:`TRAINED_BREAKS`); its keypoint-confidence head is trained on figure-free backgrounds. A render fails when
either says so. :data:`HELD_OUT_BREAKS` are never shown in training: the tests measure the check on them too, so
it is not only recognising its own training corruptions.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageFilter

from bolid.synthetic import SyntheticPhoto, background_image

TRAINED_BREAKS: tuple[str, ...] = ("blank", "blur", "double", "split", "noise")
HELD_OUT_BREAKS: tuple[str, ...] = ("melt", "shuffle")
QUALITY_THRESHOLD = 0.5
BODY_CONFIDENCE_THRESHOLD = 0.5


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask > 0.2)
    if len(xs) == 0:
        return 0, 0, mask.shape[1], mask.shape[0]
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def break_photo(photo: SyntheticPhoto, kind: str, rng: np.random.Generator,
                other: SyntheticPhoto | None = None) -> np.ndarray:
    """A deliberately broken version of ``photo.image`` (uint8 HxWx3): what a failed diffusion render looks like.

    ``double`` needs ``other`` (a second photo, blended in as a ghost figure)."""
    img = photo.image
    h, w = img.shape[:2]
    if kind == "blank":
        return background_image(photo.attributes["background"], w)
    if kind == "blur":
        radius = float(rng.uniform(1.6, 3.0))
        return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius)))
    if kind == "double":
        if other is None:
            raise ValueError("break_photo('double') needs a second photo")
        a = float(rng.uniform(0.4, 0.6))
        shift = int(rng.integers(4, 9)) * (1 if rng.random() < 0.5 else -1)
        ghost = np.roll(other.image, shift, axis=1)
        return np.clip(a * img + (1 - a) * ghost, 0, 255).astype(np.uint8)
    if kind == "split":
        cut = int(round(float(photo.keypoints[[11, 12], 1].mean())))
        cut = min(max(cut, 2), h - 2)
        out = img.copy()
        shift = int(rng.integers(3, 8)) * (1 if rng.random() < 0.5 else -1)
        out[:cut] = np.roll(img[:cut], shift, axis=1)
        return out
    if kind == "noise":
        x0, y0, x1, y1 = _bbox(photo.mask)
        out = img.astype(np.float64)
        out[y0:y1, x0:x1] += rng.normal(0.0, float(rng.uniform(45, 80)), (y1 - y0, x1 - x0, 3))
        return np.clip(out, 0, 255).astype(np.uint8)
    if kind == "melt":  # rows displaced by a random wave: a wobbly, melted figure
        amp, period, phase = float(rng.uniform(2.5, 4.0)), float(rng.uniform(5, 10)), float(rng.uniform(0, 6.3))
        out = img.copy()
        for y in range(h):
            out[y] = np.roll(img[y], int(round(amp * math.sin(2 * math.pi * y / period + phase))), axis=0)
        return out
    if kind == "shuffle":  # 4x4 patches of the figure's box shuffled: the colours stay, the body does not
        x0, y0, x1, y1 = _bbox(photo.mask)
        x0, y0 = x0 - x0 % 4, y0 - y0 % 4
        x1, y1 = min(w, x1 + (-x1) % 4), min(h, y1 + (-y1) % 4)
        out = img.copy()
        cells = [(y, x) for y in range(y0, y1 - 3, 4) for x in range(x0, x1 - 3, 4)]
        order = rng.permutation(len(cells))
        for (y, x), k in zip(cells, order, strict=True):
            sy, sx = cells[k]
            out[y : y + 4, x : x + 4] = img[sy : sy + 4, sx : sx + 4]
        return out
    raise ValueError(f"unknown break {kind!r}; known: {TRAINED_BREAKS + HELD_OUT_BREAKS}")


def render_failed(outputs: dict[str, torch.Tensor]) -> np.ndarray:
    """From the world pose model's outputs: True where the image is not a well-formed person (the quality head
    says broken, or the body joints' mean confidence says no person)."""
    quality = torch.sigmoid(outputs["quality"]).detach().cpu().numpy()
    body_conf = outputs["keypoints"][:, 5:, 2].mean(1).detach().cpu().numpy()
    return (quality < QUALITY_THRESHOLD) | (body_conf < BODY_CONFIDENCE_THRESHOLD)
