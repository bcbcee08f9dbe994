"""How much of the diffusion loss does a trained adapter's body condition explain, and at which timesteps?

The adapter learns only from L_diff. If the identity-dependent part of L_diff is a sliver of the whole, stage 2 is
slow to learn it however the rest is set up, and more steps (not another recipe) are what it needs. This measures
that sliver directly on held-out photos: the same x_t (same image, caption, noise and timestep) is denoised by

* ``base``: the UNet without the adapter;
* ``none``: the adapter attached with no body (what condition dropout trains);
* ``own``: the adapter with the person's own body condition;
* ``swapped``: the adapter with another held-out person's body condition;

and L_diff is compared pair by pair, per timestep band, with person-clustered intervals. ``swapped - own`` is the
part of L_diff that depends on *which* person the condition names (the identity signal the adapter has learned to
use); ``base - own`` also counts what the adapter improves for everybody alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bolid.diffusers_integration import BoLIDDiffusers
from bolid.identity import no_identity_like
from training.stage2_model import diffusion_target

from .stats import paired_difference, ratio_of_means, summarise
from .world_models import CaptionEncoder, make_train_scheduler, to_model_range

BODY_CONDITIONS = ("none", "own", "swapped")


def stratified_timesteps(n_rows: int, draws: int, bands: int, num_train_timesteps: int,
                         generator: torch.Generator) -> torch.Tensor:
    """Draw d of every image falls in band ``d % bands`` (equal-width bands of [0, T)), uniform inside it, so each
    band holds the same number of rows of every image."""
    if draws % bands:
        raise ValueError(f"draws ({draws}) must be a multiple of bands ({bands})")
    width = num_train_timesteps // bands
    band = torch.arange(draws).repeat(n_rows) % bands
    return band * width + torch.randint(0, width, (n_rows * draws,), generator=generator)


@torch.no_grad()
def per_row_losses(unet: torch.nn.Module, text: CaptionEncoder, adapter: Any, images: np.ndarray,
                   captions: list[str], own: torch.Tensor, swapped: torch.Tensor, seed: int, draws: int = 8,
                   bands: int = 4, batch: int = 128) -> dict[str, Any]:
    """Per-row L_diff (mean over pixels) of every condition on the same x_t. ``images`` are generation rows (a
    photo repeats when it has several seeds); rows here are image-major: image i, draw d at row i * draws + d.
    Also returns each row's ``timestep`` and ``image`` index, and the ``bands`` and ``num_train_timesteps``."""
    sched = make_train_scheduler()
    num_t = int(sched.config.num_train_timesteps)
    gen = torch.Generator().manual_seed(int(seed))
    x0 = to_model_range(images).repeat_interleave(draws, 0)
    noise = torch.randn(x0.shape, generator=gen)
    t = stratified_timesteps(len(images), draws, bands, num_t, gen)
    xt = sched.add_noise(x0, noise, t)
    target = diffusion_target(sched, x0, noise, t, sched.config.prediction_type)
    ctx = text(captions).repeat_interleave(draws, 0)
    bodies = {"none": no_identity_like(own), "own": own, "swapped": swapped}
    out: dict[str, Any] = {}
    for label in ("base", *BODY_CONDITIONS):
        controller = None
        rows_body = None
        if label != "base":
            controller = BoLIDDiffusers.attach(unet, adapter, weight_face=0.0, weight_body=1.0)
            rows_body = bodies[label].float().repeat_interleave(draws, 0)
        try:
            losses = []
            for s in range(0, len(t), batch):
                if controller is not None:
                    controller.set_identity(None, rows_body[s : s + batch])
                pred = unet(xt[s : s + batch], t[s : s + batch], ctx[s : s + batch]).sample
                losses.append((pred.float() - target[s : s + batch]).pow(2).flatten(1).mean(1))
        finally:
            if controller is not None:
                controller.detach()
        out[label] = torch.cat(losses).numpy()
    out["timestep"] = t.numpy()
    out["image"] = np.arange(len(images)).repeat(draws)
    out["bands"], out["num_train_timesteps"] = bands, num_t
    return out


def loss_share(rows: dict[str, Any], person: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Per band and overall: each condition's mean L_diff, and the paired differences ``swapped - own``
    (identity-specific), ``none - own`` and ``base - own``, each also as a share of ``base``'s mean L_diff
    (:func:`stats.ratio_of_means`: its CI resamples numerator and denominator together). Rows of one image are
    averaged first (``person`` [n_images]: whose image each is), then CIs resample people."""
    width = rows["num_train_timesteps"] // rows["bands"]
    selections = {"all": np.ones(len(rows["timestep"]), dtype=bool)}
    selections.update({f"t{k * width}-{(k + 1) * width}": rows["timestep"] // width == k
                       for k in range(rows["bands"])})
    out: dict[str, Any] = {}
    for name, sel in selections.items():
        images = rows["image"][sel]
        per_image = {k: _mean_by(rows[k][sel], images) for k in ("base", *BODY_CONDITIONS)}
        who = person[np.unique(images)]
        band: dict[str, Any] = {"l_diff": {k: summarise(v, who, n_boot, seed=seed)["mean"]
                                           for k, v in per_image.items()}}
        for a in ("swapped", "none", "base"):
            diff = paired_difference(per_image[a], per_image["own"], who, n_boot, seed=seed)
            share = ratio_of_means(per_image[a] - per_image["own"], per_image["base"], who, n_boot, seed=seed)
            band[f"{a}_minus_own"] = {"mean": diff["mean"], "ci_excludes_zero": diff["ci_excludes_zero"]["mean"],
                                      "share_of_base": {"estimate": share.estimate, "lo": share.lo, "hi": share.hi}}
        band.update(n_rows=int(sel.sum()), n_images=len(who), n_persons=int(len(np.unique(who))))
        out[name] = band
    return out


def _mean_by(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Mean of ``values`` per group, groups in ascending order."""
    _, inverse = np.unique(groups, return_inverse=True)
    return np.bincount(inverse, weights=values.astype(float)) / np.bincount(inverse)
