"""Stage 2: leave-one-out training of the Body-Condition Module, callable in-process.

The stage-2 modules (stage2_components, _sampling, _model, _loop, _validation) know nothing about config files
or model folders (``training/stage2.py`` is that front end); they work on in-memory components, so experiments
can drive them directly::

    from training.stage2_components import Stage2Components
    from training.stage2_loop import Stage2TrainingConfig, train_stage2_loop
    from training.stage2_model import LossConfig
    from training.stage2_sampling import SamplingConfig, Stage2Data, Stage2Identity

    components = Stage2Components(
        unet=unet,                      # diffusers UNet2DConditionModel (frozen; SDXL: addition_embed_type text_time)
        noise_scheduler=DDPMScheduler(...),   # its prediction_type ("epsilon" | "v_prediction") picks the target
        vae=vae_or_None,                # None = pixel-space model: samples are images in [-1, 1], x0 is the image
        encode_text=fn,                 # list[str] -> (embeds [B, L, ctx], pooled [B, P] | None); used to cache
        pose_net=fn_or_None,            # images [B, 3, H, W] in 0..1 -> (xy [B, 17, 2] pixels, conf [B, 17])
        clip_image=fn_or_None,          # images [B, 3, H, W] in 0..1 -> embeddings [B, E] (differentiable)
        clip_text=fn_or_None)           # list[str] -> embeddings [B, E] (cached per caption, no grad)
    identities = [Stage2Identity(name, samples=[latent or image per view, [C, h, w]], captions=[...],
                                 body_mu=[n, d], body_logvar=[n, d], body_weights=[n],
                                 face=[n, 512] or None, face_valid=[n] bool or None,
                                 keypoints=[n, 17, 3] in each view's training-image pixels,
                                 time_ids=[n, 6] or None (SDXL))]
    data = Stage2Data(identities, SamplingConfig(...), components=components)  # caches text embeddings
    result = train_stage2_loop(components, adapter, data, Stage2TrainingConfig(...), LossConfig(...),
                               output_dir=None or Path, resume=None)

The modules: :mod:`training.stage2_components` (the frozen models), :mod:`training.stage2_sampling`
(deterministic leave-one-out batches, ``Stage2Data.batch``), :mod:`training.stage2_model` (``Stage2Model``:
``forward(batch, noise, timesteps) -> loss dict``, the training step's maths), this module (the stage-2 side of
the shared loop of :mod:`training.loop`: EMA, export, frozen branches) and :mod:`training.stage2_validation`
(sampling with the trained adapter).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bolid.adapter import BoLIDAdapter
from bolid.adapter_io import BODY_ENCODER_HASH_KEY, export_ip_adapter, save_adapter
from training.common import noise_generator
from training.lightning_branch import LightningConfig, train_timesteps
from training.loop import LoopHooks, TrainingLoop, check_loop_settings, make_accelerator
from training.stage2_components import Stage2Components, Stage2Error, cast_frozen
from training.stage2_model import LossConfig, Stage2Model
from training.stage2_sampling import Stage2Data
from training.stage2_validation import log_validation

logger = logging.getLogger("bolid")


@dataclass(frozen=True)
class Stage2TrainingConfig:
    """Optimisation, checkpointing and logging of the stage-2 loop (the ``[training]`` table)."""

    max_steps: int = 10000
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 500
    lr_schedule: str = "cosine"  # "cosine" | "constant" | "linear" (after the linear warm-up)
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16": autocast; frozen UNet/VAE cast to it (not a force_upcast VAE)
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0  # 0 = off; e.g. 0.999 (the export then holds the EMA weights)
    checkpointing_steps: int = 1000
    checkpoints_total_limit: int = 3
    log_every: int = 10
    report_to: str = "tensorboard"  # "tensorboard" | "none"
    validation_steps: int = 0  # 0 = no validation grids
    validation_inference_steps: int = 20
    validation_guidance: float = 5.0
    validation_identities: int = 2
    export_name: str = "bolid_adapter.safetensors"
    export_ip_adapter: bool = True

    def __post_init__(self) -> None:
        check_loop_settings(self, Stage2Error, ("cosine", "constant", "linear"))
        if not 0.0 <= self.ema_decay < 1.0:
            raise Stage2Error("[training] ema_decay must be in [0, 1)")


class AdapterEMA:
    """Exponential moving average of the adapter's weights (checkpointed with accelerate)."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        # frozen parameters keep their exact values (decay*v + (1-decay)*v need not round back to v)
        frozen = {k for k, p in module.named_parameters() if not p.requires_grad}
        for k, v in module.state_dict().items():
            if k not in frozen:
                self.shadow[k].mul_(self.decay).add_(v.detach().float(), alpha=1.0 - self.decay)

    def copy_to(self, module: nn.Module) -> None:
        module.load_state_dict({k: v.to(module.state_dict()[k].dtype) for k, v in self.shadow.items()})

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}


def training_metadata(components: Stage2Components, data: Stage2Data, tc: Stage2TrainingConfig, lc: LossConfig,
                      step: int, extra: dict[str, Any] | None = None, lightning: LightningConfig | None = None
                      ) -> dict[str, str]:
    """What goes into the exported file besides the adapter's config."""
    lightning = lightning or LightningConfig()
    info = {"stage": 2, "base_model": components.base_model, "step": step, "loss": asdict(lc),
            "lightning": asdict(lightning),
            "training": asdict(tc), "sampling": asdict(data.sampling), "dataset": data.describe(),
            "prediction_type": components.prediction_type, **(extra or {})}
    out = {BODY_ENCODER_HASH_KEY: str(extra["body_encoder_hash"])} if extra and extra.get("body_encoder_hash") else {}
    return {**out, "bolid_training": json.dumps(info, sort_keys=True, default=str),
            "bolid_base_model": components.base_model,
            "bolid_training_steps": str(step), "bolid_loss_weights": json.dumps(
                {"diff": 1.0, "id": lc.id_weight, "clip": lc.clip_weight, "appearance": lc.appearance_weight,
                 "id_mode": lc.id_mode, "x0_source": lightning.x0_source}),
            "bolid_dataset_size": json.dumps({"identities": len(data.identities), "views": data.num_views})}


def export_adapter(adapter: BoLIDAdapter, path: Path, metadata: dict[str, str], ip_adapter: bool = True) -> list[Path]:
    """The BoLID file (ComfyUI loader) plus, optionally, one stock IP-Adapter file per branch (diffusers)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_adapter(adapter, path, metadata)
    written = [path]
    if ip_adapter:
        for branch in ("face", "body"):
            p = path.with_name(f"{path.stem}.{branch}_ip_adapter.safetensors")
            export_ip_adapter(adapter, branch, p)
            written.append(p)
    return written


def freeze_unused_branches(adapter: BoLIDAdapter, lc: LossConfig, also: Sequence[str] = ()) -> list[str]:
    """Freeze the parameters of a branch whose weight (``weight_face`` / ``weight_body``) is 0, and of ``also``.

    Such a branch is skipped in the UNet, so its parameters get no gradient, which DDP (several GPUs) refuses;
    frozen, they are simply not trained (they keep their initial values in the export). ``also`` names branches
    frozen on purpose (a face branch imported from IP-Adapter FaceID). Returns the frozen branches.
    """
    frozen = [b for b, w in (("face", lc.weight_face), ("body", lc.weight_body)) if w == 0 or b in also]
    for branch in frozen:
        adapter.projection(branch).requires_grad_(False)
        for index in range(len(adapter.layers)):
            for proj in adapter.layer(index).projections(branch):
                proj.requires_grad_(False)
    if frozen:
        logger.warning("BoLID stage 2: the %s branch is frozen (not trained)", " and ".join(frozen))
    return frozen


def train_stage2_loop(components: Stage2Components, adapter: BoLIDAdapter, data: Stage2Data,
                      tc: Stage2TrainingConfig, lc: LossConfig | None = None, output_dir: Path | None = None,
                      resume: str | None = None, seed: int = 0, metadata: dict[str, Any] | None = None,
                      on_step: Callable[[int, dict[str, float]], None] | None = None,
                      accelerator: Any = None, freeze: Sequence[str] = (), lightning: LightningConfig | None = None
                      ) -> dict[str, Any]:
    """Train ``adapter`` in place; returns {"step", "losses" (list of per-step dicts), "export" (paths or [])}.

    ``lightning`` (:mod:`training.lightning_branch`): the x0 of L_id / L_CLIP (one-step or a K-step generation) and
    L_diff's timesteps; its noise is seeded like the training noise, so resume and several processes still follow
    the uninterrupted one-process run.

    With ``output_dir``: accelerate checkpoints every ``checkpointing_steps`` (``resume="latest"`` continues from
    the newest), tensorboard logs, validation grids, and the export at the end. Without it: nothing is written
    (an in-process experiment). Batches come from ``data.batch(global index)`` and noise from a generator seeded by
    (seed, step, micro-batch index in the global batch), so a resumed run follows the uninterrupted one and N
    processes follow one process with N times the accumulation.
    """
    lc = lc or LossConfig()
    lightning = lightning or LightningConfig()
    out = Path(output_dir) if output_dir is not None else None
    report = tc.report_to if out is not None else "none"
    if accelerator is None:
        accelerator = make_accelerator(tc.mixed_precision, out, report, Stage2Error, "BoLID stage 2")
    loop = TrainingLoop(accelerator, tc, 2, out, report, Stage2Error)
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(tc.mixed_precision, torch.float32)
    components.freeze()
    cast_frozen(components, device, weight_dtype)
    if tc.gradient_checkpointing and hasattr(components.unet, "enable_gradient_checkpointing"):
        components.unet.enable_gradient_checkpointing()
    adapter.to(device=device, dtype=torch.float32).train()
    adapter.requires_grad_(True)
    freeze_unused_branches(adapter, lc, freeze)
    if lc.appearance_weight > 0:
        lacking = [ident.name for ident in data.identities if ident.appearance is None]
        if lacking:
            raise Stage2Error(f"appearance_weight > 0 needs each view's appearance (Stage2Identity.appearance), "
                              f"which {len(lacking)} identities lack (first: {lacking[0]}); set appearance_weight "
                              "= 0 or give them appearance")
    model = Stage2Model(adapter, components, lc, lightning)
    model.set_uncond_text(data.text_cache[""])
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=tc.learning_rate, weight_decay=tc.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = AdapterEMA(adapter, tc.ema_decay) if tc.ema_decay > 0 else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    loop.resume(resume)
    loop.start_trackers(lambda: {**{f"training/{k}": v for k, v in asdict(tc).items()},
                                 **{f"loss/{k}": v for k, v in asdict(lc).items()},
                                 **{f"lightning/{k}": v for k, v in asdict(lightning).items()}, "seed": seed,
                                 "identities": len(data.identities), "views": data.num_views})
    logger.info("BoLID stage 2: %s, %d processes, batch %d x %d accumulation", data.describe(),
                accelerator.num_processes, tc.batch_size, tc.gradient_accumulation_steps)
    logger.info("BoLID stage 2: %s", lightning.summary())

    def export_now(path: Path, at_step: int) -> list[Path]:
        target = accelerator.unwrap_model(model).adapter
        if ema is not None:
            target = _copy_adapter(target)
            ema.copy_to(target)
        return export_adapter(target, path, training_metadata(components, data, tc, lc, at_step, metadata, lightning),
                              tc.export_ip_adapter)

    def final_export(path: Path, at_step: int) -> list[Path]:
        exported = export_now(path, at_step)
        logger.info("BoLID stage 2: exported %s", ", ".join(str(p) for p in exported))
        return exported

    nproc, rank = accelerator.num_processes, accelerator.process_index
    raw_model = accelerator.unwrap_model(model)
    num_t = int(components.noise_scheduler.config.num_train_timesteps)
    if lc.min_timestep >= num_t:
        raise Stage2Error(f"[loss] min_timestep {lc.min_timestep} must be below the scheduler's {num_t} timesteps")

    def inputs(step: int, micro: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        index = (step * tc.gradient_accumulation_steps + micro) * nproc + rank
        batch = data.batch(index, tc.batch_size)
        # noise is seeded by the micro-batch's place in the global batch, like the data index: N processes
        # follow the 1-process run with N x the accumulation
        gen = noise_generator(seed, step, micro * nproc + rank, 0, torch.device("cpu"), offset=17)
        shape = batch["sample"].shape
        noise = torch.randn(shape, generator=gen).to(device)
        timesteps = train_timesteps(lightning, num_t, shape[0], gen, lc.min_timestep).to(device)
        branch_noise = None
        if lightning.runs_at(step):  # its own generator: the training noise stays what it was without it
            bgen = noise_generator(seed, step, micro * nproc + rank, 0, torch.device("cpu"), offset=29)
            branch_noise = torch.randn(shape, generator=bgen).to(device)
        return (batch, noise, timesteps, branch_noise), {}

    def validate(step: int) -> None:
        if out is not None and tc.validation_steps > 0 and step % tc.validation_steps == 0 \
                and accelerator.is_main_process:
            log_validation(raw_model, data, tc, out, step, accelerator if report != "none" else None, seed)

    terms = (("loss", True), ("diff", True), ("id", lc.id_weight > 0), ("clip", lc.clip_weight > 0),
             ("appearance", lc.appearance_weight > 0))
    shown = [k for k, on in terms if on]
    hooks = LoopHooks(after_update=None if ema is None else (lambda: ema.update(raw_model.adapter)),
                      progress_keys=shown, validate=validate, export=export_now, final_export=final_export,
                      close=raw_model.detach_unet, on_step=on_step)
    result = loop.run(model, optimizer, inputs, adapter.parameters, hooks)
    return {"step": result.step, "losses": result.history, "export": result.exported or [],
            "adapter": raw_model.adapter, "ema": None if ema is None else ema.shadow}


def _copy_adapter(adapter: BoLIDAdapter) -> BoLIDAdapter:
    copy = BoLIDAdapter(adapter.config)
    copy.load_state_dict(adapter.state_dict())
    return copy
