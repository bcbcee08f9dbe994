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

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .appearance import APPEARANCE_DIM
from .body_views import render_heatmaps, resize_views
from .errors import BoLIDError
from .keypoints import NUM_KEYPOINTS
from .proportions import NUM_PROPORTIONS, body_proportions, proportion_error

FORMAT_VERSION = 2  # 2: appearance head, standardised targets (target_mean/std), optional body prior tensors
LOGVAR_RANGE = (-10.0, 10.0)


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

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> BodyEncoderConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown body encoder option(s) {unknown}; known: {sorted(known)}")
        return cls(**raw)


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
        """Stage-1 objective on a batch from :func:`bolid.identity_cache.stage1_collate`.

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
        prop = self._target_error(self.proportion_head(z), batch["proportions"], 0, batch["proportion_confidence"])
        kl = kl_to_standard_normal(mu.float(), logvar.float()).mean()
        total = recon_weight * recon + proportion_weight * prop + kl_weight * kl
        out = {"recon": recon.detach(), "proportions": prop.detach(), "kl": kl.detach()}
        if self.appearance_head is not None:
            targets = torch.cat([batch["proportions"], batch["appearance"]], -1)
            app = self._target_error(self.appearance_head(z), targets, NUM_PROPORTIONS, batch["appearance_confidence"])
            total = total + appearance_weight * app
            out["appearance"] = app.detach()
        return {"loss": total, **out}

    def _target_error(self, pred: torch.Tensor, targets: torch.Tensor, offset: int, confidence: torch.Tensor
                      ) -> torch.Tensor:
        """A head's error against its slice of the standardised targets: THE confidence-weighted error."""
        target = self.standardise_targets(targets.float())[..., offset: offset + pred.shape[-1]]
        return proportion_error(pred.float(), target, confidence.float())
