"""Evaluation metrics: body consistency, face similarity, CLIP-T, FID and IS.

Everything here is pure library code (no training imports) and works on plain arrays/tensors, so any pose
model, face recognizer, CLIP model or Inception network can be plugged in:

* **Body consistency** (:func:`body_consistency`): the body-proportion error between generated people and the
  reference identity, through a pose model, using THE proportion function (:mod:`bolid.proportions`): per
  image, ``sqrt(proportion_error(p_gen, p_ref, c))`` = confidence-weighted RMS difference of the six proportions
  (bone lengths over torso length). Lower is better; 0 = the same proportions. The reference is the
  confidence-weighted aggregate over the reference photos (:func:`reference_proportions`).
* **Face similarity** (:func:`face_similarity`): cosine between each generated face's ArcFace embedding and the
  reference embedding; images without a detected face are counted (detection rate) and left out of the mean.
  The evaluating recognizer may differ from the one used in training (and should, to avoid rewarding overfit).
* **CLIP-T** (:func:`clip_t_score`, :class:`OpenCLIPScorer`): CLIPScore convention, ``100 * max(cos, 0)``
  between image and caption embeddings; the CLIP weights come from a local file.
* **FID / IS** (:func:`fid_score`, :func:`inception_score`): torchmetrics on torch-fidelity's InceptionV3 from a
  LOCAL weights file (:func:`load_inception`; a clear error names the missing file), or any custom feature
  extractor module (uint8 [N, 3, H, W] -> [N, d] features, or logits for IS).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import BoLIDError
from .proportions import aggregate_proportions, body_proportions, proportion_error

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"  # torch-fidelity's InceptionV3 weights


class MetricModelError(BoLIDError):
    """A model a metric needs (Inception, CLIP, face recognizer, pose model) is missing or unusable."""


def finite_mean(values: np.ndarray) -> float:
    """Mean over the images where the metric's detector saw something (NaN marks the others); NaN if none."""
    ok = np.isfinite(values)
    return float(values[ok].mean()) if ok.any() else float("nan")


def finite_fraction(values: np.ndarray) -> float:
    """Fraction of images where the metric's detector saw something (a finite value); NaN for no images."""
    return float(np.isfinite(values).mean()) if len(values) else float("nan")


# ----------------------------------------------------------------------------------------------- body


def _as_keypoints(keypoints: np.ndarray | torch.Tensor) -> torch.Tensor:
    kp = torch.as_tensor(np.asarray(keypoints) if not isinstance(keypoints, torch.Tensor) else keypoints)
    kp = kp.detach().double()
    if kp.ndim == 2:
        kp = kp[None]
    if kp.ndim != 3 or kp.shape[1:] != (17, 3):
        raise ValueError(f"keypoints must be [N, 17, 3] (x, y, confidence), got {tuple(kp.shape)}")
    return kp


def reference_proportions(keypoints: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """An identity's reference proportions from its reference photos' keypoints [N, 17, 3]:
    (confidence-weighted mean [6], mean confidence [6])."""
    props, conf = body_proportions(_as_keypoints(keypoints))
    mean, mean_conf = aggregate_proportions(props, conf, dim=0)
    return mean.numpy(), mean_conf.numpy()


@dataclass(frozen=True)
class BodyConsistency:
    """Per-image proportion errors (NaN where the pose model saw no usable body) and their summary."""

    errors: np.ndarray
    proportions: np.ndarray  # [N, 6] measured on the generated images
    confidence: np.ndarray  # [N, 6]

    @property
    def mean(self) -> float:
        return finite_mean(self.errors)

    @property
    def detected(self) -> float:
        """Fraction of images with a usable body (proportion confidence above the threshold)."""
        return finite_fraction(self.errors)


def proportion_errors(props: torch.Tensor, conf: torch.Tensor, ref: torch.Tensor, ref_conf: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """Confidence-weighted RMS proportion difference per row: sqrt(sum c (p - r)^2 / sum c), c = conf * ref_conf."""
    c = conf if ref_conf is None else conf * ref_conf
    return torch.sqrt(proportion_error(props, ref, c, dim=-1, eps=1e-12))


def body_consistency(generated_keypoints: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor,
                     reference_confidence: np.ndarray | torch.Tensor | None = None, min_confidence: float = 0.05
                     ) -> BodyConsistency:
    """Proportion error of each generated person against the reference identity.

    generated_keypoints: [N, 17, 3] from the pose model on the generated images. reference: [6] (one identity for
    all rows) or [N, 6] (per-row identities), e.g. from :func:`reference_proportions`. Rows whose summed
    proportion confidence (with the reference's) is below ``min_confidence`` (no usable body) get NaN.
    """
    kp = _as_keypoints(generated_keypoints)
    props, conf = body_proportions(kp)
    ref = torch.as_tensor(np.asarray(reference, dtype=np.float64)).expand_as(props)
    ref_conf = None if reference_confidence is None else \
        torch.as_tensor(np.asarray(reference_confidence, dtype=np.float64)).expand_as(props)
    err = proportion_errors(props, conf, ref, ref_conf)
    c = conf if ref_conf is None else conf * ref_conf
    err = torch.where(c.mean(-1) >= min_confidence, err, torch.full_like(err, float("nan")))
    return BodyConsistency(err.numpy(), props.numpy(), conf.numpy())


# ----------------------------------------------------------------------------------------------- face


@dataclass(frozen=True)
class FaceSimilarity:
    similarities: np.ndarray  # NaN where no face was found

    @property
    def mean(self) -> float:
        return finite_mean(self.similarities)

    @property
    def detected(self) -> float:
        return finite_fraction(self.similarities)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    na = np.linalg.norm(a, axis=-1)
    nb = np.linalg.norm(b, axis=-1)
    return (a * b).sum(-1) / np.maximum(na * nb, 1e-12)


def face_similarity(generated: Sequence[np.ndarray | None], reference: np.ndarray) -> FaceSimilarity:
    """Cosine between each generated face embedding (None = no face found) and the reference embedding [512]
    (e.g. the averaged normed ArcFace embedding of the reference photos)."""
    ref = np.asarray(reference, dtype=np.float64).reshape(-1)
    sims = np.array([np.nan if e is None else float(cosine(np.asarray(e).reshape(-1), ref)) for e in generated])
    return FaceSimilarity(sims)


def embed_faces(embed_one: Callable[[np.ndarray], np.ndarray | None], images: Sequence[np.ndarray]
                ) -> list[np.ndarray | None]:
    """Run a face recognizer (e.g. ``bolid.face.FaceAnalyzer(...).embed_one``) on every image."""
    return [embed_one(np.ascontiguousarray(im)) for im in images]


# ----------------------------------------------------------------------------------------------- CLIP-T


def clip_t_score(image_features: torch.Tensor | np.ndarray, text_features: torch.Tensor | np.ndarray) -> np.ndarray:
    """Per-pair CLIPScore: 100 * max(cos(image, text), 0)."""
    return 100.0 * np.maximum(cosine(np.asarray(image_features), np.asarray(text_features)), 0.0)


class OpenCLIPScorer:
    """CLIP-T with an open_clip model from a local weights file (no download).

    ``OpenCLIPScorer("ViT-B-32", "/models/clip/ViT-B-32.safetensors")``; the tokenizer is built from the BPE
    vocabulary shipped inside open_clip.
    """

    def __init__(self, model_name: str, weights_path: str | os.PathLike, device: str = "cpu") -> None:
        path = Path(weights_path)
        if not path.is_file():
            raise MetricModelError(f"CLIP weights not found: {path} (CLIP-T needs a local open_clip weights file for "
                                   f"model {model_name!r}; nothing is downloaded)")
        import open_clip

        try:
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(path),
                                                                         device=device)
        except Exception as exc:  # open_clip raises several types for a wrong file/model pair
            raise MetricModelError(f"{path}: cannot load as open_clip model {model_name!r} ({exc})") from exc
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray], captions: Sequence[str]) -> np.ndarray:
        from PIL import Image

        pix = torch.stack([self.preprocess(Image.fromarray(np.asarray(im))) for im in images]).to(self.device)
        img = self.model.encode_image(pix).float()
        txt = self.model.encode_text(self.tokenizer(list(captions)).to(self.device)).float()
        return clip_t_score(img.cpu().numpy(), txt.cpu().numpy())


# ----------------------------------------------------------------------------------------------- FID / IS


class _SelectFeature(nn.Module):
    """torch-fidelity extractors return a tuple of the requested features; torchmetrics wants one tensor."""

    def __init__(self, extractor: nn.Module, index: int = 0) -> None:
        super().__init__()
        self.extractor = extractor
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.extractor(x)
        if isinstance(out, (tuple, list)):
            out = out[self.index]
        return out.reshape(x.shape[0], -1)


def load_inception(weights_path: str | os.PathLike | None, feature: str = "2048") -> nn.Module:
    """torch-fidelity's InceptionV3 from a LOCAL weights file; ``feature``: '64'|'192'|'768'|'2048'|'logits_unbiased'.

    The file (``pt_inception-2015-12-05-6726825d.pth``, or a safetensors copy) is read safely (safetensors, or
    ``torch.load(weights_only=True)``); nothing is downloaded. Returns a module uint8 [N, 3, H, W] -> [N, d].
    """
    if weights_path is None or not Path(weights_path).is_file():
        raise MetricModelError(
            f"Inception weights not found: {weights_path} (FID and IS need torch-fidelity's InceptionV3 weights "
            f"{INCEPTION_FILE}, or a safetensors copy, on disk; pass its path with --inception-weights; nothing is "
            "downloaded)")
    path = Path(weights_path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MetricModelError(f"{path}: not a readable Inception weights file ({exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MetricModelError(f"{path}: expected a state dict of tensors")
    from torchmetrics.image.fid import NoTrainInceptionV3

    # torch-fidelity unpickles the path it is given without weights_only: hand it a tensors-only file we wrote
    fd, tmp = tempfile.mkstemp(suffix=".pth")
    os.close(fd)
    try:
        torch.save(dict(state), tmp)
        try:
            net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(feature)],
                                     feature_extractor_weights_path=tmp)
        except RuntimeError as exc:
            raise MetricModelError(f"{path}: does not match torch-fidelity's InceptionV3 ({exc})") from exc
    finally:
        os.unlink(tmp)
    return _SelectFeature(net)


def _uint8_nchw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if t.ndim != 4:
        raise ValueError(f"images must be [N, H, W, 3] or [N, 3, H, W], got {tuple(t.shape)}")
    if t.shape[-1] == 3 and t.shape[1] != 3:
        t = t.permute(0, 3, 1, 2)
    if t.dtype != torch.uint8:
        raise ValueError(f"images must be uint8, got {t.dtype}")
    return t.contiguous()


def _batches(images: torch.Tensor, batch: int):
    for i in range(0, images.shape[0], batch):
        yield images[i : i + batch]


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (the FID formula), via eigenvalues of S1 S2."""
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    eig = np.linalg.eigvals(s1 @ s2)
    covmean_trace = np.sqrt(np.clip(eig.real, 0, None)).sum()
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * covmean_trace)


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    """FID between two feature sets [N, d] (the unbiased covariance, as torchmetrics/torch-fidelity)."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    return frechet_distance(real.mean(0), np.cov(real, rowvar=False), fake.mean(0), np.cov(fake, rowvar=False))


def fid_score(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, feature_extractor: nn.Module | None = None,
              weights_path: str | os.PathLike | None = None, batch: int = 32) -> float:
    """FID between two uint8 image sets with torchmetrics; Inception from ``weights_path`` unless a custom
    ``feature_extractor`` (uint8 [N, 3, H, W] -> [N, d]) is given."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    extractor = feature_extractor if feature_extractor is not None else load_inception(weights_path, "2048")
    real_t, fake_t = _uint8_nchw(real), _uint8_nchw(fake)
    if min(real_t.shape[0], fake_t.shape[0]) < 2:
        raise ValueError("FID needs at least 2 images per set")
    metric = FrechetInceptionDistance(feature=_SelectFeature(extractor), input_img_size=tuple(real_t.shape[1:]))
    with torch.no_grad():
        for b in _batches(real_t, batch):
            metric.update(b, real=True)
        for b in _batches(fake_t, batch):
            metric.update(b, real=False)
        return float(metric.compute())


def inception_score(images: np.ndarray | torch.Tensor, logits_extractor: nn.Module | None = None,
                    weights_path: str | os.PathLike | None = None, splits: int = 1, batch: int = 32
                    ) -> tuple[float, float]:
    """Inception Score (mean, std over ``splits``) with torchmetrics; logits from Inception (``weights_path``)
    or a custom ``logits_extractor`` (uint8 [N, 3, H, W] -> class logits [N, K])."""
    from torchmetrics.image.inception import InceptionScore

    extractor = logits_extractor if logits_extractor is not None else load_inception(weights_path, "logits_unbiased")
    imgs = _uint8_nchw(images)
    metric = InceptionScore(feature=_SelectFeature(extractor), splits=splits)
    with torch.no_grad():
        for b in _batches(imgs, batch):
            metric.update(b)
        mean, std = metric.compute()
    return float(mean), float(std) if math.isfinite(float(std)) else 0.0
