"""Stage-2 losses: the pure maths (bolid.losses), gradients on the trainable parameters only, and auxiliary terms
that cost nothing when switched off."""

from __future__ import annotations

import math

import pytest
import stage2_tiny as T
import torch
import torch.nn.functional as F

from bolid.appearance import appearance_descriptor, image_appearance
from bolid.losses import (
    appearance_identity_loss,
    clip_alignment_loss,
    keypoint_identity_loss,
    normalize_keypoints,
    proportion_identity_loss,
)
from bolid.metrics import body_consistency
from bolid.proportions import body_proportions, proportion_error
from training.lightning_branch import LightningConfig
from training.stage2_components import Stage2Error, cast_frozen
from training.stage2_loop import Stage2TrainingConfig, freeze_unused_branches, train_stage2_loop
from training.stage2_model import LossConfig, Stage2Model, diffusion_loss, predicted_x0
from training.stage2_sampling import SamplingConfig, Stage2Data

# ----------------------------------------------------------------------------------------------- pure maths


def _pose(seed: int = 0) -> torch.Tensor:
    idents = T.identities(n=1, views=2, seed=seed)
    return idents[0].keypoints[0]


def test_normalize_keypoints_removes_translation_and_scale():
    kp = _pose()
    moved = kp.clone()
    moved[:, :2] = kp[:, :2] * 2.7 + torch.tensor([13.0, -5.0])
    a = normalize_keypoints(kp[None, :, :2], kp[None, :, 2])
    b = normalize_keypoints(moved[None, :, :2], kp[None, :, 2])
    assert torch.allclose(a, b, atol=1e-5)
    assert a.shape == (1, 12, 2)


def test_keypoint_loss_zero_for_same_pose_positive_otherwise():
    kp = _pose()
    moved = kp.clone()
    moved[:, :2] = kp[:, :2] * 0.5 + 40.0
    conf = torch.ones(1, 17)
    same = keypoint_identity_loss(moved[None, :, :2], conf, kp[None, :, :2], kp[None, :, 2])
    other = _pose(seed=3)
    diff = keypoint_identity_loss(other[None, :, :2], conf, kp[None, :, :2], kp[None, :, 2])
    assert same.item() < 1e-8 and diff.item() > 1e-3


def test_one_proportion_error_serves_l_id_and_the_metric():
    """L_id ``proportions`` is the mean of THE per-row error; the body-consistency metric is its square root."""
    g = torch.Generator().manual_seed(0)
    xy, conf = torch.rand(3, 17, 2, generator=g) * 50, torch.rand(3, 17, generator=g)
    ref, ref_conf = torch.rand(3, 6, generator=g), torch.rand(3, 6, generator=g)
    props, prop_conf = body_proportions(xy, conf)
    rows = proportion_error(props, ref, prop_conf * ref_conf, dim=-1)
    assert torch.equal(proportion_identity_loss(xy, conf, ref, ref_conf), rows.mean())
    metric = body_consistency(torch.cat([xy, conf[..., None]], -1), ref.double(), ref_conf.double(), 0.0).errors
    assert metric == pytest.approx(rows.sqrt().tolist(), rel=1e-5)
    weighted = ((props - ref) ** 2 * prop_conf).sum() / prop_conf.sum()  # no dim: one weighted mean (stage 1)
    assert torch.equal(proportion_error(props, ref, prop_conf), weighted)
    assert proportion_error(props, ref, torch.zeros_like(ref)).item() == 0.0  # nothing seen: no error, no NaN


def test_proportion_loss_matches_identity_reference():
    kp = _pose()
    ref_props, ref_conf = body_proportions(kp[None])
    scaled = kp[None, :, :2] * 3.0 + 7.0
    zero = proportion_identity_loss(scaled, kp[None, :, 2], ref_props, ref_conf)
    assert zero.item() < 1e-8
    longer = scaled.clone()
    longer[:, 15, 1] += 30.0  # a longer left shin
    assert proportion_identity_loss(longer, kp[None, :, 2], ref_props, ref_conf).item() > 1e-4


def test_clip_alignment_loss_range():
    e = torch.randn(3, 8)
    assert clip_alignment_loss(e, e).abs().item() < 1e-6
    assert math.isclose(clip_alignment_loss(e, -e).item(), 2.0, rel_tol=1e-5)


def test_image_appearance_reads_pixel_keypoints_like_the_crop_descriptor():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 24, 40, generator=g)
    kp = torch.rand(2, 17, 3, generator=g)
    kp_px = kp.clone()
    kp_px[..., 0] *= 40
    kp_px[..., 1] *= 24
    a, ca = image_appearance(images, kp_px)
    b, cb = appearance_descriptor(images, kp)
    assert torch.allclose(a, b, atol=1e-6) and torch.equal(ca, cb)


def test_appearance_loss_known_answer_and_gradient():
    colour = torch.tensor([0.2, 0.5, 0.7])
    images = colour.view(1, 3, 1, 1).expand(2, 3, 16, 16).clone().requires_grad_(True)
    kp = torch.cat([torch.rand(2, 17, 2, generator=torch.Generator().manual_seed(1)) * 8 + 4,
                    torch.ones(2, 17, 1)], -1)
    ref = colour.repeat(4).expand(2, 12)
    conf = torch.ones(2, 12)
    assert appearance_identity_loss(images, kp, ref, conf).item() < 1e-10
    off = appearance_identity_loss(images, kp, ref + 0.1, conf)
    assert off.item() == pytest.approx(0.01, rel=1e-4)
    off.backward()
    assert images.grad.abs().sum() > 0  # differentiable in the image (x0_hat)
    # a row whose reference has no confidence contributes nothing
    assert appearance_identity_loss(images.detach(), kp, ref + 0.1, torch.zeros(2, 12)).item() == 0


def test_min_snr_weighting_known_answer():
    comp = T.components("sd15", prediction_type="v_prediction")
    sched = comp.noise_scheduler
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([5, 400, 900])
    assert torch.equal(diffusion_loss(sched, pred, target, t, "v_prediction"), F.mse_loss(pred, target))
    ac = sched.alphas_cumprod[t].double()
    snr = ac / (1 - ac)
    rows = ((pred - target) ** 2).flatten(1).mean(1).double()
    for kind, weight in (("v_prediction", snr.clamp(max=5.0) / (snr + 1)), ("epsilon", snr.clamp(max=5.0) / snr)):
        expected = (rows * weight).mean()
        assert diffusion_loss(sched, pred, target, t, kind, snr_gamma=5.0).item() == pytest.approx(expected.item(),
                                                                                                  rel=1e-5)
    assert weight[0] < 0.01 and weight[2] == pytest.approx(1.0)  # low noise is down-weighted, high noise is not


def test_predicted_x0_inverts_the_forward_process():
    comp = T.components(vae=False, pose=False, clip=False)
    x0 = torch.randn(2, 4, 8, 8)
    noise = torch.randn_like(x0)
    t = torch.tensor([10, 700])
    noisy = comp.noise_scheduler.add_noise(x0, noise, t)
    assert torch.allclose(predicted_x0(comp.noise_scheduler, noisy, noise, t, "epsilon"), x0, atol=1e-4)
    v = comp.noise_scheduler.get_velocity(x0, noise, t)
    assert torch.allclose(predicted_x0(comp.noise_scheduler, noisy, v, t, "v_prediction"), x0, atol=1e-4)


# ----------------------------------------------------------------------------------------------- gradients

CASES = {
    "diff_epsilon": dict(prediction="epsilon", loss={}, term="diff"),
    "diff_v": dict(prediction="v_prediction", loss={}, term="diff"),
    "id_proportions": dict(prediction="epsilon", loss=dict(id_weight=1.0, id_max_timestep=1000), term="id"),
    "id_keypoints": dict(prediction="v_prediction", loss=dict(id_weight=1.0, id_mode="keypoints",
                                                              id_max_timestep=1000), term="id"),
    "clip": dict(prediction="epsilon", loss=dict(clip_weight=1.0, clip_max_timestep=1000), term="clip"),
    "appearance": dict(prediction="v_prediction", loss=dict(appearance_weight=1.0), term="appearance"),
}


def _frozen_params(comp):
    mods = [comp.unet, comp.vae, comp.pose_net, comp.clip_image.__self__.conv]
    return [p for m in mods if m is not None for p in m.parameters()]


def _batch(data, size=3):
    batch = data.batch(0, size)
    batch["body_present"][:] = True
    batch["text_present"][:] = True
    return batch


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_loss_gives_finite_gradients_on_trainable_parameters_only(case):
    spec = CASES[case]
    comp = T.components("sd15", prediction_type=spec["prediction"])
    adapter = T.adapter_for(comp)
    comp.freeze()
    model = Stage2Model(adapter, comp, LossConfig(**spec["loss"]))
    data = Stage2Data(T.identities(appearance=True), SamplingConfig(drop_text=0, drop_face=0, drop_body=0,
                                                                    drop_all=0), comp)
    batch = _batch(data)
    gen = torch.Generator().manual_seed(0)
    out = model(batch, torch.randn(batch["sample"].shape, generator=gen), torch.tensor([5, 150, 390]))
    term = out[spec["term"]]
    assert torch.isfinite(term) and term.item() > 0
    term.backward()
    grads = [p.grad for p in adapter.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    # the aux terms reach both projections (face and body tokens feed every layer)
    assert adapter.body_proj.proj[0].weight.grad.abs().sum() > 0
    assert adapter.face_proj.proj[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in _frozen_params(comp))
    model.detach_unet()


def test_sdxl_and_pixel_space_losses():
    for layout, vae in (("sdxl", True), ("sd15", False)):
        comp = T.components(layout, vae=vae)
        adapter = T.adapter_for(comp)
        comp.freeze()
        lc = LossConfig(id_weight=0.5, clip_weight=0.5, id_max_timestep=1000, clip_max_timestep=1000)
        model = Stage2Model(adapter, comp, lc)
        data = Stage2Data(T.identities(time_ids=layout == "sdxl", channels=4 if vae else 3), SamplingConfig(), comp)
        if not vae:  # a pixel-space "UNet": images in, images out
            from diffusers import UNet2DConditionModel

            cfg = dict(comp.unet.config)
            cfg.update(in_channels=3, out_channels=3)
            comp.unet = UNet2DConditionModel.from_config(cfg).requires_grad_(False)
            model.detach_unet()
            model = Stage2Model(adapter, comp, lc)
        batch = _batch(data, 2)
        out = model(batch, torch.randn(batch["sample"].shape), torch.tensor([3, 100]))
        assert out["id_rows"].item() == 2 and out["clip_rows"].item() == 2
        out["loss"].backward()
        assert all(torch.isfinite(p.grad).all() for p in adapter.parameters())
        assert all(p.grad is None for p in comp.unet.parameters())
        model.detach_unet()


def test_zero_weight_auxiliary_losses_are_not_computed():
    comp = T.components("sd15")
    adapter = T.adapter_for(comp)
    decodes = []
    original = comp.vae.decode
    comp.vae.decode = lambda *a, **k: decodes.append(1) or original(*a, **k)
    data = Stage2Data(T.identities(), SamplingConfig(), comp)
    batch = _batch(data)
    clip = comp.clip_image.__self__
    for lc, t in ((LossConfig(), torch.tensor([1, 2, 3])),  # weights 0
                  (LossConfig(id_weight=1.0, clip_weight=1.0, id_max_timestep=100, clip_max_timestep=100),
                   torch.tensor([100, 500, 999]))):  # every row above the thresholds
        model = Stage2Model(adapter, comp, lc)
        out = model(batch, torch.randn(batch["sample"].shape), t)
        out["loss"].backward()
        model.detach_unet()
        assert out["id"].item() == 0 and out["clip"].item() == 0
    assert decodes == [] and comp.pose_net.calls == 0 and clip.image_calls == 0 and clip.text_calls == 0
    # and with rows below the threshold they do run (the counters above can fail)
    model = Stage2Model(adapter, comp, LossConfig(id_weight=1.0, clip_weight=1.0))
    model(batch, torch.randn(batch["sample"].shape), torch.tensor([10, 500, 999]))
    model.detach_unet()
    assert len(decodes) == 1 and comp.pose_net.calls == 1 and clip.image_calls == 1


def test_zero_weight_branch_is_frozen_so_every_trainable_parameter_gets_a_gradient():
    # DDP refuses trainable parameters without a gradient; a branch with weight 0 is skipped in the UNet
    comp = T.components("sd15", pose=False, clip=False)
    adapter = T.adapter_for(comp).requires_grad_(True)
    lc = LossConfig(weight_body=0.0)
    assert freeze_unused_branches(adapter, lc) == ["body"]
    model = Stage2Model(adapter, comp, lc)
    data = Stage2Data(T.identities(), SamplingConfig(drop_text=0, drop_face=0, drop_body=0, drop_all=0), comp)
    batch = _batch(data)
    model(batch, torch.randn(batch["sample"].shape), torch.tensor([5, 150, 390]))["loss"].backward()
    model.detach_unet()
    trainable = [(n, p) for n, p in adapter.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for _, p in trainable)
    assert not any(p.requires_grad for n, p in adapter.named_parameters() if "body" in n)
    assert all(p.requires_grad for n, p in adapter.named_parameters() if "face" in n)


@pytest.mark.parametrize("force_upcast", [True, False])
def test_mixed_precision_keeps_a_force_upcast_vae_in_float32(force_upcast):
    comp = T.components("sd15", pose=False, clip=False)
    comp.vae.register_to_config(force_upcast=force_upcast)
    cast_frozen(comp, torch.device("cpu"), torch.bfloat16)
    assert next(comp.unet.parameters()).dtype == torch.bfloat16
    vae_dtype = torch.float32 if force_upcast else torch.bfloat16
    assert next(comp.vae.parameters()).dtype == vae_dtype
    decoded = []
    original = comp.vae.decode

    def decode(z, **kwargs):
        out = original(z, **kwargs)
        decoded.append((z.dtype, out.sample.dtype))
        return out

    comp.vae.decode = decode
    model = Stage2Model(T.adapter_for(comp), comp, LossConfig())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        image = model.images_from_x0(torch.randn(1, 4, 8, 8))
    model.detach_unet()
    # a float32 VAE decodes outside autocast (input and output float32), a cast one in its own dtype
    assert decoded == [(vae_dtype, vae_dtype)]
    assert image.dtype == torch.float32 and torch.isfinite(image).all()


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        comp = T.components("sd15")
        adapter = T.adapter_for(comp)
        comp.freeze()
        if ckpt:
            comp.unet.enable_gradient_checkpointing()
        lc = LossConfig(id_weight=1.0, clip_weight=1.0, id_max_timestep=1000, clip_max_timestep=1000,
                        vae_checkpointing=ckpt)
        model = Stage2Model(adapter, comp, lc)
        data = Stage2Data(T.identities(), SamplingConfig(), comp)
        batch = _batch(data, 2)
        out = model(batch, torch.randn(batch["sample"].shape, generator=torch.Generator().manual_seed(1)),
                    torch.tensor([20, 300]))
        out["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in adapter.parameters()]))
        model.detach_unet()
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_real_pose_and_clip_wrappers_are_differentiable(monkeypatch, tmp_path):
    """The ultralytics YOLO pose network (random weights) and a tiny open_clip model through our wrappers."""
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path))
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    from training.models import OpenClipFunctions, YoloPoseNet

    pose = YoloPoseNet.from_file("yolo11n-pose.yaml", imgsz=64)
    images = torch.rand(2, 3, 40, 24, requires_grad=True)
    xy, conf = pose(images)
    assert xy.shape == (2, 17, 2) and conf.shape == (2, 17)
    assert ((conf >= 0) & (conf <= 1)).all()
    xy.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in pose.parameters())

    torch.manual_seed(0)
    model = open_clip.model.CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16,
                                                                        patch_size=8, image_size=32),
                                 text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    clip = OpenClipFunctions.from_model(model, open_clip.SimpleTokenizer())
    images = torch.rand(2, 3, 48, 40, requires_grad=True)
    loss = clip_alignment_loss(clip.image(images), clip.text(["a person", "a tall person"]))
    loss.backward()
    assert torch.isfinite(loss) and images.grad.abs().sum() > 0


def test_appearance_term_refuses_what_it_cannot_read():
    """Identities without per-view appearance, and the Lightning branch's image (not the training view), are refused
    with a message naming the setting, not trained on silently with a zero term."""
    comp = T.components("sd15", pose=False, clip=False)
    adapter = T.adapter_for(comp)
    lc = LossConfig(appearance_weight=1.0)
    data = Stage2Data(T.identities(), SamplingConfig(), comp)
    with pytest.raises(Stage2Error, match="appearance_weight > 0 needs each view's appearance"):
        train_stage2_loop(comp, adapter, data, Stage2TrainingConfig(max_steps=1, batch_size=2, report_to="none"), lc)
    with pytest.raises(Stage2Error, match="x0_source"):
        Stage2Model(adapter, comp, lc, LightningConfig(x0_source="lightning"))


def test_loss_settings_are_checked_by_name():
    with pytest.raises(Stage2Error, match=r"snr_gamma must be a finite number >= 0, got nan"):
        LossConfig(snr_gamma=float("nan"))
    with pytest.raises(Stage2Error, match="appearance_weight"):
        LossConfig(appearance_weight=-1.0)
    with pytest.raises(Stage2Error, match=r"id_max_timestep \(400\) must be above min_timestep \(500\)"):
        LossConfig(id_weight=0.1, min_timestep=500)
    LossConfig(min_timestep=500)  # a term that is off may keep its threshold
