"""The Body-ID encoder (stage 1): a multi-view VAE whose aggregated latent c_body is a person's body identity.

Per view, the encoder sees the square person crop (plus Gaussian heatmaps of its 17 keypoints drawn on it) and
the keypoints themselves, and outputs a Gaussian (mu_i, logvar_i). Views are fused by a confidence-weighted
product of Gaussians (see :func:`aggregate_views`). The decoder exists only to train the encoder: given c_body
and a *held-out* view's keypoints it must redraw that view's low-res crop, and from c_body alone it must predict
the identity's proportion vector (:mod:`bolid.proportions`). Because the decoder already gets the held-out pose,
pose carries no reward in c_body; what helps is what stays the same across views (body shape, proportions,
build). KL to N(0, I) keeps the prior sampleable, so bodies can be drawn and identities interpolated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .appearance import APPEARANCE_DIM
from .errors import BoLIDError, reading
from .identity import BodyID
from .keypoints import NUM_KEYPOINTS, PersonPose
from .proportions import NUM_PROPORTIONS, aggregate_proportions, body_proportions
from .safetensors_io import atomic_save_safetensors, check_state_dict, load_safetensors, read_safetensors_metadata

logger = logging.getLogger("bolid")

FORMAT_VERSION = 2  # 2: appearance head, standardised targets (target_mean/std), optional body prior tensors
READABLE_FORMAT_VERSIONS = (1, 2)
BODY_PRIOR_KEYS = ("body_prior.mean", "body_prior.scale_tril")
BODY_ENCODER_FILE_KIND = "bolid_body_encoder"
LOGVAR_RANGE = (-10.0, 10.0)


class BodyEncoderFileError(BoLIDError):
    """A Body-ID encoder file cannot be read or does not hold a valid encoder."""


class BodyEncodeError(BoLIDError):
    """No usable view: no image had a person with enough keypoint confidence, or the input was empty."""


@dataclass(frozen=True)
class BodyEncoderConfig:
    """Dimensions of the Body-ID VAE; stored in the exported file's metadata.

    latent_dim: size d of c_body (the adapter's ``body_dim``). crop_size: side of the square person crop the
    encoder sees. decoder_size: side of the low-res crop the decoder redraws. crop_margin: the crop side is
    ``max(box w, box h) * crop_margin``. prior_expert: include N(0, I) as one more expert in the product of
    Gaussians (see :func:`aggregate_views`). appearance_dim: size of the appearance target
    (:mod:`bolid.appearance`; 0 = no appearance head, as in format-1 files). target_mean / target_std: the
    population mean and spread over people of the identity targets (proportions, then appearance), set by
    stage 1 from its data; the heads predict standardised values, so each target is O(1) whatever its units and
    no hand-set loss weight is needed. Empty = no standardisation (format-1 files).
    """

    latent_dim: int = 128
    crop_size: int = 64
    decoder_size: int = 32
    width: int = 32
    hidden: int = 256
    heatmap_sigma: float = 0.03
    crop_margin: float = 1.15
    prior_expert: bool = True
    appearance_dim: int = APPEARANCE_DIM
    target_mean: tuple[float, ...] = ()
    target_std: tuple[float, ...] = ()
    format_version: int = FORMAT_VERSION
    training: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("latent_dim", "crop_size", "decoder_size", "width", "hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"BodyEncoderConfig.{name} must be a positive integer, got {value!r}")
        if self.crop_size < 8 or self.crop_size & (self.crop_size - 1):
            raise ValueError(f"BodyEncoderConfig.crop_size must be a power of two >= 8, got {self.crop_size}")
        if not (0.0 < self.heatmap_sigma < 1.0) or self.crop_margin < 1.0:
            raise ValueError("BodyEncoderConfig: heatmap_sigma must be in (0, 1) and crop_margin >= 1")
        if self.appearance_dim not in (0, APPEARANCE_DIM):
            raise ValueError(f"BodyEncoderConfig.appearance_dim must be 0 or {APPEARANCE_DIM}, got {self.appearance_dim}")
        n_targets = NUM_PROPORTIONS + self.appearance_dim
        object.__setattr__(self, "target_mean", tuple(float(v) for v in self.target_mean))
        object.__setattr__(self, "target_std", tuple(float(v) for v in self.target_std))
        for name in ("target_mean", "target_std"):
            if len(getattr(self, name)) not in (0, n_targets):
                raise ValueError(f"BodyEncoderConfig.{name} must have 0 or {n_targets} values")
        if any(not v > 0 or not math.isfinite(v) for v in self.target_std):
            raise ValueError("BodyEncoderConfig.target_std must be finite and positive")
    def architecture(self) -> dict[str, Any]:
        """The fields that define the weights (``training`` is provenance only)."""
        out = asdict(self)
        out.pop("training")
        return out

    def to_metadata(self) -> dict[str, str]:
        return {"bolid_kind": BODY_ENCODER_FILE_KIND, "bolid_format_version": str(self.format_version),
                "bolid_config": json.dumps(asdict(self), sort_keys=True)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> BodyEncoderConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown body encoder option(s) {unknown}; known: {sorted(known)}")
        return cls(**raw)

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], source: str) -> BodyEncoderConfig:
        kind = metadata.get("bolid_kind")
        if kind != BODY_ENCODER_FILE_KIND:
            hint = " (this is a BoLID adapter: use Load Adapter (BoLID))" if kind == "bolid_adapter" else ""
            raise BodyEncoderFileError(f"{source}: not a BoLID Body-ID encoder (metadata bolid_kind={kind!r}){hint}; "
                                       "encoders are .safetensors files exported by BoLID's stage-1 training")
        try:
            version = int(metadata.get("bolid_format_version", ""))
        except ValueError as exc:
            raise BodyEncoderFileError(f"{source}: missing or invalid bolid_format_version") from exc
        if version not in READABLE_FORMAT_VERSIONS:
            raise BodyEncoderFileError(f"{source}: body encoder format version {version} is not supported "
                                       f"(this BoLID reads {READABLE_FORMAT_VERSIONS}); update the node pack or "
                                       "re-export")
        try:
            raw = json.loads(metadata["bolid_config"])
            if version == 1:  # before the appearance head and standardised targets
                raw = {**raw, "appearance_dim": 0, "format_version": FORMAT_VERSION}
            return cls.from_dict(raw)
        except (KeyError, TypeError, ValueError) as exc:
            raise BodyEncoderFileError(f"{source}: invalid bolid_config metadata ({exc})") from exc


# ----------------------------------------------------------------------------------------------- inputs


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


# ----------------------------------------------------------------------------------------------- model


def _norm(channels: int) -> nn.GroupNorm:
    groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class ViewEncoder(nn.Module):
    """One view -> (mu_i, logvar_i): a CNN over crop + keypoint heatmaps, fused with an MLP over the keypoints."""

    def __init__(self, config: BodyEncoderConfig) -> None:
        super().__init__()
        self.config = config
        w, hid = config.width, config.hidden
        layers: list[nn.Module] = []
        channels, size = 3 + NUM_KEYPOINTS, config.crop_size
        i = 0
        while size > 4:
            out = w * min(2 ** i, 8)
            layers += [nn.Conv2d(channels, out, 4, stride=2, padding=1), _norm(out), nn.SiLU()]
            channels, size, i = out, size // 2, i + 1
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()]
        self.cnn = nn.Sequential(*layers)
        kp_in = NUM_KEYPOINTS * 3 + 2 * NUM_PROPORTIONS
        self.kp_mlp = nn.Sequential(nn.Linear(kp_in, hid), nn.SiLU(), nn.Linear(hid, hid), nn.SiLU())
        self.head = nn.Sequential(nn.Linear(channels * 4 + hid, hid), nn.SiLU(), nn.Linear(hid, 2 * config.latent_dim))

    def forward(self, crops: torch.Tensor, keypoints: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        heat = render_heatmaps(keypoints, cfg.crop_size, cfg.heatmap_sigma)
        x = torch.cat([crops * 2.0 - 1.0, heat], 1)
        conf = keypoints[..., 2:3]
        props, prop_conf = body_proportions(keypoints)
        kp_feat = torch.cat([(keypoints[..., :2] * conf).flatten(1), conf.flatten(1), props * prop_conf, prop_conf], 1)
        h = torch.cat([self.cnn(x), self.kp_mlp(kp_feat)], 1)
        mu, logvar = self.head(h).chunk(2, dim=1)
        return mu, logvar.clamp(*LOGVAR_RANGE)


class PoseConditionedDecoder(nn.Module):
    """(c_body, target keypoints) -> the target view's low-res crop in [-1, 1].

    The pose enters spatially (heatmaps + a coordinate grid), c_body through FiLM on every block, so the only
    way to draw the right limb widths, silhouette and colours is to read them from c_body.
    """

    def __init__(self, config: BodyEncoderConfig) -> None:
        super().__init__()
        self.config = config
        c = config.width
        self.stem = nn.Conv2d(NUM_KEYPOINTS + 2, c, 3, padding=1)
        self.dilations = (1, 2, 4, 1)
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=d, dilation=d) for d in self.dilations)
        self.norms = nn.ModuleList(nn.GroupNorm(_norm(c).num_groups, c, affine=False) for _ in self.dilations)
        self.film = nn.Linear(config.latent_dim, 2 * c * len(self.dilations))
        self.out = nn.Conv2d(c, 3, 1)

    def forward(self, z: torch.Tensor, keypoints: torch.Tensor) -> torch.Tensor:
        r = self.config.decoder_size
        heat = render_heatmaps(keypoints, r, max(self.config.heatmap_sigma, 0.5 / r))
        centres = (torch.arange(r, device=z.device, dtype=z.dtype) + 0.5) / r * 2 - 1
        gy, gx = torch.meshgrid(centres, centres, indexing="ij")
        grid = torch.stack([gx, gy]).expand(z.shape[0], 2, r, r)
        h = self.stem(torch.cat([heat, grid], 1))
        film = self.film(z).view(z.shape[0], len(self.dilations), 2, -1, 1, 1)
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            y = norm(conv(h)) * (1 + film[:, i, 0]) + film[:, i, 1]
            h = h + F.silu(y)
        return torch.tanh(self.out(h))


def aggregate_views(mu: torch.Tensor, logvar: torch.Tensor, weights: torch.Tensor,
                    prior_expert: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence-weighted product of Gaussians over the view axis (-2): [..., V, d] -> [..., d].

    precision = p0 + sum_i w_i / var_i,   mu = (sum_i w_i mu_i / var_i) / precision,
    with p0 = 1 (the prior N(0, I) as one more expert, as in the multimodal VAE of Wu & Goodman, 2018) or 0.
    Why the prior expert: it is the exact posterior when each view contributes a likelihood factor, it keeps the
    result defined (the prior) for a single weak view instead of dividing by a near-zero precision, and training
    then sees the same formula as inference. Properties: a view with w_i = 0 contributes exactly nothing (it is
    masked, so even NaN features of padding cannot leak), the order of views does not matter (a sum), and each
    extra view with w_i > 0 strictly raises the precision (a tighter posterior).
    """
    # float32 inside: under fp16 autocast w / var_i * mu_i overflows (logvar -9, mu 3.5, three views -> inf)
    out_dtype = mu.dtype
    mu, logvar = mu.float(), logvar.float()
    w = weights.float().clamp_min(0.0).unsqueeze(-1)
    active = w > 0
    inv_var = torch.exp(-logvar)
    prec_terms = torch.where(active, w * inv_var, torch.zeros_like(inv_var))
    mean_terms = torch.where(active, w * inv_var * mu, torch.zeros_like(mu))
    precision = prec_terms.sum(-2)
    if prior_expert:
        precision = precision + 1.0
    precision = precision.clamp_min(1e-8)
    return (mean_terms.sum(-2) / precision).to(out_dtype), (-torch.log(precision)).to(out_dtype)


def fit_body_prior(means: torch.Tensor, ridge: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """The empirical distribution of posterior means [N, d] as (mean, Cholesky factor of the covariance)."""
    x = means.double()
    mean = x.mean(0)
    cov = torch.cov(x.T) if x.shape[0] > 1 else torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    cov = cov + ridge * torch.eye(x.shape[1], dtype=torch.float64)
    return mean.float(), torch.linalg.cholesky(cov).float()


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over the last axis."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


class BodyEncoder(nn.Module):
    """The Body-ID VAE. Inference uses :meth:`encode`; :meth:`losses` is the stage-1 training objective."""

    def __init__(self, config: BodyEncoderConfig | None = None) -> None:
        super().__init__()
        self.config = config or BodyEncoderConfig()
        self.view_encoder = ViewEncoder(self.config)
        self.decoder = PoseConditionedDecoder(self.config)
        hid = self.config.hidden
        self.proportion_head = nn.Sequential(nn.Linear(self.config.latent_dim, hid), nn.SiLU(),
                                             nn.Linear(hid, NUM_PROPORTIONS))
        self.appearance_head = (nn.Sequential(nn.Linear(self.config.latent_dim, hid), nn.SiLU(),
                                              nn.Linear(hid, self.config.appearance_dim))
                                if self.config.appearance_dim else None)
        # the distribution of the training identities' posterior means (what stage 2 conditioned on), stored
        # with the encoder by stage 1; Sample Body ID (bolid.body_id_io.sample_body_id) draws from it.
        # None: unknown (then the prior N(0, I)).
        self.body_prior: tuple[torch.Tensor, torch.Tensor] | None = None
        # the side of the stored views it was trained on (the dataset's crop_size): inference cuts views at this
        # size too, so the network sees the same pixels (see person_view); recorded in the exported file
        self.view_size = self.config.crop_size

    def _target_stats(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        n = NUM_PROPORTIONS + self.config.appearance_dim
        if not self.config.target_mean:
            return torch.zeros(n, device=device, dtype=dtype), torch.ones(n, device=device, dtype=dtype)
        return (torch.tensor(self.config.target_mean, device=device, dtype=dtype),
                torch.tensor(self.config.target_std, device=device, dtype=dtype))

    def standardise_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Identity targets [..., 6 (+12)] -> standardised units (population mean 0, spread 1 per value)."""
        mean, std = self._target_stats(targets.device, targets.dtype)
        return (targets - mean[: targets.shape[-1]]) / std[: targets.shape[-1]]
    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def encode_views(self, crops: torch.Tensor, keypoints: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """crops [N, 3, S, S] float 0..1 (any S: resized to crop_size), keypoints [N, 17, 3] in crop units."""
        return self.view_encoder(resize_views(crops, self.config.crop_size), keypoints)

    def encode(self, crops: torch.Tensor, keypoints: torch.Tensor, weights: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Aggregated posterior of a batch of view sets: crops [B, V, 3, S, S], keypoints [B, V, 17, 3],
        weights [B, V] (0 = padding / unused view) -> (mu [B, d], logvar [B, d])."""
        b, v = crops.shape[:2]
        mu, logvar = self.encode_views(crops.flatten(0, 1), keypoints.flatten(0, 1))
        mu, logvar = mu.view(b, v, -1), logvar.view(b, v, -1)
        return aggregate_views(mu, logvar, weights, self.config.prior_expert)

    def decode(self, z: torch.Tensor, target_keypoints: torch.Tensor) -> torch.Tensor:
        return self.decoder(z, target_keypoints)

    def predict_proportions(self, z: torch.Tensor) -> torch.Tensor:
        """The identity's proportions (torso units) predicted from c_body."""
        mean, std = self._target_stats(z.device, z.dtype)
        return self.proportion_head(z) * std[:NUM_PROPORTIONS] + mean[:NUM_PROPORTIONS]

    def predict_appearance(self, z: torch.Tensor) -> torch.Tensor:
        """The identity's appearance descriptor (:mod:`bolid.appearance`, RGB 0..1) predicted from c_body."""
        if self.appearance_head is None:
            raise BoLIDError("this Body-ID encoder has no appearance head (format 1); re-train stage 1")
        mean, std = self._target_stats(z.device, z.dtype)
        return self.appearance_head(z) * std[NUM_PROPORTIONS:] + mean[NUM_PROPORTIONS:]

    def forward(self, batch: dict[str, torch.Tensor], **loss_options: Any) -> dict[str, torch.Tensor]:
        """The training objective (:meth:`losses`): calling the module lets DDP/accelerate wrap it."""
        return self.losses(batch, **loss_options)

    def losses(self, batch: dict[str, torch.Tensor], kl_weight: float = 1e-3, recon_weight: float = 1.0,
               proportion_weight: float = 1.0, appearance_weight: float = 1.0,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Stage-1 objective on a batch from :func:`bolid.dataset.stage1_collate`.

        The reparameterisation noise comes from ``generator`` when given (reproducible, resumable training).

        Keys used: context_crops [B,V,3,S,S], context_keypoints [B,V,17,3], context_weights [B,V],
        target_crop [B,3,S,S], target_keypoints [B,17,3], proportions [B,6], proportion_confidence [B,6], and
        with an appearance head appearance [B,12], appearance_confidence [B,12]. Proportion and appearance errors
        are measured in standardised units (``config.target_mean/std``).
        """
        mu, logvar = self.encode(batch["context_crops"], batch["context_keypoints"], batch["context_weights"])
        noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + noise * torch.exp(0.5 * logvar)
        r = self.config.decoder_size
        target = F.interpolate(batch["target_crop"], size=(r, r), mode="bilinear", antialias=True,
                               align_corners=False) * 2.0 - 1.0
        recon = F.mse_loss(self.decode(z, batch["target_keypoints"]).float(), target.float())
        def weighted_error(pred: torch.Tensor, target: torch.Tensor, conf: torch.Tensor) -> torch.Tensor:
            return ((pred.float() - self.standardise_targets(target.float())[..., offset: offset + pred.shape[-1]])
                    ** 2 * conf.float()).sum() / conf.float().sum().clamp_min(1e-6)

        offset = 0
        prop = weighted_error(self.proportion_head(z), batch["proportions"], batch["proportion_confidence"])
        kl = kl_to_standard_normal(mu.float(), logvar.float()).mean()
        total = recon_weight * recon + proportion_weight * prop + kl_weight * kl
        out = {"recon": recon.detach(), "proportions": prop.detach(), "kl": kl.detach()}
        if self.appearance_head is not None:
            offset = NUM_PROPORTIONS
            targets = torch.cat([batch["proportions"], batch["appearance"]], -1)
            app = weighted_error(self.appearance_head(z), targets, batch["appearance_confidence"])
            total = total + appearance_weight * app
            out["appearance"] = app.detach()
        return {"loss": total, **out}


# ----------------------------------------------------------------------------------------------- files


def encoder_hash(model: BodyEncoder) -> str:
    """A short content hash of the architecture and weights: identities remember which encoder made them."""
    h = hashlib.sha256(json.dumps(model.config.architecture(), sort_keys=True).encode())
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def save_body_encoder(model: BodyEncoder, path: str | os.PathLike,
                      extra_metadata: dict[str, str] | None = None) -> str:
    """Write the VAE (fp32) with its config and hash in the metadata, atomically; returns the hash."""
    model_hash = encoder_hash(model)
    metadata = {**model.config.to_metadata(), "bolid_encoder_hash": model_hash,
                "bolid_view_size": str(int(model.view_size)), **(extra_metadata or {})}
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    if model.body_prior is not None:
        state.update({k: v.detach().to("cpu", torch.float32).contiguous()
                      for k, v in zip(BODY_PRIOR_KEYS, model.body_prior, strict=True)})
    atomic_save_safetensors(state, path, metadata)
    return model_hash


def read_body_encoder_config(path: str | os.PathLike) -> BodyEncoderConfig:
    """The config of an encoder file, checked without reading any tensor."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise BodyEncoderFileError(f"{path}: Body-ID encoders are .safetensors files only (pickle is not loaded)")
    metadata = read_safetensors_metadata(path, BodyEncoderFileError)
    with reading(path, BodyEncoderFileError, "Body-ID encoder"):
        return BodyEncoderConfig.from_metadata(metadata, str(path))


def load_body_encoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> BodyEncoder:
    """Load and validate an encoder file: kind, version, config, key set, shapes, finiteness and hash."""
    return load_body_encoder_with_hash(path, device)[0]


def load_body_encoder_with_hash(path: str | os.PathLike,
                                device: str | torch.device = "cpu") -> tuple[BodyEncoder, str]:
    """load_body_encoder, also returning ``encoder_hash`` of the loaded weights (computed once, here)."""
    path = Path(path)
    config = read_body_encoder_config(path)
    tensors, metadata = load_safetensors(path, BodyEncoderFileError)
    with reading(path, BodyEncoderFileError, "Body-ID encoder"):
        prior = [tensors.pop(k, None) for k in BODY_PRIOR_KEYS]
        if all(t is not None for t in prior):
            d = config.latent_dim
            if tuple(prior[0].shape) != (d,) or tuple(prior[1].shape) != (d, d) or not all(
                    bool(torch.isfinite(t).all()) for t in prior):
                raise BodyEncoderFileError(f"{path}: the stored body distribution (body_prior.*) does not match "
                                           f"the latent size {d} or is not finite; re-export the encoder")
        elif any(t is not None for t in prior):
            raise BodyEncoderFileError(f"{path}: only one of {BODY_PRIOR_KEYS} is present; re-export the encoder")
        with torch.device("meta"):  # the declared layout, checked before any real allocation
            reference = BodyEncoder(config).state_dict()
        check_state_dict(tensors, reference, str(path), BodyEncoderFileError, "its declared encoder config")
        model = BodyEncoder(config)
        model.load_state_dict(tensors, strict=True)
        if prior[0] is not None:
            model.body_prior = (prior[0].float(), prior[1].float())
        digest = encoder_hash(model)
    stored = metadata.get("bolid_encoder_hash")
    if stored and stored != digest:
        raise BodyEncoderFileError(f"{path}: the weights do not match the hash stored in the file ({stored}); "
                                   "the file was modified or damaged, re-export it")
    model.view_size = _stored_view_size(metadata, config)
    model.requires_grad_(False).eval()
    return model.to(device), digest


def _stored_view_size(metadata: dict[str, str], config: BodyEncoderConfig) -> int:
    """The training views' side: recorded by save_body_encoder; older stage-1 exports name it in their training
    record (the dataset's crop_size); else the encoder's own input size."""
    try:
        if "bolid_view_size" in metadata:
            return int(metadata["bolid_view_size"])
        return int(json.loads(metadata["bolid_training"])["dataset"]["crop_size"])
    except (KeyError, TypeError, ValueError):
        return config.crop_size


# ----------------------------------------------------------------------------------------------- pose interface


class PoseRunner(Protocol):
    """What BoLID needs from a pose model: RGB uint8 HxWx3 images -> detected people per image.

    Any object with one of these methods works (checked in this order): ``detect_all(images)`` returning a list
    of lists of PersonPose; ``detect(images)`` or ``__call__(images)`` returning per image a PersonPose, None,
    or a list of PersonPose.
    """

    def __call__(self, images: list[np.ndarray]) -> list[Any]: ...


def detect_people(runner: Any, images: Sequence[np.ndarray]) -> list[list[PersonPose]]:
    """Run any supported pose runner on RGB uint8 images; every image gets a (possibly empty) list of people."""
    images = list(images)
    if not images:
        return []
    for name in ("detect_all", "detect_batch", "detect", "__call__"):
        fn = getattr(runner, name, None)
        if callable(fn):
            break
    else:
        raise TypeError(f"{type(runner).__name__} is not a pose runner (needs detect_all/detect/__call__)")
    results = fn(images)
    if len(results) != len(images):
        raise BoLIDError(f"the pose runner returned {len(results)} results for {len(images)} images")
    out: list[list[PersonPose]] = []
    for r in results:
        if r is None:
            out.append([])
        elif hasattr(r, "keypoints") and hasattr(r, "box"):  # one PersonPose (duck-typed: the pack may be
            out.append([r])                                 # imported under two names in one process)
        else:
            out.append([p for p in r if p is not None])
    return out


# ----------------------------------------------------------------------------------------------- inference


NO_PERSON = "no person detected"


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
    ``model_hash`` is ``encoder_hash(encoder)`` when the caller already has it (e.g. from
    load_body_encoder_with_hash); otherwise it is computed here. ``skip_reasons[i]``, when given, says why the
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
