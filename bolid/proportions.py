"""THE body-proportion function: bone lengths divided by torso length, left and right averaged.

One definition serves three purposes, so it lives here and nowhere else:

* stage 1: the Body-ID decoder predicts an identity's proportion vector from c_body (pose-invariant target);
* stage 2: the default ``proportions`` form of L_id compares the proportions of the generated person with the
  identity's aggregate (so it must be differentiable and confidence-weighted);
* evaluation: the body-consistency metric.

Why proportions rather than raw joints: absolute joint positions mostly measure the pose, whereas bone-length
ratios are (up to foreshortening) a property of the person. Dividing by the torso length removes image scale,
differences remove translation, and averaging the left and right bone removes the dependence on which side the
pose model labels "left" (a horizontal flip swaps the labels, lengths stay the same).

Torso length: the distance between the shoulder midpoint (COCO 5, 6) and the hip midpoint (COCO 11, 12).

The bone list (COCO-17 indices), one entry per proportion, in this order:

====  ===============  =========================================  =====================
idx   name             segments (averaged when two are listed)    confidence
====  ===============  =========================================  =====================
0     upper_arm        5-7 (left), 6-8 (right)                    c_a * c_b per side
1     forearm          7-9, 8-10                                  c_a * c_b per side
2     thigh            11-13, 12-14                               c_a * c_b per side
3     shin             13-15, 14-16                               c_a * c_b per side
4     shoulder_width   5-6                                        c_5 * c_6
5     hip_width        11-12                                      c_11 * c_12
====  ===============  =========================================  =====================

Left/right averaging is confidence-weighted: (c_l * len_l + c_r * len_r) / (c_l + c_r), so a missing side does
not drag the average towards zero. Each proportion's confidence is the bone confidence (mean of the two sides'
confidences for paired bones) times the torso confidence (product of the four torso joints' confidences).
Products (not minima) keep everything differentiable. Coordinates must be in one isotropic pixel frame (any
uniform scale and translation is fine; a non-uniform resize changes the ratios).
"""

from __future__ import annotations

import numpy as np
import torch

PROPORTION_NAMES: tuple[str, ...] = ("upper_arm", "forearm", "thigh", "shin", "shoulder_width", "hip_width")
NUM_PROPORTIONS = len(PROPORTION_NAMES)

# (left bone, right bone) as COCO index pairs; a single bone is listed once with None as the other side
PROPORTION_BONES: tuple[tuple[tuple[int, int], tuple[int, int] | None], ...] = (
    ((5, 7), (6, 8)),
    ((7, 9), (8, 10)),
    ((11, 13), (12, 14)),
    ((13, 15), (14, 16)),
    ((5, 6), None),
    ((11, 12), None),
)
TORSO_JOINTS: tuple[int, int, int, int] = (5, 6, 11, 12)

_EPS = 1e-6


def _length(xy: torch.Tensor, a: int, b: int) -> torch.Tensor:
    # sqrt(x + eps^2) keeps the gradient finite for coincident joints
    d = xy[..., a, :] - xy[..., b, :]
    return torch.sqrt((d * d).sum(-1) + _EPS * _EPS)


def body_proportions(keypoints: torch.Tensor, confidence: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Proportion vector and its per-entry confidence, differentiable in the coordinates.

    keypoints: [..., 17, 3] (x, y, confidence) or [..., 17, 2] with ``confidence`` [..., 17] (all ones if None).
    Returns (proportions [..., 6], confidence [..., 6]); entries whose joints were not seen have confidence ~0
    and a value that must be ignored (use the confidence as a weight).
    """
    if keypoints.shape[-2] != 17 or keypoints.shape[-1] not in (2, 3):
        raise ValueError(f"keypoints must have shape [..., 17, 2|3], got {tuple(keypoints.shape)}")
    xy = keypoints[..., :2]
    if confidence is None:
        confidence = keypoints[..., 2] if keypoints.shape[-1] == 3 else torch.ones_like(xy[..., 0])
    conf = confidence.clamp(0.0, 1.0)

    sh_mid = 0.5 * (xy[..., 5, :] + xy[..., 6, :])
    hip_mid = 0.5 * (xy[..., 11, :] + xy[..., 12, :])
    d = sh_mid - hip_mid
    torso = torch.sqrt((d * d).sum(-1) + _EPS * _EPS)
    torso_conf = conf[..., 5] * conf[..., 6] * conf[..., 11] * conf[..., 12]

    values, confs = [], []
    for left, right in PROPORTION_BONES:
        len_l = _length(xy, *left)
        c_l = conf[..., left[0]] * conf[..., left[1]]
        if right is None:
            values.append(len_l)
            confs.append(c_l)
            continue
        len_r = _length(xy, *right)
        c_r = conf[..., right[0]] * conf[..., right[1]]
        total = c_l + c_r
        # equal weights when neither side is seen (the entry's confidence is then 0 anyway)
        w_l = torch.where(total > _EPS, c_l / total.clamp_min(_EPS), torch.full_like(total, 0.5))
        values.append(w_l * len_l + (1.0 - w_l) * len_r)
        confs.append(0.5 * total)
    props = torch.stack(values, -1) / torso.unsqueeze(-1)
    prop_conf = torch.stack(confs, -1) * torso_conf.unsqueeze(-1)
    # a degenerate torso (shoulders on the hips) gives no usable ratio
    prop_conf = torch.where((torso > 1e-3).unsqueeze(-1), prop_conf, torch.zeros_like(prop_conf))
    return props, prop_conf


def aggregate_proportions(proportions: torch.Tensor, confidence: torch.Tensor, dim: int = 0
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence-weighted mean over views (``dim``): an identity's reference proportions.

    Returns (mean, total confidence / number of views), so the confidence stays in [0, 1].
    """
    total = confidence.sum(dim)
    mean = (proportions * confidence).sum(dim) / total.clamp_min(_EPS)
    return mean, total / max(1, proportions.shape[dim])


def proportion_error(pred: torch.Tensor, target: torch.Tensor, confidence: torch.Tensor, dim: int | None = None,
                     eps: float = _EPS) -> torch.Tensor:
    """THE confidence-weighted squared error between proportion vectors: sum c (p - t)^2 / sum c.

    ``dim=None``: one number over all entries (the stage-1 heads' loss, which also applies it to the appearance
    targets); ``dim=-1``: one per row (stage 2's L_id ``proportions`` form averages the rows; the body-consistency
    metric takes the square root of each). ``confidence`` should be detached by the caller when it comes from the
    generated image (the design: joints weighted by detached confidence), otherwise the model can lower the loss
    by hiding joints.
    """
    weighted = (pred - target) ** 2 * confidence
    if dim is None:
        return weighted.sum() / confidence.sum().clamp_min(eps)
    return weighted.sum(dim) / confidence.sum(dim).clamp_min(eps)


def body_proportions_np(keypoints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NumPy wrapper of :func:`body_proportions` for [..., 17, 3] arrays (e.g. ``PersonPose.keypoints``)."""
    kp = torch.as_tensor(np.asarray(keypoints, dtype=np.float64))
    props, conf = body_proportions(kp)
    return props.numpy().astype(np.float32), conf.numpy().astype(np.float32)
