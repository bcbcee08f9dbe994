"""A person's appearance as a few colours read at body landmarks: the stage-1 target that asks c_body for looks.

Proportions (:mod:`bolid.proportions`) say nothing about skin, hair or build, which are what people recognise
first. This descriptor samples the mean colour of a small window at four places of a person crop: the head, the
top of the head (hair), the wrists and the ankles (left and right averaged, so a horizontal flip leaves it
unchanged). One photo's descriptor mixes identity with clothing and light; averaged over a person's photos the
clothing varies and the identity stays, which is why stage 1 predicts the *identity's* mean from c_body.

The top of the head is the head centre moved away from the shoulders by half the head-to-shoulder distance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

APPEARANCE_PLACES: tuple[str, ...] = ("head", "head_top", "wrists", "ankles")
APPEARANCE_DIM = 3 * len(APPEARANCE_PLACES)
_HEAD = (0, 1, 2, 3, 4)


def _sample(crops: torch.Tensor, xy: torch.Tensor, radius: float) -> torch.Tensor:
    """Mean colour [N, 3] of a (2*radius)-wide square window at crop-unit points xy [N, 2] (bilinear)."""
    offsets = torch.linspace(-radius, radius, 3, device=crops.device, dtype=crops.dtype)
    oy, ox = torch.meshgrid(offsets, offsets, indexing="ij")
    pts = xy[:, None, :] + torch.stack([ox.flatten(), oy.flatten()], -1)[None]  # [N, 9, 2]
    grid = (pts * 2.0 - 1.0)[:, None]  # [N, 1, 9, 2] in [-1, 1]
    values = F.grid_sample(crops, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return values[:, :, 0].mean(-1)


def appearance_descriptor(crops: torch.Tensor, keypoints: torch.Tensor, radius: float = 0.03
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """crops [N, 3, S, S] in 0..1, keypoints [N, 17, 3] in crop units -> (descriptor [N, 12], confidence [N, 12]).

    Order: :data:`APPEARANCE_PLACES`, RGB each. A place's confidence is its joints' confidence (head: mean of the
    five head points; pairs: mean of the two sides), so a hidden place can be down-weighted like a proportion."""
    kp = keypoints.to(crops.dtype)
    conf = kp[..., 2].clamp(0, 1)
    w_head = conf[:, _HEAD]
    head = (kp[:, _HEAD, :2] * w_head[..., None]).sum(1) / w_head.sum(1, keepdim=True).clamp_min(1e-6)
    shoulders = kp[:, (5, 6), :2].mean(1)
    top = head + 0.5 * (head - shoulders)
    places = [(head, w_head.mean(1)), (top, w_head.mean(1) * conf[:, (5, 6)].mean(1))]
    desc = [_sample(crops, head, radius), _sample(crops, top, radius)]
    for left, right in ((9, 10), (15, 16)):
        cl, cr = conf[:, left], conf[:, right]
        colour = (_sample(crops, kp[:, left, :2], radius) * cl[:, None]
                  + _sample(crops, kp[:, right, :2], radius) * cr[:, None]) / (cl + cr).clamp_min(1e-6)[:, None]
        desc.append(colour)
        places.append((None, 0.5 * (cl + cr)))
    confidence = torch.stack([c for _, c in places], 1).repeat_interleave(3, dim=1)
    return torch.cat(desc, 1), confidence


def aggregate_appearance(desc: torch.Tensor, conf: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence-weighted mean over photos (the identity's appearance) and the mean confidence."""
    total = conf.sum(dim)
    return (desc * conf).sum(dim) / total.clamp_min(1e-6), conf.mean(dim)


def image_appearance(images: torch.Tensor, keypoints: torch.Tensor, radius: float = 0.03
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`appearance_descriptor` of whole images: images [N, 3, H, W] in ~0..1, keypoints [N, 17, 3] in the
    images' pixels (x, y, confidence). Stage 2 uses it on its training views and on the predicted x0 (the
    ``appearance`` term of L_id), so both sides are read the same way."""
    h, w = images.shape[-2:]
    kp = keypoints.to(images.dtype).clone()
    kp[..., 0] = kp[..., 0] / w
    kp[..., 1] = kp[..., 1] / h
    return appearance_descriptor(images, kp, radius)
