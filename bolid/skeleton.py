"""The one skeleton renderer for previews (Detect Body Pose, the views of Encode Body From Images) and the
OpenPose-style control image for ControlNet.

Previews draw COCO-17 as detected (box, limbs, joints) with one keypoint threshold. The control image follows
the OpenPose convention that ControlNet OpenPose models were trained on (18 points with a neck, a colour per
limb and per point, on black).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .keypoints import SKELETON, PersonPose

KEYPOINT_DRAW_CONF = 0.3  # a joint (and a limb between two joints) is drawn at this confidence or above
PREVIEW_LIMB = (0, 255, 128)
PREVIEW_JOINT = (255, 64, 64)
PREVIEW_BOX = (255, 200, 0)


def to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB from uint8 or float (0..1) input; ComfyUI images are float RGB."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
    image = image[..., :3]
    if image.dtype != np.uint8:
        image = np.clip(np.rint(image.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)


def draw_poses(image: np.ndarray, poses: Sequence[PersonPose | None], kpt_conf: float = KEYPOINT_DRAW_CONF,
               boxes: bool = True, thickness: int | None = None) -> np.ndarray:
    """A copy of the RGB image with each person's box, COCO skeleton and confident keypoints drawn (preview).

    Keypoints are in the image's pixels. ``thickness`` defaults to one pixel per 400 pixels of the longer side.
    """
    import cv2

    canvas = to_uint8_rgb(image).copy()
    thick = thickness or max(1, round(max(canvas.shape[:2]) / 400))
    for pose in poses:
        if pose is None:
            continue
        if boxes:
            x1, y1, x2, y2 = (int(round(v)) for v in pose.box)
            cv2.rectangle(canvas, (x1, y1), (x2, y2), PREVIEW_BOX, thick)
        kp = pose.keypoints
        for a, b in SKELETON:
            if kp[a, 2] >= kpt_conf and kp[b, 2] >= kpt_conf:
                cv2.line(canvas, (int(kp[a, 0]), int(kp[a, 1])), (int(kp[b, 0]), int(kp[b, 1])), PREVIEW_LIMB,
                         thick, cv2.LINE_AA)
        for x, y, c in kp:
            if c >= kpt_conf:
                cv2.circle(canvas, (int(x), int(y)), thick + 2, PREVIEW_JOINT, -1, cv2.LINE_AA)
    return canvas


# ----------------------------------------------------------------------------------------------------------------
# OpenPose-style control image (what ControlNet OpenPose models were trained on)

# OpenPose's 18-point body order (nose, neck, right arm, left arm, right leg, left leg, eyes, ears): for each
# point the COCO-17 index it comes from; the neck (None) is the midpoint of the shoulders.
OPENPOSE_FROM_COCO: tuple[int | None, ...] = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
# The 17 limbs between OpenPose points, in the convention's drawing order; limb k takes colour k.
OPENPOSE_LIMBS: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
    (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)
OPENPOSE_LIMB_DIM = 0.6  # limbs are drawn at 60 % of their colour, points at full colour


def openpose_colors() -> list[tuple[int, int, int]]:
    """The convention's 18 colours: the hue wheel from red in steps of 20 degrees, channels in steps of 85."""
    colors = []
    for k in range(18):
        sextant, step = divmod(k, 3)
        rise, fall = 85 * step, 255 - 85 * step
        colors.append([(255, rise, 0), (fall, 255, 0), (0, 255, rise), (0, fall, 255), (rise, 0, 255),
                       (255, 0, fall)][sextant])
    return colors


OPENPOSE_COLORS = tuple(openpose_colors())


def coco_to_openpose(keypoints: np.ndarray, min_confidence: float = KEYPOINT_DRAW_CONF) -> np.ndarray:
    """COCO-17 [17, 3] -> OpenPose-18 [18, 3] (x, y, visible 0/1); the neck is seen when both shoulders are."""
    kp = np.asarray(keypoints, dtype=np.float32)
    out = np.zeros((18, 3), np.float32)
    for i, src in enumerate(OPENPOSE_FROM_COCO):
        if src is None:
            seen = kp[5, 2] >= min_confidence and kp[6, 2] >= min_confidence
            out[i] = (*((kp[5, :2] + kp[6, :2]) / 2), float(seen))
        else:
            out[i] = (kp[src, 0], kp[src, 1], float(kp[src, 2] >= min_confidence))
    return out


def openpose_image(poses: Sequence[PersonPose | None], width: int, height: int,
                   min_confidence: float = KEYPOINT_DRAW_CONF, scale: float = 1.0,
                   offset: tuple[float, float] = (0.0, 0.0), stick_width: int | None = None) -> np.ndarray:
    """A black RGB uint8 [height, width, 3] image with each person drawn in the OpenPose convention.

    Keypoints (in their photo's pixels) are mapped by ``xy * scale + offset``. Limbs are filled ellipses whose
    half-width is ``stick_width`` (default: 4 px per 512 px of the longer side), points are discs of that radius.
    """
    import cv2

    canvas = np.zeros((height, width, 3), np.uint8)
    radius = stick_width or max(1, round(4 * max(width, height) / 512))
    people = [coco_to_openpose(p.keypoints, min_confidence) for p in poses if p is not None]
    for pts in people:
        pts[:, :2] = pts[:, :2] * scale + np.asarray(offset, np.float32)
    for pts in people:
        for k, (a, b) in enumerate(OPENPOSE_LIMBS):
            if pts[a, 2] and pts[b, 2]:
                (xa, ya), (xb, yb) = pts[a, :2], pts[b, :2]
                length = float(np.hypot(xb - xa, yb - ya))
                angle = float(np.degrees(np.arctan2(yb - ya, xb - xa)))
                polygon = cv2.ellipse2Poly((int(round((xa + xb) / 2)), int(round((ya + yb) / 2))),
                                           (int(round(length / 2)), radius), int(round(angle)), 0, 360, 1)
                color = tuple(int(c * OPENPOSE_LIMB_DIM) for c in OPENPOSE_COLORS[k])
                cv2.fillConvexPoly(canvas, polygon, color)
    for pts in people:
        for k in range(18):
            if pts[k, 2]:
                cv2.circle(canvas, (int(round(pts[k, 0])), int(round(pts[k, 1]))), radius, OPENPOSE_COLORS[k], -1)
    return canvas


def fit_into(size: tuple[int, int], target: tuple[int, int]) -> tuple[float, tuple[float, float]]:
    """Scale and offset that fit a (width, height) image into a target size, centred, aspect kept, nothing cut."""
    (w, h), (tw, th) = size, target
    scale = min(tw / w, th / h)
    return scale, ((tw - w * scale) / 2, (th - h * scale) / 2)
