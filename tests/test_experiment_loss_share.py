"""Known-answer tests of the loss-share measurement (training/experiment/loss_share.py) and of the sampler's
separate body guidance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.experiment.loss_share import loss_share, stratified_timesteps


def test_stratified_timesteps_put_every_draw_in_its_band():
    t = stratified_timesteps(5, 8, 4, 1000, torch.Generator().manual_seed(0))
    assert t.shape == (40,)
    band = (t // 250).view(5, 8)
    assert torch.equal(band, torch.arange(8).repeat(5, 1) % 4)
    assert int(t.min()) >= 0 and int(t.max()) < 1000
    with pytest.raises(ValueError, match="multiple of bands"):
        stratified_timesteps(5, 6, 4, 1000, torch.Generator())


def test_loss_share_known_answer():
    # 6 images of 3 people, 4 draws each (one per band); own is 0.1 below swapped everywhere, 0.2 below base
    # only in the top band: the differences and shares come out exactly
    rng = np.random.default_rng(0)
    images, draws = 6, 4
    t = np.tile(np.array([10, 300, 600, 900]), images)
    own = rng.uniform(0.5, 1.0, images * draws)
    base = own + np.where(t >= 750, 0.2, 0.0)
    rows = {"base": base, "none": own + 0.05, "own": own, "swapped": own + 0.1, "timestep": t,
            "image": np.arange(images).repeat(draws)}
    person = np.array([0, 0, 1, 1, 2, 2])
    out = loss_share(rows, person, n_boot=200)
    assert out["all"]["swapped_minus_own"]["mean"]["estimate"] == pytest.approx(0.1)
    assert out["all"]["swapped_minus_own"]["ci_excludes_zero"]
    assert out["all"]["none_minus_own"]["mean"]["estimate"] == pytest.approx(0.05)
    assert out["t0-250"]["base_minus_own"]["mean"]["estimate"] == pytest.approx(0.0)
    top = out["t750-1000"]
    assert top["base_minus_own"]["mean"]["estimate"] == pytest.approx(0.2)
    assert top["base_minus_own"]["share_of_base"]["estimate"] == pytest.approx(0.2 / np.mean(base[t >= 750]))
    assert top["l_diff"]["own"]["estimate"] == pytest.approx(np.mean(own[t >= 750]))
    assert top["n_rows"] == images and out["all"]["n_rows"] == images * draws


def test_body_guidance_equal_to_guidance_is_the_joint_guidance():
    """uncond + g (caption - uncond) + g (both - caption) = uncond + g (both - uncond): the separate body guidance
    at the caption's scale draws the experiment's images (up to float rounding); another scale changes them."""
    from bolid.diffusers_integration import adapter_config_for_unet, init_adapter_from_unet
    from training.experiment.stages import generate
    from training.experiment.world_models import CaptionEncoder, make_base_unet

    torch.manual_seed(0)
    unet, text = make_base_unet().eval(), CaptionEncoder().eval()
    adapter = init_adapter_from_unet(unet, adapter_config_for_unet(unet, body_dim=5, body_tokens=2, face_tokens=1))
    with torch.no_grad():  # a body branch that acts strongly, so guidance scales show
        for p in adapter.body_proj.parameters():
            p.mul_(5.0)
    bodies = torch.randn(2, 5)
    args = (unet, text, ["a person standing", "a person waving"], [1, 2], adapter, bodies, 3, 2.0)
    joint = generate(*args).astype(int)
    separate = generate(*args, body_guidance=2.0).astype(int)
    stronger = generate(*args, body_guidance=6.0).astype(int)
    assert np.abs(joint - separate).max() <= 1
    assert np.abs(joint - stronger).max() > 1
    with pytest.raises(ValueError, match="needs an adapter"):
        generate(unet, text, ["a person"], [1], None, None, 2, 2.0, body_guidance=3.0)
