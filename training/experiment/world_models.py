"""The small models of the synthetic world (bolid.synthetic): base text-to-image model and pose model.

* :class:`CaptionEncoder`: a fixed-vocabulary caption encoder (word embedding + 2 transformer layers), the
  world's "text encoder"; an empty caption (all padding) is the unconditional input for CFG. Its vocabulary also
  holds the identity words (:data:`SKIN_WORDS`, :data:`HAIR_WORDS`, :data:`PROPORTION_WORDS`) that only
  pretraining captions use (:func:`described_caption`): like SD's text encoder, which knows "red hair" and "long
  legs", the base model then has a route from a token to a colour or a limb length that the BoLID body branch
  can reuse. The experiment's captions (:func:`bolid.synthetic.caption_for`) never contain them.
* :func:`make_base_unet`: a pixel-space diffusers ``UNet2DConditionModel`` at 32x32 with cross-attention, so the
  BoLID adapter attaches to it exactly as to SD1.5 (4 cross-attention layers, context dim 64).
* :class:`WorldPoseNet`: a small CNN keypoint regressor (heatmaps + soft-argmax, so it is differentiable in the
  image: usable for L_id) with a visibility/confidence head and caption-attribute heads (pose, view, clothing,
  background: the world's stand-in for CLIP-T, see training/experiment/README or the README's experiment section).

Weights are stored as fp16 safetensors with a JSON config in the metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bolid.synthetic import (
    BACKGROUNDS,
    BONE_RANGES,
    COLOURS,
    HAIR_COLOURS,
    POSES,
    SHIRTS,
    SKIN_TONES,
    TROUSERS,
    SyntheticIdentity,
    SyntheticPhoto,
    caption_vocabulary,
    render_photo,
    tokenize,
)

IMAGE_SIZE = 32
CONTEXT_DIM = 64
MAX_TOKENS = 32
# caption attributes the pose model reads back (the world's CLIP-T stand-in); the world is rendered in front
# view only (FIXED_ATTRIBUTES), so "view" is not among them
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "pose": POSES, "shirt": SHIRTS, "shirt_colour": tuple(COLOURS), "trousers": TROUSERS,
    "trousers_colour": tuple(COLOURS), "background": tuple(BACKGROUNDS),
}
FIXED_ATTRIBUTES: dict[str, str] = {"view": "front view"}
# identity traits the pose model reads back (appearance): class heads, and the build as two z-scores
IDENTITY_CLASSES: dict[str, int] = {"skin": len(SKIN_TONES), "hair": len(HAIR_COLOURS)}
BUILD_SLICE = slice(6, 8)  # limb width and waist width inside SyntheticIdentity.oracle_vector


# words only the base model's pretraining captions use (never the experiment's), one token each: a skin tone and a
# hair colour (SKIN_TONES / HAIR_COLOURS order), and for each proportion a word for the lower and the upper third of
# its range (the middle third is not named), as web captions say "long legs" or "broad shoulders"
SKIN_WORDS: tuple[str, ...] = ("fair-skin", "tan-skin", "brown-skin", "dark-skin")
HAIR_WORDS: tuple[str, ...] = ("black-hair", "brunette-hair", "blond-hair", "ginger-hair", "grey-hair")
PROPORTION_WORDS: dict[str, tuple[str, str]] = {
    "upper_arm": ("short-upper-arms", "long-upper-arms"), "forearm": ("short-forearms", "long-forearms"),
    "thigh": ("short-thighs", "long-thighs"), "shin": ("short-shins", "long-shins"),
    "shoulder_width": ("narrow-shoulders", "broad-shoulders"), "hip_width": ("narrow-hips", "wide-hips"),
}
IDENTITY_VOCABULARY: tuple[str, ...] = (*SKIN_WORDS, *HAIR_WORDS,
                                        *(word for pair in PROPORTION_WORDS.values() for word in pair))


def proportion_words(identity: SyntheticIdentity) -> list[str]:
    """The words for the person's proportions that lie in the lower or upper third of their range."""
    words = []
    for name, (low, high) in PROPORTION_WORDS.items():
        lo, hi = BONE_RANGES[name]
        position = (identity.bones[name] - lo) / (hi - lo)
        if position < 1 / 3:
            words.append(low)
        elif position > 2 / 3:
            words.append(high)
    return words


def described_caption(caption: str, identity: SyntheticIdentity, rng: np.random.Generator, probability: float,
                      plain: float = 0.0) -> str:
    """A pretraining caption that may also name the person's identity: "..., tan-skin ginger-hair long-thighs".
    With chance ``plain`` it is left as it is, so the base keeps knowing the plain captions the experiment uses;
    otherwise each trait (skin, hair, each proportion word) is named with chance ``probability``."""
    is_plain = rng.random() < plain
    traits = [SKIN_WORDS[identity.skin_index], HAIR_WORDS[identity.hair_index], *proportion_words(identity)]
    named = [word for word in traits if rng.random() < probability]  # one draw per trait, plain or not
    return caption if is_plain or not named else caption + ", " + " ".join(named)


def render_world_photo(identity: SyntheticIdentity, photo_seed: int) -> SyntheticPhoto:
    """One photo of the experiment's world (32 px, front view)."""
    return render_photo(identity, photo_seed, size=IMAGE_SIZE, attributes=FIXED_ATTRIBUTES)


# ----------------------------------------------------------------------------------------------- text


class CaptionEncoder(nn.Module):
    """Captions -> [B, MAX_TOKENS, CONTEXT_DIM] token states (unknown words map to <unk>)."""

    def __init__(self, dim: int = CONTEXT_DIM, layers: int = 2, max_tokens: int = MAX_TOKENS,
                 identity_words: bool = True) -> None:
        """``identity_words=False``: the vocabulary of the first pretraining stage, before the identity words."""
        super().__init__()
        words = set(caption_vocabulary()) | (set(IDENTITY_VOCABULARY) if identity_words else set())
        self.vocab = ["<pad>", "<unk>", *sorted(words)]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_tokens = max_tokens
        self.embed = nn.Embedding(len(self.vocab), dim)
        self.pos = nn.Parameter(torch.randn(max_tokens, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 4, dim * 2, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def token_ids(self, captions: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(captions), self.max_tokens, dtype=torch.long)
        for i, c in enumerate(captions):
            words = [self.index.get(w, 1) for w in tokenize(c)][: self.max_tokens]
            ids[i, : len(words)] = torch.tensor(words, dtype=torch.long)
        return ids

    def forward(self, captions: list[str]) -> torch.Tensor:
        ids = self.token_ids(captions).to(self.pos.device)
        h = self.embed(ids) + self.pos
        return self.norm(self.encoder(h))


# ----------------------------------------------------------------------------------------------- diffusion


# Cross-attention at 16x16 and 8x8 (7 layers), as SD1.5 has it at several scales: identity traits of a 32 px
# figure (head colours, limb lengths) live at 16x16, where an adapter that only reached 8x8 could not act
# (measured on the previous world). Attention at 32x32 would cost ~4x the whole model on the CPU.
UNET_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE, "in_channels": 3, "out_channels": 3, "layers_per_block": 1,
    "block_out_channels": (24, 48, 64), "norm_num_groups": 8, "cross_attention_dim": CONTEXT_DIM,
    "attention_head_dim": 8,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
}
SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
                                    "prediction_type": "v_prediction", "clip_sample": True}


def make_base_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def make_train_scheduler() -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_CONFIG)


def make_sample_scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


def to_model_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1]."""
    t = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float()
    return t / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


# ----------------------------------------------------------------------------------------------- pose


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.n1, self.n2 = nn.GroupNorm(8, cout), nn.GroupNorm(8, cout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.n1(self.conv1(x)))
        h = self.n2(self.conv2(h))
        return F.silu(h + self.skip(x))


class AppearanceReader(nn.Module):
    """Skin and hair class logits and build z-scores from what lies under the keypoints.

    Colours and full-resolution features are pooled under each keypoint's heatmap, and under the nose heatmap
    moved up by 2 and 3 pixels (the hair); with the global features they feed a small MLP."""

    def __init__(self, global_dim: int, feature_dim: int = 16, hidden: int = 96) -> None:
        super().__init__()
        places = 17 + 2
        self.mlp = nn.Sequential(nn.Linear(places * (3 + feature_dim) + global_dim, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in IDENTITY_CLASSES.items()})
        self.build = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor, heatmaps: torch.Tensor, features: torch.Tensor, pooled: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        hm = torch.cat([heatmaps, heatmaps[:, :1].roll(-2, dims=2), heatmaps[:, :1].roll(-3, dims=2)], 1)
        maps = torch.cat([x, features], 1)  # [B, 3 + F, H, W]
        pooled_at = torch.einsum("bkhw,bchw->bkc", hm, maps).flatten(1)
        h = self.mlp(torch.cat([pooled_at, pooled], 1))
        out = {k: head(h) for k, head in self.heads.items()}
        out["build"] = self.build(h)
        return out


class WorldPoseNet(nn.Module):
    """32x32 RGB in [-1, 1] -> keypoints [B, 17, 3] (x, y in output pixels; confidence) and attribute logits.

    A small U-Net gives 17 heatmaps at full resolution; a spatial soft-argmax turns them into coordinates, so
    the keypoints (and therefore :func:`bolid.proportions.body_proportions`) are differentiable in the image.
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.enc1 = _Block(3, w)
        self.enc2 = _Block(w, 2 * w)
        self.enc3 = _Block(2 * w, 4 * w, dilation=2)
        self.dec2 = _Block(4 * w + 2 * w, 2 * w)
        self.dec1 = _Block(2 * w + w, w)
        self.heat = nn.Conv2d(w, 17, 3, padding=1)
        self.log_temperature = nn.Parameter(torch.tensor(0.0))
        self.vis = nn.Linear(4 * w, 17)
        self.attr_heads = nn.ModuleDict({k: nn.Linear(4 * w, len(v)) for k, v in ATTRIBUTES.items()})
        # whether the figure is a well-formed person; and its appearance (skin, hair, build), read by a small
        # head from colours pooled under the keypoint heatmaps (a globally pooled feature dilutes a 3-px head)
        self.quality = nn.Linear(4 * w, 1)
        self.appearance = AppearanceReader(4 * w)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        e1 = self.enc1(x)  # 32
        e2 = self.enc2(F.avg_pool2d(e1, 2))  # 16
        e3 = self.enc3(F.avg_pool2d(e2, 2))  # 8
        d2 = self.dec2(torch.cat([F.interpolate(e3, scale_factor=2.0, mode="nearest"), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0, mode="nearest"), e1], 1))
        logits = self.heat(d1) * torch.exp(self.log_temperature)
        b, k, h, w = logits.shape
        prob = logits.flatten(2).softmax(-1).view(b, k, h, w)
        xs = torch.arange(w, device=x.device, dtype=prob.dtype) + 0.5
        ys = torch.arange(h, device=x.device, dtype=prob.dtype) + 0.5
        kx = (prob.sum(2) * xs).sum(-1)
        ky = (prob.sum(3) * ys).sum(-1)
        pooled = e3.mean((2, 3))
        conf = torch.sigmoid(self.vis(pooled))
        out = {"keypoints": torch.stack([kx, ky, conf], -1), "heatmaps": prob, "features": pooled}
        for name, head in self.attr_heads.items():
            out[name] = head(pooled)
        out.update(self.appearance(x, prob, d1, pooled))
        out["quality"] = self.quality(pooled)[:, 0]
        return out

    @torch.no_grad()
    def predict_attributes(self, x: torch.Tensor) -> list[dict[str, str]]:
        out = self.forward(x)
        idx = {k: out[k].argmax(-1).tolist() for k in ATTRIBUTES}
        return [{k: ATTRIBUTES[k][idx[k][i]] for k in ATTRIBUTES} for i in range(x.shape[0])]


# ----------------------------------------------------------------------------------------------- files


def save_module(module: nn.Module, path: str | Path, kind: str, extra: dict[str, Any] | None = None) -> None:
    from bolid.safetensors_io import atomic_save_safetensors

    state = {k: v.detach().to(torch.float16) for k, v in module.state_dict().items()}
    atomic_save_safetensors(state, path, {"kind": kind, "extra": json.dumps(extra or {}, sort_keys=True)})


def load_module(module: nn.Module, path: str | Path, kind: str, strict: bool = True) -> dict[str, Any]:
    """Load weights saved by :func:`save_module`; ``strict=False`` keeps the module's own values for keys the
    file lacks (used to add a head to a trained network)."""
    from bolid.errors import BoLIDError
    from bolid.safetensors_io import load_safetensors

    path = Path(path)
    if not path.is_file():
        raise BoLIDError(f"{path} not found: run `python -m training.experiment.pretrain` to make the world's "
                         "base model and pose model")
    tensors, meta = load_safetensors(path, BoLIDError)
    if meta.get("kind") != kind:
        raise BoLIDError(f"{path}: expected a {kind!r} file, found {meta.get('kind')!r}")
    ref = module.state_dict()
    module.load_state_dict({k: tensors[k].to(ref[k].dtype) for k in ref if strict or k in tensors}, strict=strict)
    return json.loads(meta.get("extra", "{}"))
