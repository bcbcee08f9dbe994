"""Stage 1: train the Body-ID VAE on identity-grouped photos with accelerate.

Runs unchanged on CPU, one GPU or several (``accelerate launch``): the batch content is a pure function of
(seed, sample index) and the reparameterisation noise of (seed, step, micro-batch index in the global batch), so a
run resumed from a checkpoint follows the uninterrupted run's trajectory, and N processes follow one process that
accumulates N times as many micro-batches.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from bolid.body_encoder import BodyEncoder, BodyEncoderConfig, fit_body_prior
from bolid.body_encoder_io import save_body_encoder
from bolid.dataset import DatasetCacheError, config_summary, dataset_config_from_dict
from bolid.dataset_prepare import prepare_dataset
from bolid.errors import BoLIDError
from bolid.identity_cache import (
    IdentityCache,
    Stage1Dataset,
    identity_target_statistics,
    load_identity_caches,
    stage1_collate,
)
from training.captions import CaptionConfig, caption_config_from_dict, caption_dataset
from training.common import config_table, noise_generator
from training.loop import LoopHooks, TrainingLoop, check_loop_settings, make_accelerator

logger = logging.getLogger("bolid")

class TrainingConfigError(BoLIDError):
    """The training config is invalid."""


@dataclass(frozen=True)
class Stage1TrainingConfig:
    """The ``[training]`` table of a stage-1 config (see training/configs/stage1_example.toml)."""

    max_steps: int = 20000
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 500
    lr_schedule: str = "cosine"  # "cosine" | "constant" (after the linear warm-up)
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    max_grad_norm: float = 1.0
    kl_weight: float = 1e-3
    kl_warmup_steps: int = 1000
    recon_weight: float = 1.0
    proportion_weight: float = 1.0  # targets are standardised over people (BodyEncoderConfig), so 1 is O(1)
    appearance_weight: float = 1.0
    checkpointing_steps: int = 1000
    checkpoints_total_limit: int = 3
    log_every: int = 10
    num_workers: int = 2
    report_to: str = "tensorboard"  # "tensorboard" | "none"
    export_name: str = "body_encoder.safetensors"

    def __post_init__(self) -> None:
        check_loop_settings(self, TrainingConfigError, ("cosine", "constant"))


@dataclass(frozen=True)
class Stage1Config:
    """A whole stage-1 config: output_dir, seed, [model], [dataset], [prepare], [captions], [training]."""

    output_dir: Path
    seed: int
    model: BodyEncoderConfig
    dataset: Any  # bolid.dataset.DatasetConfig
    training: Stage1TrainingConfig
    prepare: dict[str, Any]
    captions: CaptionConfig | None = None  # [captions]: a local model captions photos without a caption file

    @classmethod
    def from_dict(cls, raw: dict[str, Any], base_dir: str | Path = ".") -> Stage1Config:
        base = Path(base_dir)
        allowed = {"stage", "output_dir", "seed", "model", "dataset", "training", "prepare", "captions"}
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise TrainingConfigError(f"stage-1 config has unknown top-level keys {unknown}; known: {sorted(allowed)}")
        if "dataset" not in raw or "output_dir" not in raw:
            raise TrainingConfigError("a stage-1 config needs output_dir and a [dataset] table")
        prepare = dict(raw.get("prepare", {}))
        bad = sorted(set(prepare) - {"pose_model", "provider", "detection_conf"})
        if bad:
            raise TrainingConfigError(f"[prepare] has unknown keys {bad}; known: pose_model, provider, detection_conf")
        if "pose_model" in prepare:
            prepare["pose_model"] = str((base / prepare["pose_model"]).resolve())
        return cls(output_dir=(base / raw["output_dir"]).resolve(), seed=int(raw.get("seed", 0)),
                   model=config_table(BodyEncoderConfig, dict(raw.get("model", {})), "model", TrainingConfigError),
                   dataset=dataset_config_from_dict(raw["dataset"], base),
                   training=config_table(Stage1TrainingConfig, dict(raw.get("training", {})), "training",
                                         TrainingConfigError),
                   prepare=prepare,
                   captions=caption_config_from_dict(raw["captions"], base) if "captions" in raw else None)


def _make_pose_runner(prepare: dict[str, Any]) -> Any:
    from bolid.pose import PoseRunner  # onnxruntime is only needed when a prepare step actually runs

    runner = PoseRunner(prepare["pose_model"], prepare.get("provider", "auto"))
    conf = float(prepare.get("detection_conf", 0.25))

    class _Runner:
        fingerprint = f"{Path(prepare['pose_model']).name}@{conf}"

        def detect(self, images: list) -> list:
            return runner.detect(images, conf=conf)

    return _Runner()


def prepare_stage1(config: Stage1Config, pose_runner: Any = None) -> None:
    """Run (or reuse) the dataset's pose/crop cache. Without a pose runner or [prepare].pose_model the cache must
    already exist."""
    if pose_runner is None and "pose_model" in config.prepare:
        pose_runner = _make_pose_runner(config.prepare)
    if pose_runner is None:
        if not (Path(config.dataset.cache_dir) / "index.json").is_file():
            raise DatasetCacheError(f"no prepared cache in {config.dataset.cache_dir} and no [prepare] pose_model "
                                    "to make one: set [prepare] pose_model to a YOLO pose .onnx file")
        if config.captions is not None:
            logger.warning("BoLID prepare: [captions] not applied: the existing cache in %s is used as it is (set "
                           "[prepare] pose_model so the prepare step can rebuild it)", config.dataset.cache_dir)
        return
    captions = caption_dataset(config.dataset, config.captions).captions if config.captions is not None else None
    prepare_dataset(config.dataset, pose_runner, crop_margin=config.model.crop_margin, model_captions=captions)


def train_stage1(config: Stage1Config, resume: str | None = None, pose_runner: Any = None,
                 on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train the Body-ID VAE; returns {"step", "losses" (per optimizer step), "export" (path), "encoder_hash"}.

    ``on_step(step, logs)`` is called on the main process after every optimizer step (hooks for tests/tools).
    """
    tc = config.training
    out = config.output_dir
    accelerator = make_accelerator(tc.mixed_precision, out, tc.report_to, TrainingConfigError, "BoLID stage 1",
                                   seed=config.seed)
    loop = TrainingLoop(accelerator, tc, 1, out, tc.report_to, TrainingConfigError)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        prepare_stage1(config, pose_runner)
    accelerator.wait_for_everyone()

    identities = load_identity_caches(config.dataset.cache_dir)
    samples_per_step = tc.batch_size * tc.gradient_accumulation_steps * accelerator.num_processes
    dataset = Stage1Dataset(identities, tc.max_steps * samples_per_step, config.dataset.max_context_views,
                            seed=config.seed, flip=config.dataset.flip)
    loader = torch.utils.data.DataLoader(dataset, batch_size=tc.batch_size, shuffle=False, drop_last=True,
                                         collate_fn=stage1_collate, num_workers=tc.num_workers,
                                         persistent_workers=False)
    model_config = config.model
    if not model_config.target_mean:  # standardise the identity targets by their spread over these people
        mean, std = identity_target_statistics(dataset.identities)
        model_config = replace(model_config, target_mean=tuple(mean.tolist()), target_std=tuple(std.tolist()))
    model = BodyEncoder(model_config)
    model.view_size = config.dataset.crop_size  # the cached views' side: inference cuts views at it too
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.learning_rate, weight_decay=tc.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    step = loop.resume(resume)
    loop.start_trackers(lambda: {**{f"model/{k}": v for k, v in model_config.architecture().items()
                                    if isinstance(v, (int, float, str, bool))},  # tensorboard takes scalars only
                                 **{f"training/{k}": v for k, v in asdict(tc).items()}, "seed": config.seed,
                                 "identities": len(dataset.identities)})
    logger.info("BoLID stage 1: %d identities, %d views, %d processes, %d samples per step, mixed precision %s",
                len(dataset.identities), sum(c.num_views for c in dataset.identities), accelerator.num_processes,
                samples_per_step, accelerator.mixed_precision)

    batches = iter(accelerator.skip_first_batches(loader, step * tc.gradient_accumulation_steps) if step else loader)

    def kl_weight_at(step: int) -> float:
        return tc.kl_weight * (min(1.0, (step + 1) / tc.kl_warmup_steps) if tc.kl_warmup_steps > 0 else 1.0)

    def inputs(step: int, micro: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        batch = next(batches)
        # seeded by the micro-batch's place in the global batch (process k's micro-batch j is number
        # j * processes + k, as the sharded loader deals them): N processes follow the 1-process run with N x the
        # accumulation
        gen = noise_generator(config.seed, step, micro * accelerator.num_processes + accelerator.process_index, 0,
                              accelerator.device)
        return (batch,), {"kl_weight": kl_weight_at(step), "recon_weight": tc.recon_weight,
                          "proportion_weight": tc.proportion_weight, "appearance_weight": tc.appearance_weight,
                          "generator": gen}

    def final_export(path: Path, at_step: int) -> str:
        final = accelerator.unwrap_model(model)
        final.body_prior = fit_body_prior(identity_posterior_means(final, dataset.identities))
        model_hash = _export(final, path, config, at_step)
        logger.info("BoLID stage 1: exported the encoder to %s (hash %s)", path, model_hash)
        return model_hash

    hooks = LoopHooks(extra_logs=lambda at: {"kl_weight": kl_weight_at(at)},
                      export=lambda path, at: _export(accelerator.unwrap_model(model), path, config, at),
                      final_export=final_export, on_step=on_step)
    result = loop.run(model, optimizer, inputs, model.parameters, hooks)
    return {"step": result.step, "losses": [logs["loss"] for logs in result.history], "export": out / tc.export_name,
            "encoder_hash": result.exported or ""}


@torch.no_grad()
def identity_posterior_means(model: BodyEncoder, identities: list[IdentityCache]) -> torch.Tensor:
    """c_body of every training identity from all its photos [N, d]: the distribution stage 2 conditions on,
    stored with the encoder so that Sample Body ID draws from it (posterior means are shrunk towards 0, so
    N(0, I) draws would be off the adapter's training distribution)."""
    from bolid.identity_cache import read_identity_crops

    was_training = model.training
    model.eval()
    param = next(model.parameters())
    out = []
    for cache in identities:
        crops = read_identity_crops(cache).to(param.device, param.dtype)
        mu, _ = model.encode(crops[None], cache.keypoints[None].to(param.device, param.dtype),
                             cache.weights[None].to(param.device, param.dtype))
        out.append(mu[0].float().cpu())
    model.train(was_training)
    return torch.stack(out)


def _export(model: BodyEncoder, path: Path, config: Stage1Config, step: int) -> str:
    training = {"stage": 1, "step": step, "seed": config.seed, "training": asdict(config.training),
                "dataset": config_summary(config.dataset)}
    return save_body_encoder(model, path, {"bolid_training": json.dumps(training, sort_keys=True, default=str)})


def run(raw_config: dict[str, Any], config_dir: Path, resume: str | None = None, prepare_only: bool = False
        ) -> dict[str, Any]:
    """Entry used by training/train.py for ``stage = 1`` configs."""
    config = Stage1Config.from_dict(raw_config, config_dir)
    if prepare_only:
        prepare_stage1(config)
        return {"prepared": str(config.dataset.cache_dir)}
    return train_stage1(config, resume=resume)
