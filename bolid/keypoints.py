"""COCO-17 keypoint conventions and the per-person pose record every BoLID part exchanges."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COCO_KEYPOINTS: tuple[str, ...] = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
)
NUM_KEYPOINTS = len(COCO_KEYPOINTS)
BODY_JOINTS: tuple[int, ...] = tuple(range(5, 17))  # the 12 body joints whose mean confidence weights a view
FLIP_PAIRS: tuple[tuple[int, int], ...] = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))
SKELETON: tuple[tuple[int, int], ...] = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8), (7, 9), (8, 10),
    (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)


def flip_index() -> np.ndarray:
    """Permutation that maps keypoints of a horizontally flipped image back to their semantic slots."""
    perm = np.arange(NUM_KEYPOINTS)
    for a, b in FLIP_PAIRS:
        perm[a], perm[b] = b, a
    return perm


@dataclass(frozen=True)
class PersonPose:
    """One detected person in original image pixel coordinates.

    box: [4] x1, y1, x2, y2; score: detection confidence; keypoints: [17, 3] x, y, confidence.
    """

    box: np.ndarray
    score: float
    keypoints: np.ndarray

    def __post_init__(self) -> None:
        kp = np.asarray(self.keypoints, dtype=np.float32)
        if kp.shape != (NUM_KEYPOINTS, 3):
            raise ValueError(f"keypoints must have shape (17, 3), got {kp.shape}")
        object.__setattr__(self, "keypoints", kp)
        object.__setattr__(self, "box", np.asarray(self.box, dtype=np.float32).reshape(4))

    @property
    def body_confidence(self) -> float:
        """Mean confidence of the 12 body joints (COCO 5..16): the view's aggregation weight."""
        return float(self.keypoints[list(BODY_JOINTS), 2].mean())

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return float(max(0.0, x2 - x1) * max(0.0, y2 - y1))
