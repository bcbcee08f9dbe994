"""The one training loop of both stages (:mod:`training.stage1`, :mod:`training.stage2_loop`).

It owns what the stages share: the Accelerator (built here only, :func:`make_accelerator`), resuming from a
checkpoint, trackers, gradient accumulation, clipping and the optimizer step, the learning-rate schedule, log
reduction over micro-batches and processes, the progress bar, checkpoints and the final export. A stage supplies
the inputs of micro-batch ``(step, micro)`` and a few hooks.

Accumulation is done one way: ``gradient_accumulation_steps`` micro-batches per optimizer step, each loss divided
by their number, gradients all-reduced on the last micro-batch only (``no_sync`` before). A stage seeds its batch and
noise by the micro-batch's place in the global batch (``micro * processes + rank``), so a resumed run follows the
uninterrupted one and N processes follow one process with N times the accumulation.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bolid.errors import BoLIDError
from training.common import (
    check_distributed_launch,
    learning_rate_at,
    resolve_resume,
    resumed_step,
    save_checkpoint,
)

logger = logging.getLogger("bolid")

ModelInputs = tuple[tuple[Any, ...], dict[str, Any]]


def make_accelerator(mixed_precision: str, output_dir: Path | None, report_to: str,
                     error_cls: type[BoLIDError] = BoLIDError, label: str = "BoLID", seed: int | None = None) -> Any:
    """The Accelerator of a training run (checked to be one distributed run); ``seed``: accelerate's ``set_seed``.
    Without ``output_dir`` nothing is written (no project or logging folder)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    out = Path(output_dir) if output_dir is not None else None
    project = ProjectConfiguration(project_dir=str(out) if out else None,
                                   logging_dir=str(out / "logs") if out else None)
    accelerator = Accelerator(mixed_precision=mixed_precision, project_config=project,
                              log_with=None if report_to == "none" else report_to)
    check_distributed_launch(accelerator, error_cls, label)
    if seed is not None:
        set_seed(seed)
    return accelerator


def check_loop_settings(cfg: Any, error_cls: type[BoLIDError], lr_schedules: Sequence[str]) -> None:
    """The checks of the ``[training]`` settings the loop reads, shared by both stages' training configs."""
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise error_cls(f"[training] mixed_precision must be no/fp16/bf16, got {cfg.mixed_precision!r}")
    if cfg.lr_schedule not in lr_schedules:
        raise error_cls(f"[training] lr_schedule must be {'/'.join(lr_schedules)}, got {cfg.lr_schedule!r}")
    if cfg.report_to not in ("tensorboard", "none"):
        raise error_cls(f"[training] report_to must be tensorboard/none, got {cfg.report_to!r}")
    for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "checkpointing_steps", "log_every"):
        if getattr(cfg, name) < 1:
            raise error_cls(f"[training] {name} must be >= 1")


@dataclass
class LoopHooks:
    """What a stage adds to the loop; all optional.

    after_update(): right after each optimizer step (an EMA). extra_logs(step): entries added to the step's logs
    (``step`` 0-based, as the learning rate). progress_keys: the log entries the progress bar shows. validate(step):
    after logging, on every process (the hook decides when and where it runs). export(path, step): the file written
    into every checkpoint folder; final_export(path, step): the one written at the end on the main process
    (default: export). close(): before the Accelerator ends. on_step(step, logs): main process, after the checkpoint.
    """

    after_update: Callable[[], None] | None = None
    extra_logs: Callable[[int], dict[str, float]] | None = None
    progress_keys: Sequence[str] = ("loss",)
    validate: Callable[[int], None] | None = None
    export: Callable[[Path, int], Any] | None = None
    final_export: Callable[[Path, int], Any] | None = None
    close: Callable[[], None] | None = None
    on_step: Callable[[int, dict[str, float]], None] | None = None


@dataclass
class LoopResult:
    """The step reached, each step's reduced logs, and what the final export returned (None without one)."""

    step: int
    history: list[dict[str, float]] = field(default_factory=list)
    exported: Any = None


class TrainingLoop:
    """One stage's run. ``tc`` is the stage's ``[training]`` config (max_steps, gradient_accumulation_steps,
    max_grad_norm, learning-rate schedule, log_every, checkpointing_steps, checkpoints_total_limit, export_name).
    Without ``output_dir`` nothing is written: no checkpoints, no trackers, no export."""

    def __init__(self, accelerator: Any, tc: Any, stage: int, output_dir: Path | None, report_to: str,
                 error_cls: type[BoLIDError] = BoLIDError) -> None:
        self.accelerator = accelerator
        self.tc = tc
        self.stage = stage
        self.out = Path(output_dir) if output_dir is not None else None
        self.report_to = report_to if self.out is not None else "none"
        self.error_cls = error_cls
        self.label = f"BoLID stage {stage}"
        self.step = 0
        check_distributed_launch(accelerator, error_cls, self.label)  # also for an Accelerator a caller built

    def resume(self, resume: str | None) -> int:
        """Load ``resume`` ("latest" or a checkpoint folder) into the prepared objects; returns the step."""
        ckpt = resolve_resume(self.out, resume, self.error_cls, self.label)
        if ckpt is not None:
            self.accelerator.load_state(str(ckpt))  # accelerate's files are pickles: resume only your own checkpoints
            self.step = resumed_step(ckpt)
            logger.info("%s: resumed from %s at step %d", self.label, ckpt, self.step)
        return self.step

    def start_trackers(self, hparams: Callable[[], dict[str, Any]]) -> None:
        """Tensorboard (``report_to``) with the run's hyper-parameters (scalars only)."""
        if self.report_to != "none":
            self.accelerator.init_trackers(f"bolid_stage{self.stage}", config=hparams())

    def run(self, model: Any, optimizer: Any, inputs: Callable[[int, int], ModelInputs],
            params: Callable[[], Any], hooks: LoopHooks | None = None) -> LoopResult:
        """Train from ``self.step`` to ``tc.max_steps``; ``inputs(step, micro)`` -> (args, kwargs) of the model call
        for micro-batch ``micro`` of optimizer step ``step``; the model returns a dict of losses with "loss".
        ``params()``: the parameters whose gradient norm is clipped. Ends the Accelerator."""
        from tqdm.auto import tqdm

        hooks = hooks or LoopHooks()
        acc, tc, out = self.accelerator, self.tc, self.out
        accum = tc.gradient_accumulation_steps
        step = self.step
        progress = tqdm(total=tc.max_steps, initial=step, desc=f"stage {self.stage}",
                        disable=not acc.is_local_main_process)
        history: list[dict[str, float]] = []
        export = hooks.export or (lambda path, at: None)
        model.train()
        while step < tc.max_steps:
            window: list[dict[str, torch.Tensor]] = []
            lr = learning_rate_at(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(accum):
                args, kwargs = inputs(step, micro)
                # gradients are summed locally over the micro-batches and all-reduced on the last one only
                sync = contextlib.nullcontext() if micro == accum - 1 else acc.no_sync(model)
                with sync:
                    with acc.autocast():
                        losses = model(*args, **kwargs)  # through the wrapper, so DDP syncs gradients
                    acc.backward(losses["loss"] / accum)
                window.append({k: v.detach().float() for k, v in losses.items()})
            if tc.max_grad_norm > 0:
                acc.clip_grad_norm_(params(), tc.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if hooks.after_update is not None:
                hooks.after_update()
            logs = {k: acc.reduce(torch.stack([w[k] for w in window]).mean(), "mean").item() for k in window[0]}
            logs["lr"] = lr
            if hooks.extra_logs is not None:
                logs.update(hooks.extra_logs(step - 1))
            history.append(logs)
            progress.update(1)
            progress.set_postfix({k: f"{logs[k]:.4f}" for k in hooks.progress_keys})
            if self.report_to != "none" and (step % tc.log_every == 0 or step == 1):
                acc.log({f"train/{k}": v for k, v in logs.items()}, step=step)
            if hooks.validate is not None:
                hooks.validate(step)
            if out is not None and (step % tc.checkpointing_steps == 0 or step == tc.max_steps):
                save_checkpoint(acc, out, step, self.stage,
                                lambda folder, at=step: export(folder / tc.export_name, at),
                                tc.checkpoints_total_limit, self.label)
            if hooks.on_step is not None and acc.is_main_process:
                hooks.on_step(step, logs)
        progress.close()
        acc.wait_for_everyone()
        self.step = step
        result = LoopResult(step, history)
        final = hooks.final_export or hooks.export
        if out is not None and final is not None and acc.is_main_process:
            result.exported = final(out / tc.export_name, step)
        if hooks.close is not None:
            hooks.close()
        acc.end_training()
        return result
