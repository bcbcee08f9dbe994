"""Frozen models of stage 2 from local files only (nothing is ever fetched from a hub).

* :func:`load_base_model`: SD1.5 / SDXL (and SDXL-Lightning weights) from a diffusers folder or a single-file
  checkpoint (the latter needs a local diffusers-format config folder: model_index.json + the sub-folder
  configs and tokenizer files, no weights), plus an optional UNet weights file that replaces the UNet (e.g.
  ``sdxl_lightning_4step_unet.safetensors``).
* :func:`make_encode_text`: caption -> (prompt embeds, pooled) the way the SD1.5 / SDXL pipelines do it.
* :class:`YoloPoseNet`: the raw ultralytics YOLO pose network as a differentiable images -> keypoints function.
* :class:`OpenClipFunctions`: open_clip (including EVA-CLIP models) as differentiable image / cached text
  embedding functions.

Every missing file or folder is a :class:`BaseModelError` that names it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bolid.errors import BoLIDError

logger = logging.getLogger("bolid")

FAMILIES = ("sd15", "sdxl")


class BaseModelError(BoLIDError):
    """A base model, auxiliary model or one of their files is missing or unusable."""


@dataclass
class BaseModel:
    family: str
    unet: nn.Module
    vae: nn.Module
    text_encoders: list[nn.Module]
    tokenizers: list[Any]
    noise_scheduler: Any
    source: str


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise BaseModelError(f"{what} not found: {path} (models are loaded from local files only, nothing is "
                             "downloaded)")
    return path


def _family_of_folder(folder: Path) -> str:
    index = folder / "model_index.json"
    if index.is_file():
        name = json.loads(index.read_text()).get("_class_name", "")
        if "XL" in name:
            return "sdxl"
    return "sdxl" if (folder / "text_encoder_2").is_dir() else "sd15"


def load_base_model(path: str | os.PathLike, config_dir: str | os.PathLike | None = None,
                    unet_weights: str | os.PathLike | None = None, family: str = "auto",
                    prediction_type: str | None = None) -> BaseModel:
    """Load UNet, VAE, text encoder(s), tokenizer(s) and the DDPM noise scheduler from local files.

    ``path``: a diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/, + text_encoder_2/,
    tokenizer_2/ for SDXL) or a single-file checkpoint (.safetensors/.ckpt) with ``config_dir``. ``family``:
    "auto" (from the folder), "sd15" or "sdxl". ``prediction_type`` overrides the scheduler's (v-prediction models).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    path = _require(Path(path), "base model")
    if path.is_dir():
        fam = _family_of_folder(path) if family == "auto" else family
        subs = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
        if fam == "sdxl":
            subs += ["text_encoder_2", "tokenizer_2"]
        for sub in subs:
            _require(path / sub, f"{fam} component folder '{sub}'")
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
        encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True)]
        tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)]
        if fam == "sdxl":
            encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2",
                                                                        local_files_only=True))
            tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", local_files_only=True))
        scheduler_dir = path
    else:
        if config_dir is None:
            raise BaseModelError(f"{path} is a single-file checkpoint: set [model] config_dir to a local diffusers "
                                 "config folder (model_index.json plus unet/, vae/, text_encoder/, tokenizer/, "
                                 "scheduler/ configs; no weights needed)")
        config_dir = _require(Path(config_dir), "diffusers config folder (config_dir)")
        _require(config_dir / "model_index.json", "model_index.json in config_dir")
        fam = _family_of_folder(config_dir) if family == "auto" else family
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        cls = StableDiffusionXLPipeline if fam == "sdxl" else StableDiffusionPipeline
        extra = {} if fam == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
        pipe = cls.from_single_file(str(path), config=str(config_dir), local_files_only=True, **extra)
        unet, vae = pipe.unet, pipe.vae
        encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if fam == "sdxl" else [])
        tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if fam == "sdxl" else [])
        scheduler_dir = config_dir
    _require(scheduler_dir / "scheduler", "scheduler config folder 'scheduler'")
    scheduler = DDPMScheduler.from_pretrained(scheduler_dir, subfolder="scheduler", local_files_only=True)
    if prediction_type is not None:
        scheduler.register_to_config(prediction_type=prediction_type)
    if unet_weights is not None:
        load_unet_weights(unet, unet_weights, config_dir)
    source = path.name + (f" + {Path(unet_weights).name}" if unet_weights else "")
    for module in [unet, vae, *encoders]:
        module.requires_grad_(False).eval()
    return BaseModel(fam, unet, vae, encoders, tokenizers, scheduler, source)


def load_unet_weights(unet: nn.Module, path: str | os.PathLike, config_dir: str | os.PathLike | None = None) -> None:
    """Replace the UNet's weights with a diffusers-format UNet file (e.g. SDXL-Lightning's *_unet.safetensors)."""
    from safetensors.torch import load_file

    path = _require(Path(path), "UNet weights file (unet_weights)")
    if path.suffix.lower() != ".safetensors":
        raise BaseModelError(f"{path}: UNet weights must be a .safetensors file")
    state = load_file(str(path))
    reference = unet.state_dict()
    if set(state) == set(reference):
        unet.load_state_dict(state, strict=True)
        return
    if any(k.startswith("model.diffusion_model.") for k in state) and config_dir is not None:
        from diffusers import UNet2DConditionModel

        converted = UNet2DConditionModel.from_single_file(str(path), config=str(config_dir), subfolder="unet",
                                                          local_files_only=True)
        unet.load_state_dict(converted.state_dict(), strict=True)
        return
    missing = sorted(set(reference) - set(state))[:3]
    raise BaseModelError(f"{path}: not a diffusers UNet state dict for this model (missing e.g. {missing}); "
                         "an original-format UNet file also needs [model] config_dir")


def make_encode_text(base: BaseModel, device: torch.device | str = "cpu"):
    """A function captions -> (embeds [B, L, ctx], pooled [B, P] or None), as the diffusers pipelines compute it:
    SD1.5 the last hidden state; SDXL the two encoders' penultimate hidden states concatenated, and the second
    encoder's projected pooled output."""

    @torch.no_grad()
    def encode(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden, pooled = [], None
        for k, (enc, tok) in enumerate(zip(base.text_encoders, base.tokenizers, strict=True)):
            ids = tok(list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(device)
            if base.family == "sd15":
                hidden.append(enc(ids)[0])
                continue
            out = enc(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            if k == len(base.text_encoders) - 1:
                pooled = out[0]
        return torch.cat(hidden, dim=-1), pooled

    return encode


# ----------------------------------------------------------------------------------------------- pose network


class YoloPoseNet(nn.Module):
    """Differentiable keypoints from the raw ultralytics YOLO pose network (not ``predict()``).

    images [B, 3, H, W] in 0..1 are resized (longest side ``imgsz``, bilinear) and padded to a multiple of 32; per
    image the anchor with the highest person score gives the 17 keypoints, mapped back to the input's pixels.
    Returns (xy [B, 17, 2], confidence [B, 17]). Gradients reach the images through the chosen anchor's outputs.
    """

    def __init__(self, model: nn.Module, imgsz: int = 640, person_class: int = 0) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.imgsz = int(imgsz)
        self.person_class = int(person_class)

    @classmethod
    def from_file(cls, path: str | os.PathLike, imgsz: int = 640) -> YoloPoseNet:
        """A YOLO pose .pt checkpoint (or a model .yaml for random weights, tests only)."""
        from bolid.pose import import_ultralytics, note_pickle_checkpoint

        path = Path(path)
        if path.suffix != ".yaml":
            _require(path, "YOLO pose checkpoint (pose_model)")
        YOLO = import_ultralytics().YOLO  # noqa: N806 - the library's class name
        note_pickle_checkpoint(path)
        yolo = YOLO(str(path))
        if yolo.task != "pose":
            raise BaseModelError(f"{path.name} is a YOLO {yolo.task!r} model, not a pose model")
        return cls(yolo.model.float(), imgsz)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = images.shape
        scale = self.imgsz / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        ref = next(self.model.parameters())
        x = F.interpolate(images.to(ref.dtype), size=(nh, nw), mode="bilinear", align_corners=False)
        ph, pw = (-nh) % 32, (-nw) % 32
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), value=114 / 255)
        y = self.model(x)
        y = y[0] if isinstance(y, (list, tuple)) else y
        nk = 17 * 3
        nc = y.shape[1] - 4 - nk
        if nc < 1:
            raise BaseModelError(f"pose network output has {y.shape[1]} channels; expected 4 + classes + 51")
        best = y[:, 4 + self.person_class].argmax(-1)
        kpt = y[:, 4 + nc:, :].gather(2, best.view(b, 1, 1).expand(b, nk, 1)).squeeze(-1).view(b, 17, 3)
        sx, sy = nw / w, nh / h
        xy = torch.stack([kpt[..., 0] / sx, kpt[..., 1] / sy], -1)
        return xy, kpt[..., 2]


# ----------------------------------------------------------------------------------------------- CLIP


class OpenClipFunctions:
    """open_clip image/text embeddings: ``image(images 0..1 [B,3,H,W])`` is differentiable (resize, centre crop,
    normalise in torch), ``text(captions)`` is not (its results are cached by the trainer)."""

    def __init__(self, model: nn.Module, tokenizer: Any, mean: tuple[float, ...], std: tuple[float, ...],
                 image_size: int) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.image_size = int(image_size)

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer: Any) -> OpenClipFunctions:
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        visual = model.visual
        size = visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        mean = getattr(visual, "image_mean", None) or OPENAI_DATASET_MEAN
        std = getattr(visual, "image_std", None) or OPENAI_DATASET_STD
        return cls(model, tokenizer, tuple(mean), tuple(std), int(size))

    @classmethod
    def from_file(cls, model_name: str, weights: str | os.PathLike) -> OpenClipFunctions:
        """An open_clip architecture name (e.g. "ViT-L-14", "EVA02-L-14") and a local weights file."""
        import open_clip

        weights = _require(Path(weights), "CLIP weights file (clip_weights)")
        if model_name not in open_clip.list_models():
            raise BaseModelError(f"unknown open_clip model {model_name!r}; see open_clip.list_models()")
        model = open_clip.create_model(model_name, pretrained=str(weights))
        return cls.from_model(model, open_clip.get_tokenizer(model_name))

    def image(self, images: torch.Tensor) -> torch.Tensor:
        ref = next(self.model.parameters())
        s = self.image_size
        h, w = images.shape[-2:]
        scale = s / min(h, w)
        nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
        x = F.interpolate(images.to(ref.dtype), size=(nh, nw), mode="bicubic", align_corners=False)
        top, left = (nh - s) // 2, (nw - s) // 2
        x = x[..., top:top + s, left:left + s]
        x = (x - self.mean.to(x)) / self.std.to(x)
        return self.model.encode_image(x)

    @torch.no_grad()
    def text(self, captions: list[str]) -> torch.Tensor:
        ref = next(self.model.parameters())
        return self.model.encode_text(self.tokenizer(list(captions)).to(ref.device))

    def to(self, device: Any = None, dtype: Any = None) -> OpenClipFunctions:
        self.model.to(device=device, dtype=dtype)
        return self
