"""Encode Body: one person's body identity (a BodyID) from photos and their poses.

Which views count (body keypoint confidence), the crop of each (:mod:`bolid.body_views`), the encoder's
aggregated posterior (:class:`bolid.body_encoder.BodyEncoder`) and the identity's provenance; the same path serves
the Encode Body node and the experiment.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .body_encoder import BodyEncoder
from .body_encoder_io import encoder_hash
from .body_views import person_view, views_to_tensor
from .errors import BoLIDError
from .identity import BodyID
from .keypoints import NO_PERSON, PersonPose
from .proportions import aggregate_proportions, body_proportions

logger = logging.getLogger("bolid")


class BodyEncodeError(BoLIDError):
    """No usable view: no image had a person with enough keypoint confidence, or the input was empty."""


def _advice(reasons: Sequence[str]) -> str:
    """What to do, from why the views were skipped (several people is not fixed by a lower confidence)."""
    tips = []
    if any(r == NO_PERSON for r in reasons):
        tips.append("use photos where the person's body is visible")
    if any("confidence" in r for r in reasons):
        tips.append("lower the minimum confidence or use photos where more of the body is visible")
    if any("people" in r for r in reasons):
        tips.append("crop the photos to one person, or let several_people use the largest person")
    return "; ".join(tips) or "use photos where one person's body is visible"


@dataclass
class EncodeResult:
    """What :func:`encode_body` made: the identity, the views used (crop + weight) and the skipped images."""

    body_id: BodyID
    crops: list[np.ndarray]
    weights: list[float]
    used: list[str]
    skipped: list[tuple[str, str]]


@torch.no_grad()
def encode_body(encoder: BodyEncoder, images: Sequence[np.ndarray], poses: Sequence[PersonPose | None],
                names: Sequence[str] | None = None, min_confidence: float = 0.3,
                model_hash: str | None = None, skip_reasons: Sequence[str | None] | None = None) -> EncodeResult:
    """Encode the body identity of the one person shown in ``images`` (RGB uint8 HxWx3), given their poses.

    A view is used when it has a person whose body confidence (mean of COCO joints 5..16) is at least
    ``min_confidence``; its aggregation weight is that confidence. Raises BodyEncodeError when no view is usable.
    ``model_hash`` is ``encoder_hash(encoder)`` when the caller already has it (``content_hash`` of
    load_body_encoder's info); otherwise it is computed here. ``skip_reasons[i]``, when given, says why the
    caller set ``poses[i]`` to None (e.g. several people and a skip policy); the default is "no person detected".
    """
    images, poses = list(images), list(poses)
    if not images:
        raise BodyEncodeError("no images given: connect at least one photo of the person")
    if len(poses) != len(images):
        raise ValueError(f"{len(images)} images but {len(poses)} poses")
    names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
    cfg = encoder.config
    crops, kps, weights, used, skipped = [], [], [], [], []
    reasons = list(skip_reasons) if skip_reasons is not None else [None] * len(images)
    for name, image, pose, reason in zip(names, images, poses, reasons, strict=True):
        if pose is None:
            skipped.append((name, reason or NO_PERSON))
            continue
        w = pose.body_confidence
        if not w >= min_confidence:
            skipped.append((name, f"body keypoint confidence {w:.2f} < minimum {min_confidence:.2f}"))
            continue
        crop, kp = person_view(image, pose, encoder.view_size, cfg.crop_margin)
        crops.append(crop)
        kps.append(kp)
        weights.append(float(w))
        used.append(name)
    for name, why in skipped:
        logger.warning("BoLID body encoder: skipped %s: %s", name, why)
    if not used:
        listed = "; ".join(f"{n}: {r}" for n, r in skipped)
        raise BodyEncodeError(f"no image has a usable person ({listed}); {_advice([r for _, r in skipped])}")
    param = next(encoder.parameters())
    crop_t = views_to_tensor(crops).to(param.device, param.dtype)
    kp_t = torch.from_numpy(np.stack(kps)).to(param.device, param.dtype)
    w_t = torch.tensor(weights, device=param.device, dtype=param.dtype)
    mu, logvar = encoder.encode(crop_t[None], kp_t[None], w_t[None])
    obs, obs_conf = aggregate_proportions(*body_proportions(kp_t.double()), dim=0)
    extra = {"proportions_observed": [round(float(v), 6) for v in obs],
             "proportions_observed_confidence": [round(float(v), 6) for v in obs_conf],
             "proportions_predicted": [round(float(v), 6) for v in encoder.predict_proportions(mu)[0].float()],
             "min_confidence": float(min_confidence)}
    body_id = BodyID(c_body=mu[0], logvar=logvar[0], views=tuple(used), view_weights=tuple(weights),
                     encoder_hash=model_hash or encoder_hash(encoder), extra=extra)
    return EncodeResult(body_id, crops, weights, used, skipped)
