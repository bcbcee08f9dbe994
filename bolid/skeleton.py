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
