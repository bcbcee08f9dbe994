"""Loss math on keypoints and embeddings, shared by stage-2 training and evaluation (pure PyTorch).

* :func:`normalize_keypoints` removes translation and scale from a pose (the ``keypoints`` form of L_id compares
  poses after it).
* :func:`keypoint_identity_loss`: the paper's L_id, sum over the 12 body joints of ||p_gen - p_ref||^2, after
  normalisation, weighted by (detached) generated-joint confidence times reference confidence.
* :func:`proportion_identity_loss`: the default ``proportions`` form, built on THE proportion function
  (:mod:`bolid.proportions`): bone lengths / torso length of the generated person vs the identity's reference.
* :func:`appearance_identity_loss`: the ``appearance`` term of L_id, the generated person's colours at body
  landmarks (:mod:`bolid.appearance`: head, hair, wrists, ankles) vs the identity's reference colours.
* :func:`clip_alignment_loss`: 1 - cos(image embedding, text embedding).

All functions take batched tensors and return a scalar averaged over the rows; confidence weights of the
generated image are detached here (the model must not lower the loss by making joints invisible).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .appearance import image_appearance
from .keypoints import BODY_JOINTS
from .proportions import body_proportions, proportion_error

_EPS = 1e-6
ID_LOSS_MODES = ("proportions", "keypoints")


def normalize_keypoints(xy: torch.Tensor, weight: torch.Tensor, joints: tuple[int, ...] = BODY_JOINTS
                        ) -> torch.Tensor:
    """Remove translation and scale: [..., 17, 2] -> [..., len(joints), 2].

    Centre: the weight-weighted mean of the chosen joints; scale: the weighted root-mean-square distance of those
    joints from the centre. A uniform resize plus shift of the pose leaves the result unchanged.
    """
    idx = list(joints)
    p = xy[..., idx, :]
    w = weight[..., idx].unsqueeze(-1)
    w_sum = w.sum(-2, keepdim=True).clamp_min(_EPS)
    centre = (p * w).sum(-2, keepdim=True) / w_sum
    d = p - centre
    scale = torch.sqrt(((d * d).sum(-1, keepdim=True) * w).sum(-2, keepdim=True) / w_sum + _EPS * _EPS)
    return d / scale


def keypoint_identity_loss(gen_xy: torch.Tensor, gen_conf: torch.Tensor, ref_xy: torch.Tensor,
                           ref_conf: torch.Tensor) -> torch.Tensor:
    """L_id ``keypoints``: confidence-weighted squared joint distance after removing translation and scale.

    gen_xy [B, 17, 2], gen_conf [B, 17] (detached here), ref_xy [B, 17, 2], ref_conf [B, 17]. Per row: the
    weighted sum over the 12 body joints of ||p_gen - p_ref||^2 divided by the weight sum; mean over rows.
    """
    w = gen_conf.detach().clamp(0, 1) * ref_conf.clamp(0, 1)
    gen_n = normalize_keypoints(gen_xy, w)
    ref_n = normalize_keypoints(ref_xy, w)
    wj = w[..., list(BODY_JOINTS)]
    per_row = (((gen_n - ref_n) ** 2).sum(-1) * wj).sum(-1) / wj.sum(-1).clamp_min(_EPS)
    return per_row.mean()


def proportion_identity_loss(gen_xy: torch.Tensor, gen_conf: torch.Tensor, ref_props: torch.Tensor,
                             ref_conf: torch.Tensor) -> torch.Tensor:
    """L_id ``proportions``: proportions of the generated pose vs the reference proportion vectors.

    gen_xy [B, 17, 2] in one isotropic pixel frame, gen_conf [B, 17] (detached here), ref_props [B, 6],
    ref_conf [B, 6]. Per row a confidence-weighted mean squared error, then the mean over rows.
    """
    props, conf = body_proportions(gen_xy, gen_conf.detach())
    w = conf.detach() * ref_conf
    return proportion_error(props, ref_props, w, dim=-1).mean()


def appearance_identity_loss(images: torch.Tensor, keypoints: torch.Tensor, ref_appearance: torch.Tensor,
                             ref_conf: torch.Tensor) -> torch.Tensor:
    """L_id ``appearance``: colours read at the target view's landmarks of the generated image vs the identity's.

    images [B, 3, H, W] in ~0..1 (the decoded x0_hat), keypoints [B, 17, 3] in its pixels (those of the training
    view it reconstructs: at high noise the pose model cannot find the joints in x0_hat, but the colours there are
    already decided), ref_appearance / ref_conf [B, 12]. Per row the confidence-weighted squared colour error,
    then the mean over rows."""
    desc, conf = image_appearance(images, keypoints)
    return proportion_error(desc, ref_appearance, conf.detach() * ref_conf, dim=-1).mean()


def clip_alignment_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """L_CLIP = 1 - cos(image, text), averaged over rows."""
    return (1.0 - F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)).mean()
