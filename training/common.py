"""Training utilities shared by stage 1 (:mod:`training.stage1`) and stage 2 (:mod:`training.stage2_loop`,
:mod:`training.stage2`): config tables, the learning-rate schedule, checkpoint folders and resuming, and the
per-step noise generator that makes a resumed run follow the uninterrupted one.

Resuming loads accelerate's own checkpoint files (``accelerator.load_state``), which are pickles: resume only
checkpoints you wrote yourself.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from bolid.errors import BoLIDError
from bolid.safetensors_io import atomic_write_text

logger = logging.getLogger("bolid")

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "bolid_state.json"


def config_table(cls: type, raw: dict[str, Any], name: str, error_cls: type[BoLIDError] = BoLIDError) -> Any:
    """Build the dataclass ``cls`` from the TOML table ``[name]``; unknown keys and bad values raise ``error_cls``."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise error_cls(f"[{name}] has unknown keys {unknown}; known keys: {sorted(known)}")
    try:
        return cls(**raw)
    except (TypeError, ValueError) as exc:
        raise error_cls(f"[{name}]: {exc}") from exc


def learning_rate_at(step: int, cfg: Any) -> float:
    """LR of optimizer step ``step`` (0-based) for a config with learning_rate, warmup_steps, max_steps and
    lr_schedule: linear warm-up, then constant, linear to 0 or cosine to 10%."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    if cfg.lr_schedule == "linear":
        return cfg.learning_rate * (1.0 - progress)
    return cfg.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def noise_generator(seed: int, step: int, micro: int, rank: int, device: torch.device | str,
                    offset: int = 0) -> torch.Generator:
    """A generator seeded by (seed, step, micro-batch, process[, offset]) only."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 7919 + micro * 104_729 + rank * 15_485_863 + offset) % (2 ** 63))
    return g


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint folders with a completed state file, oldest first."""
    dirs = [p for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file()]
    return sorted(dirs, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_resume(output_dir: Path | None, resume: str | None, error_cls: type[BoLIDError] = BoLIDError,
                   label: str = "BoLID") -> Path | None:
    """``latest`` -> newest complete checkpoint in output_dir (None if there is none); a path -> that folder."""
    if not resume:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(output_dir) if output_dir is not None else []
        if not ckpts:
            logger.warning("%s: --resume latest: no checkpoint in %s, starting from scratch", label, output_dir)
            return None
        return ckpts[-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise error_cls(f"--resume {resume}: not a BoLID checkpoint folder (no {STATE_FILE})")
    return path


def resumed_step(checkpoint: Path) -> int:
    """The optimizer step stored in a checkpoint's state file."""
    return int(json.loads((Path(checkpoint) / STATE_FILE).read_text())["step"])


def save_checkpoint(accelerator: Any, output_dir: Path, step: int, stage: int, export: Callable[[Path], Any],
                    keep: int, label: str = "BoLID") -> Path:
    """accelerate state (``save_state``) + ``export(folder)`` + the state file with the step; keep the newest
    ``keep`` (0 = all). The state file is written last (atomically): a folder without it is an incomplete
    checkpoint and is never resumed."""
    path = Path(output_dir) / f"{CHECKPOINT_PREFIX}{step:08d}"
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        export(path)
        atomic_write_text(path / STATE_FILE, json.dumps({"step": step, "stage": stage}))
        if keep > 0:
            for old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
                logger.info("%s: removed old checkpoint %s", label, old)
    accelerator.wait_for_everyone()
    return path


def check_distributed_launch(accelerator: Any, error_cls: type[BoLIDError] = BoLIDError, label: str = "BoLID") -> None:
    """Refuse a launch whose processes did not join one distributed run: each would train alone on the whole
    batch and every one of them would write the same checkpoints and exports."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and accelerator.num_processes != launched:
        raise error_cls(
            f"{label}: {launched} processes were launched (WORLD_SIZE={launched}) but accelerate set up a run of "
            f"{accelerator.num_processes}, so each would train alone and overwrite the others' files. With GPUs, "
            "check that every process sees one (CUDA_VISIBLE_DEVICES); on a machine without GPUs set "
            "ACCELERATE_USE_CPU=1 for `accelerate launch --multi_gpu` or torchrun (gloo).")
