"""The Lightning branch of stage 2: identity losses on an image the model really generates in a few steps.

The one-step x0 prediction at t < ``id_max_timestep`` is blurred at SD/SDXL scale, and a pose network reads little
on it. As in PuLID's "Lightning T2I" branch, this module generates x0 from pure noise in K steps (K = 1..8) with
the adapter active and the row's text / face / body condition, and stage 2 computes L_id and L_CLIP on that image.

Sampler: the one SDXL-Lightning ships with, diffusers' ``EulerDiscreteScheduler`` with ``timestep_spacing =
"trailing"`` (timesteps ``round(T - i*T/K) - 1``: 999, 749, 499, 249 for K = 4) and the final sigma 0, so the
result is the last step's x0 prediction. It is written here in variance-preserving form (x_t = a*x0 + s*eps, the
UNet's own input): each step predicts x0 and eps and moves to the next timestep's (a, s). That is the same update
as Euler on x/a over sigma = s/a (and as DDIM with eta 0); ``tests/test_lightning_branch.py`` checks it against
the diffusers scheduler run outside training for the same noise.

Gradients: through the last step only (``grad_steps = "last"``: the first K-1 steps run without a graph, PuLID's
cheap form) or through all K steps (``"all"``: each UNet call is recomputed in the backward pass when
``checkpointing`` is on, so memory stays about one UNet call's activations). Only the adapter has trainable
parameters; the frozen models pass gradients through but receive none.

The SDXL-Lightning training route: a Lightning UNet was distilled for its K trailing timesteps only, so
``diff_timesteps = "schedule"`` draws L_diff's timesteps from those K timesteps (``schedule_steps``; 0 = K)
instead of uniformly over 0..T-1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.checkpoint import checkpoint

from bolid.errors import BoLIDError
from bolid.identity import no_identity_like

if TYPE_CHECKING:  # stage2_model imports this module
    from training.stage2_model import Stage2Model

X0_SOURCES = ("one_step", "lightning")
GRAD_STEPS = ("last", "all")
DIFF_TIMESTEPS = ("uniform", "schedule")


class LightningConfigError(BoLIDError):
    """The ``[lightning]`` table of a stage-2 config is invalid, or the branch cannot run with these inputs."""


@dataclass(frozen=True)
class LightningConfig:
    """The ``[lightning]`` table: where L_id / L_CLIP's x0 comes from and how L_diff's timesteps are drawn.

    x0_source: "one_step" (x0 predicted from the noised training image at t < id_max_timestep, the default) or
    "lightning" (x0 generated from pure noise in ``steps`` Euler/trailing steps). every: the branch runs on
    optimizer steps 0, N, 2N, ... (the other steps train L_diff only). grad_steps: "last" or "all". checkpointing:
    recompute each UNet call of the branch in the backward pass (only matters with grad_steps "all"). guidance:
    classifier-free guidance of the branch's sampler, against no text and no identity (1 = off, one UNet call per
    step: SDXL-Lightning is used without CFG). max_rows: at most this many rows of a batch go through the branch
    (0 = every row that has a body or caption condition). diff_timesteps / schedule_steps: see the module docstring.
    """

    x0_source: str = "one_step"
    steps: int = 4
    every: int = 1
    grad_steps: str = "last"
    checkpointing: bool = True
    guidance: float = 1.0
    max_rows: int = 0
    diff_timesteps: str = "uniform"
    schedule_steps: int = 0

    def __post_init__(self) -> None:
        if self.x0_source not in X0_SOURCES:
            raise LightningConfigError(f"[lightning] x0_source must be one of {X0_SOURCES}, got {self.x0_source!r}")
        if self.grad_steps not in GRAD_STEPS:
            raise LightningConfigError(f"[lightning] grad_steps must be one of {GRAD_STEPS}, got {self.grad_steps!r}")
        if self.diff_timesteps not in DIFF_TIMESTEPS:
            raise LightningConfigError(f"[lightning] diff_timesteps must be one of {DIFF_TIMESTEPS}, got "
                                       f"{self.diff_timesteps!r}")
        if not 1 <= self.steps <= 50:
            raise LightningConfigError(f"[lightning] steps must be 1..50 (SDXL-Lightning: 2, 4 or 8), got {self.steps}")
        if self.every < 1:
            raise LightningConfigError(f"[lightning] every must be >= 1, got {self.every}")
        if self.max_rows < 0 or self.schedule_steps < 0:
            raise LightningConfigError("[lightning] max_rows and schedule_steps must be >= 0")
        if not self.guidance >= 1.0:
            raise LightningConfigError(f"[lightning] guidance must be >= 1 (1 = no CFG), got {self.guidance}")

    @property
    def branch(self) -> bool:
        """True when L_id / L_CLIP use the K-step image."""
        return self.x0_source == "lightning"

    def runs_at(self, step: int) -> bool:
        """Does the branch run at optimizer step ``step`` (0-based)?"""
        return self.branch and step % self.every == 0

    def summary(self) -> str:
        if not self.branch:
            return f"x0 for the auxiliary losses: one-step prediction; L_diff timesteps {self.diff_timesteps}"
        return (f"x0 for the auxiliary losses: Lightning branch, {self.steps} Euler/trailing steps from noise, every "
                f"{self.every} step(s), gradient through {self.grad_steps} step(s), guidance {self.guidance}, "
                f"max rows {self.max_rows or 'all'}; L_diff timesteps {self.diff_timesteps}")


def trailing_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """The K timesteps of diffusers' ``timestep_spacing = "trailing"`` (SDXL-Lightning's), high to low."""
    ratio = num_train_timesteps / steps
    return [int(round(num_train_timesteps - i * ratio)) - 1 for i in range(steps)]


def train_timesteps(cfg: LightningConfig, num_train_timesteps: int, batch: int, generator: torch.Generator,
                    low: int = 0) -> torch.Tensor:
    """L_diff's timesteps: uniform over low..T-1 (low 0: exactly the draw stage 2 always made) or the Lightning
    schedule's (``low`` then drops the schedule's steps below it)."""
    if cfg.diff_timesteps == "uniform":
        return torch.randint(low, num_train_timesteps, (batch,), generator=generator)
    schedule = torch.tensor(trailing_timesteps(num_train_timesteps, cfg.schedule_steps or cfg.steps))
    if not bool((schedule >= low).any()):
        raise ValueError(f"no step of the {len(schedule)}-step schedule is at or above min_timestep {low}")
    schedule = schedule[schedule >= low]
    return schedule[torch.randint(0, len(schedule), (batch,), generator=generator)]


def _alphas(scheduler: Any, t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ac = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)[t]
    return ac.sqrt(), (1 - ac).sqrt()


def lightning_x0(model: Stage2Model, batch: dict[str, Any], rows: torch.Tensor, noise: torch.Tensor,
                 cfg: LightningConfig, uncond: tuple[torch.Tensor, torch.Tensor | None] | None = None
                 ) -> torch.Tensor:
    """x0 [len(rows), C, h, w] generated from ``noise`` (already restricted to ``rows``) in ``cfg.steps`` steps.

    Each row keeps its own text, face and body condition; with ``cfg.guidance > 1`` an unconditional pass (the
    empty caption ``uncond``, zero face and body) runs beside it. Differentiable in the adapter's parameters
    through the last step or all steps (``cfg.grad_steps``)."""
    comp = model.components
    sched = comp.noise_scheduler
    kind = comp.prediction_type
    device = noise.device
    rows_cpu = rows.cpu()
    n = len(rows_cpu)
    sub = {"text_embeds": batch["text_embeds"][rows_cpu],
           "pooled": None if batch.get("pooled") is None else batch["pooled"][rows_cpu],
           "time_ids": None if batch.get("time_ids") is None else batch["time_ids"][rows_cpu]}
    face, body = batch["face"][rows_cpu].to(device), batch["body"][rows_cpu].to(device)
    if cfg.guidance > 1.0:
        if uncond is None:
            raise LightningConfigError("[lightning] guidance > 1 needs the empty caption's text embedding "
                                       "(Stage2Model.set_uncond_text)")
        u_emb, u_pool = uncond
        sub = {"text_embeds": torch.cat([u_emb[None].expand(n, *u_emb.shape).to(sub["text_embeds"]),
                                         sub["text_embeds"]]),
               "pooled": None if sub["pooled"] is None else torch.cat([u_pool[None].expand(n, -1).to(sub["pooled"]),
                                                                       sub["pooled"]]),
               "time_ids": None if sub["time_ids"] is None else torch.cat([sub["time_ids"], sub["time_ids"]])}
        face = torch.cat([no_identity_like(face), face])
        body = torch.cat([no_identity_like(body), body])
    num_t = int(sched.config.num_train_timesteps)
    schedule = trailing_timesteps(num_t, cfg.steps)

    def step_x0(x: torch.Tensor, t: int) -> torch.Tensor:
        a, s = _alphas(sched, t, device)
        inp = torch.cat([x, x]) if cfg.guidance > 1.0 else x
        ts = torch.full((inp.shape[0],), t, device=device, dtype=torch.long)
        pred = model.unet_forward(inp, ts, sub, face, body).float()
        if cfg.guidance > 1.0:
            pred = pred[:n] + cfg.guidance * (pred[n:] - pred[:n])
        if kind == "epsilon":
            return (x - s * pred) / a
        return a * x - s * pred

    # diffusers' Euler with trailing spacing starts at sigma_max * noise, i.e. s_T * noise at the UNet's input
    x = noise.float() * _alphas(sched, schedule[0], device)[1]
    x0 = x
    for i, t in enumerate(schedule):
        with_grad = torch.is_grad_enabled() and (cfg.grad_steps == "all" or i == len(schedule) - 1)
        with torch.set_grad_enabled(with_grad):
            if with_grad and cfg.checkpointing and cfg.grad_steps == "all":
                x0 = checkpoint(step_x0, x, t, use_reentrant=False)
            else:
                x0 = step_x0(x, t)
            if i + 1 < len(schedule):
                a, s = _alphas(sched, t, device)
                eps = (x - a * x0) / s
                a_next, s_next = _alphas(sched, schedule[i + 1], device)
                x = a_next * x0 + s_next * eps
    return x0
