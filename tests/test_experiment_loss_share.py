"""Known-answer tests of the loss-share measurement (training/experiment/loss_share.py) and of the sampler's
separate body guidance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.experiment.loss_share import loss_share, per_row_losses, stratified_timesteps


def test_stratified_timesteps_put_every_draw_in_its_band():
    t = stratified_timesteps(5, 8, 4, 1000, torch.Generator().manual_seed(0))
    assert t.shape == (40,)
    band = (t // 250).view(5, 8)
    assert torch.equal(band, torch.arange(8).repeat(5, 1) % 4)
    assert int(t.min()) >= 0 and int(t.max()) < 1000
    with pytest.raises(ValueError, match="multiple of bands"):
        stratified_timesteps(5, 6, 4, 1000, torch.Generator())


def test_loss_share_known_answer():
    # 6 images of 3 people, 2 draws per band; swapped - own varies by person (0.05 / 0.1 / 0.15), own beats base by
    # 0.2 only in the top band; rows of one image are averaged before people are resampled
    rng = np.random.default_rng(0)
    images, draws = 6, 8
    person = np.array([0, 0, 1, 1, 2, 2])
    image = np.arange(images).repeat(draws)
    t = np.tile(np.array([10, 300, 600, 900, 20, 400, 700, 950]), images)
    own = rng.uniform(0.5, 1.0, images * draws)
    base = own + np.where(t >= 750, 0.2, 0.0)
    gap = np.array([0.05, 0.1, 0.15])[person[image]]
    rows = {"base": base, "none": own + 0.05, "own": own, "swapped": own + gap, "timestep": t, "image": image,
            "bands": 4, "num_train_timesteps": 1000}
    out = loss_share(rows, person, n_boot=300)
    assert set(out) == {"all", "t0-250", "t250-500", "t500-750", "t750-1000"}
    sw = out["all"]["swapped_minus_own"]
    assert sw["mean"]["estimate"] == pytest.approx(0.1)
    assert 0.05 - 1e-9 <= sw["mean"]["lo"] < 0.1 < sw["mean"]["hi"] <= 0.15 + 1e-9 and sw["ci_excludes_zero"]
    assert sw["share_of_base"]["estimate"] == pytest.approx(0.1 / base.mean())
    assert out["all"]["none_minus_own"]["mean"]["estimate"] == pytest.approx(0.05)
    assert out["t0-250"]["base_minus_own"]["mean"]["estimate"] == pytest.approx(0.0)
    top = out["t750-1000"]
    assert top["base_minus_own"]["mean"]["estimate"] == pytest.approx(0.2)
    assert top["base_minus_own"]["share_of_base"]["estimate"] == pytest.approx(0.2 / np.mean(base[t >= 750]))
    assert top["l_diff"]["own"]["estimate"] == pytest.approx(np.mean(own[t >= 750]))
    assert (top["n_rows"], top["n_images"], top["n_persons"]) == (images * 2, images, 3)
    assert out["all"]["n_rows"] == images * draws


def _tiny_adapter(body_dim: int = 5):
    from bolid.diffusers_integration import adapter_config_for_unet, init_adapter_from_unet
    from training.experiment.world_models import CaptionEncoder, make_base_unet

    torch.manual_seed(0)
    unet, text = make_base_unet().eval(), CaptionEncoder().eval()
    adapter = init_adapter_from_unet(unet, adapter_config_for_unet(unet, body_dim=body_dim, body_tokens=2,
                                                                   face_tokens=1))
    with torch.no_grad():  # a body branch that acts strongly, so bodies and guidance scales show
        for p in adapter.body_proj.parameters():
            p.mul_(5.0)
    return unet, text, adapter


def test_per_row_losses_denoise_each_row_with_its_own_image_caption_and_body():
    """Row i * draws + d is image i's draw d: rebuild one row by hand (same generator order) and compare."""
    from bolid.diffusers_integration import BoLIDDiffusers
    from training.experiment.world_models import make_train_scheduler, to_model_range
    from training.stage2_model import diffusion_target

    unet, text, adapter = _tiny_adapter()
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    captions = ["a person standing", "a person waving", "a person sitting"]
    own, swapped = torch.randn(3, 5), torch.randn(3, 5)
    draws = 4
    rows = per_row_losses(unet, text, adapter, images, captions, own, swapped, seed=7, draws=draws, bands=2,
                          batch=5)
    assert rows["base"].shape == (12,) and rows["bands"] == 2 and rows["num_train_timesteps"] == 1000
    assert np.array_equal(rows["image"], np.repeat(np.arange(3), draws))
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn((12, 3, 32, 32), generator=gen)
    t = stratified_timesteps(3, draws, 2, 1000, gen)
    assert np.array_equal(rows["timestep"], t.numpy())
    sched = make_train_scheduler()
    i, d = 2, 3
    r = i * draws + d
    x0 = to_model_range(images[i : i + 1])
    xt = sched.add_noise(x0, noise[r : r + 1], t[r : r + 1])
    target = diffusion_target(sched, x0, noise[r : r + 1], t[r : r + 1], "v_prediction")
    with torch.no_grad():
        for label, body in (("own", own), ("swapped", swapped)):
            controller = BoLIDDiffusers.attach(unet, adapter, weight_face=0.0, weight_body=1.0)
            controller.set_identity(None, body[i : i + 1])
            pred = unet(xt, t[r : r + 1], text([captions[i]])).sample
            controller.detach()
            assert rows[label][r] == pytest.approx(float((pred - target).pow(2).mean()), rel=1e-4)
        base = unet(xt, t[r : r + 1], text([captions[i]])).sample
    assert rows["base"][r] == pytest.approx(float((base - target).pow(2).mean()), rel=1e-4)
    assert not np.allclose(rows["own"], rows["swapped"])


def test_body_guidance_equal_to_guidance_is_the_joint_guidance():
    """uncond + g (caption - uncond) + g (both - caption) = uncond + g (both - uncond): the separate body guidance
    at the caption's scale draws the experiment's images (up to float rounding); another scale changes them."""
    from training.experiment.stages import generate

    unet, text, adapter = _tiny_adapter()
    bodies = torch.randn(2, 5)
    args = (unet, text, ["a person standing", "a person waving"], [1, 2], adapter, bodies, 3, 2.0)
    joint = generate(*args).astype(int)
    separate = generate(*args, body_guidance=2.0).astype(int)
    stronger = generate(*args, body_guidance=6.0).astype(int)
    assert np.abs(joint - separate).max() <= 1
    assert np.abs(joint - stronger).max() > 1
    with pytest.raises(ValueError, match="needs an adapter"):
        generate(unet, text, ["a person"], [1], None, None, 2, 2.0, body_guidance=3.0)


def test_img2img_start_keeps_the_photo_at_low_strength_and_ignores_it_at_full_strength():
    """The ceiling probe's sampler: strength s starts from the photo noised to the first of the last s * steps
    timesteps. At one step of ten (t = 0) almost nothing is noised, so even a random model returns the photo;
    strength 1 is exactly the text-to-image sampler whatever the photos."""
    from training.experiment.stages import generate

    unet, text, _ = _tiny_adapter()
    captions, seeds = ["a person standing", "a person waving"], [1, 2]
    photos = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    kept = generate(unet, text, captions, seeds, None, None, 10, 1.5, init_images=photos, strength=0.1)
    assert np.abs(kept.astype(int) - photos.astype(int)).max() <= 8
    full = generate(unet, text, captions, seeds, None, None, 3, 1.5, init_images=photos, strength=1.0)
    assert np.array_equal(full, generate(unet, text, captions, seeds, None, None, 3, 1.5))
    with pytest.raises(ValueError, match="needs init_images"):
        generate(unet, text, captions, seeds, None, None, 3, 1.5, strength=0.5)
    with pytest.raises(ValueError, match="one image per caption"):
        generate(unet, text, captions, seeds, None, None, 3, 1.5, init_images=photos[:1], strength=0.5)
    with pytest.raises(ValueError, match="strength"):
        generate(unet, text, captions, seeds, None, None, 3, 1.5, init_images=photos, strength=0.0)
