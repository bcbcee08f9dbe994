"""Stage 2 front end: ``accelerate launch training/train.py --config <stage-2 config> [--resume latest]``.

Reads the TOML config (see training/configs/stage2_sd15_example.toml / stage2_sdxl_example.toml), loads the
frozen models from local files (:mod:`training.models`), builds or reuses the stage-2 cache
(:mod:`training.stage2_cache`) and runs the in-process loop of :mod:`training.stage2_loop` (the losses are in
:mod:`training.stage2_model`, the leave-one-out sampling in :mod:`training.stage2_sampling`; experiments call them
directly).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bolid.adapter_io import load_adapter
from bolid.body_encoder_io import load_body_encoder
from bolid.dataset import DatasetConfig, dataset_config_from_dict
from bolid.diffusers_integration import adapter_config_for_unet, init_adapter_from_unet
from bolid.errors import BoLIDError
from bolid.faceid import copy_faceid_face_branch, faceid_config, read_ip_adapter_file
from bolid.safetensors_io import read_safetensors_metadata
from training.common import config_table
from training.lightning_branch import LightningConfig
from training.loop import make_accelerator
from training.models import BaseModelError, OpenClipFunctions, YoloPoseNet, load_base_model, make_encode_text
from training.stage2_cache import BucketConfig, load_stage2_cache, prepare_stage2_cache
from training.stage2_components import Stage2Components
from training.stage2_loop import Stage2TrainingConfig, train_stage2_loop
from training.stage2_model import LossConfig
from training.stage2_sampling import SamplingConfig, Stage2Data

logger = logging.getLogger("bolid")


class Stage2ConfigError(BoLIDError):
    """The stage-2 config is invalid."""


@dataclass(frozen=True)
class ModelPaths:
    """The ``[model]`` table: local files only. Empty strings mean "not used"."""

    pretrained: str
    body_encoder: str
    config_dir: str = ""
    unet_weights: str = ""
    family: str = "auto"
    prediction_type: str = ""
    face_model: str = ""
    face_provider: str = "auto"
    pose_model: str = ""
    pose_imgsz: int = 640
    clip_model: str = ""
    clip_weights: str = ""


@dataclass(frozen=True)
class AdapterSettings:
    """The ``[adapter]`` table (body_dim comes from the Body-ID encoder); ``init`` continues from a BoLID file.

    ``face_init``: an IP-Adapter FaceID file (.bin / .safetensors, non-Plus) whose weights become the face branch,
    which then stays frozen: stage 2 trains only the body branch (cheaper, and the community's face weights are
    kept bit for bit). The face token count comes from the file.
    """

    face_tokens: int = 4
    body_tokens: int = 4
    proj_mult: int = 2
    init: str = ""
    face_init: str = ""

    @property
    def frozen_branches(self) -> tuple[str, ...]:
        return ("face",) if self.face_init else ()


def _table(cls: type, raw: dict[str, Any], name: str) -> Any:
    return config_table(cls, raw, name, Stage2ConfigError)


PATH_KEYS = ("pretrained", "body_encoder", "config_dir", "unet_weights", "face_model", "pose_model", "clip_weights")


@dataclass(frozen=True)
class Stage2Config:
    output_dir: Path
    seed: int
    model: ModelPaths
    adapter: AdapterSettings
    dataset: DatasetConfig
    cache_dir: Path
    buckets: BucketConfig
    sampling: SamplingConfig
    loss: LossConfig
    training: Stage2TrainingConfig
    lightning: LightningConfig = LightningConfig()

    @classmethod
    def from_dict(cls, raw: dict[str, Any], base_dir: str | Path = ".") -> Stage2Config:
        base = Path(base_dir)
        allowed = {"stage", "output_dir", "seed", "model", "adapter", "dataset", "cache", "sampling", "loss",
                   "training", "lightning"}
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise Stage2ConfigError(f"stage-2 config has unknown top-level keys {unknown}; known: {sorted(allowed)}")
        for need in ("output_dir", "model", "dataset"):
            if need not in raw:
                raise Stage2ConfigError(f"a stage-2 config needs '{need}'")
        model_raw = dict(raw["model"])
        for key in PATH_KEYS:
            if model_raw.get(key):
                model_raw[key] = str((base / model_raw[key]).resolve())
        model = _table(ModelPaths, model_raw, "model")
        cache = dict(raw.get("cache", {}))
        cache_dir = (base / cache.pop("dir", str(Path(raw["output_dir"]) / "stage2_cache"))).resolve()
        adapter = dict(raw.get("adapter", {}))
        for key in ("init", "face_init"):
            if adapter.get(key):
                adapter[key] = str((base / adapter[key]).resolve())
        if adapter.get("init") and adapter.get("face_init"):
            raise Stage2ConfigError("[adapter] init and face_init exclude each other: init continues a BoLID adapter "
                                    "(its face branch included), face_init starts a new one from a FaceID file")
        seed = int(raw.get("seed", 0))
        sampling = {"seed": seed, **raw.get("sampling", {})}
        try:
            dataset = dataset_config_from_dict(raw["dataset"], base)
        except BoLIDError as exc:
            raise Stage2ConfigError(str(exc)) from exc
        return cls(output_dir=(base / raw["output_dir"]).resolve(), seed=seed, model=model,
                   adapter=_table(AdapterSettings, adapter, "adapter"), dataset=dataset, cache_dir=cache_dir,
                   buckets=_table(BucketConfig, cache, "cache"), sampling=_table(SamplingConfig, sampling, "sampling"),
                   loss=_table(LossConfig, dict(raw.get("loss", {})), "loss"),
                   training=_table(Stage2TrainingConfig, dict(raw.get("training", {})), "training"),
                   lightning=_table(LightningConfig, dict(raw.get("lightning", {})), "lightning"))


def _face_embedder(paths: ModelPaths):
    if not paths.face_model:
        logger.warning("BoLID stage 2: no [model] face_model: the face branch sees no face embeddings (zeros)")
        return None, "none"
    from bolid.face import FaceAnalyzer

    analyzer = FaceAnalyzer(paths.face_model, paths.face_provider)
    return analyzer.embed_one, Path(paths.face_model).name


def build(config: Stage2Config, device: torch.device | str = "cpu", prepare: bool = True):
    """(components, adapter, data) from a config: loads the frozen models and builds/reads the cache."""
    m = config.model
    base = load_base_model(m.pretrained, m.config_dir or None, m.unet_weights or None, m.family,
                           m.prediction_type or None)
    base.vae.to(device)
    encoder = load_body_encoder(m.body_encoder, device)[0] if Path(m.body_encoder).is_file() else None
    if encoder is None:
        raise BaseModelError(f"Body-ID encoder not found: {m.body_encoder} (train it with stage 1)")
    if prepare:
        # the text encoders only build the cache: it holds every caption's embedding (and the empty caption's,
        # which validation and text dropout use), so training never encodes text; they go back to the CPU after
        for module in base.text_encoders:
            module.to(device)
        face_fn, face_name = _face_embedder(m)
        prepare_stage2_cache(config.dataset, config.cache_dir, config.buckets, base.vae,
                             make_encode_text(base, device), encoder, face_fn,
                             {"base_model": base.source, "face": face_name}, device)
        for module in base.text_encoders:
            module.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    identities, text_cache = load_stage2_cache(config.cache_dir, base.family == "sdxl")
    pose_net = clip = None
    if config.loss.id_weight > 0:
        if not m.pose_model:
            raise Stage2ConfigError("[loss] id_weight > 0 needs [model] pose_model (a local YOLO pose .pt file)")
        pose_net = YoloPoseNet.from_file(m.pose_model, m.pose_imgsz)
    if config.loss.clip_weight > 0:
        if not (m.clip_model and m.clip_weights):
            raise Stage2ConfigError("[loss] clip_weight > 0 needs [model] clip_model and clip_weights (local file)")
        clip = OpenClipFunctions.from_file(m.clip_model, m.clip_weights)
    components = Stage2Components(unet=base.unet, noise_scheduler=base.noise_scheduler, vae=base.vae,
                                  encode_text=None, pose_net=pose_net,
                                  clip_image=clip.image if clip else None, clip_text=clip.text if clip else None,
                                  base_model=f"{base.family}:{base.source}")
    data = Stage2Data(identities, config.sampling, components, text_cache=text_cache)
    a = config.adapter
    if a.init:
        adapter = load_adapter(a.init)[0]
    else:
        torch.manual_seed(config.seed)
        faceid = read_ip_adapter_file(a.face_init) if a.face_init else None
        face_tokens = faceid_config(faceid, a.face_init)[0].face_tokens if faceid else a.face_tokens
        adapter_cfg = adapter_config_for_unet(base.unet, body_dim=encoder.latent_dim, face_tokens=face_tokens,
                                              body_tokens=a.body_tokens, proj_mult=a.proj_mult)
        adapter = init_adapter_from_unet(base.unet, adapter_cfg)
        if faceid is not None:
            ignored = copy_faceid_face_branch(adapter, faceid, a.face_init)
            logger.info("BoLID stage 2: face branch from %s (frozen, %d LoRA weights of the file not used)",
                        a.face_init, ignored)
    if adapter.config.body_dim != encoder.latent_dim:
        raise Stage2ConfigError(f"adapter body_dim {adapter.config.body_dim} != Body-ID encoder latent_dim "
                                f"{encoder.latent_dim}")
    return components, adapter, data


def run(raw_config: dict[str, Any], config_dir: Path, resume: str | None = None, prepare_only: bool = False
        ) -> dict[str, Any]:
    """Entry used by training/train.py for ``stage = 2`` configs."""
    config = Stage2Config.from_dict(raw_config, config_dir)
    tc = config.training
    out = config.output_dir
    accelerator = make_accelerator(tc.mixed_precision, out, tc.report_to, Stage2ConfigError, "BoLID stage 2",
                                   seed=config.seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    # the main process builds the cache; the others wait and read it
    if accelerator.is_main_process:
        components, adapter, data = build(config, accelerator.device, prepare=True)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        components, adapter, data = build(config, accelerator.device, prepare=False)
    if prepare_only:
        return {"prepared": str(config.cache_dir), **data.describe()}
    result = train_stage2_loop(components, adapter, data, tc, config.loss, output_dir=out, resume=resume,
                               seed=config.seed, accelerator=accelerator, freeze=config.adapter.frozen_branches,
                               lightning=config.lightning,
                               metadata={"model": {k: getattr(config.model, k) for k in ("pretrained",
                                                                                         "unet_weights")},
                                         # Apply BoLID Adapter refuses Body IDs of any other encoder
                                         "face_init": Path(config.adapter.face_init).name,
                                         "body_encoder_hash": read_safetensors_metadata(
                                             config.model.body_encoder).get("bolid_encoder_hash", "")})
    return {"step": result["step"], "losses": result["losses"], "export": [str(p) for p in result["export"]]}
