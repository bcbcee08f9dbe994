"""The Lightning branch of stage 2 (training/lightning_branch.py): the K-step generation inside training is the
diffusers Euler/trailing sampler (SDXL-Lightning's) run outside training, gradients reach only the adapter, a
resumed run equals an uninterrupted one, and the config is typed, logged and exported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import stage2_tiny as T
import torch
from diffusers import EulerDiscreteScheduler

from bolid.diffusers_integration import BoLIDDiffusers
from bolid.safetensors_io import read_safetensors_metadata
from training.common import list_checkpoints
from training.lightning_branch import (
    LightningConfig,
    LightningConfigError,
    lightning_x0,
    trailing_timesteps,
    train_timesteps,
)
from training.stage2_loop import Stage2TrainingConfig, train_stage2_loop
from training.stage2_model import LossConfig, Stage2Model
from training.stage2_sampling import SamplingConfig, Stage2Data

NO_DROP = {"drop_text": 0, "drop_face": 0, "drop_body": 0, "drop_all": 0}


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8])
def test_trailing_timesteps_are_diffusers_trailing_spacing(steps):
    sched = EulerDiscreteScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    sched.set_timesteps(steps)
    assert trailing_timesteps(1000, steps) == [int(t) for t in sched.timesteps]
    assert trailing_timesteps(1000, 4) == [999, 749, 499, 249]


def test_diffusion_timesteps_uniform_unchanged_or_on_the_schedule():
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    # "uniform" is exactly the draw stage 2 made before the branch existed (same generator state afterwards)
    assert torch.equal(train_timesteps(LightningConfig(), 1000, 64, gen_a), torch.randint(0, 1000, (64,),
                                                                                           generator=gen_b))
    ts = train_timesteps(LightningConfig(diff_timesteps="schedule", steps=4), 1000, 256, gen_a)
    assert set(ts.tolist()) == {999, 749, 499, 249}
    ts = train_timesteps(LightningConfig(diff_timesteps="schedule", steps=4, schedule_steps=8), 1000, 512, gen_a)
    assert set(ts.tolist()) == set(trailing_timesteps(1000, 8))
    # ``low`` (LossConfig.min_timestep) keeps every draw at or above it, on either schedule
    ts = train_timesteps(LightningConfig(), 1000, 512, gen_a, low=250)
    assert int(ts.min()) >= 250 and int(ts.min()) < 260 and int(ts.max()) == 999
    ts = train_timesteps(LightningConfig(diff_timesteps="schedule", steps=4), 1000, 256, gen_a, low=300)
    assert set(ts.tolist()) == {999, 749, 499}
    with pytest.raises(ValueError, match="at or above min_timestep 1000"):
        train_timesteps(LightningConfig(diff_timesteps="schedule", steps=4), 1000, 8, gen_a, low=1000)


def _model(layout: str, prediction: str, cfg: LightningConfig, pose: bool = False, clip: bool = False,
           lc: LossConfig | None = None):
    comp = T.components(layout, prediction_type=prediction, pose=pose, clip=clip)
    comp.freeze()
    adapter = T.adapter_for(comp)
    with torch.no_grad():  # make the identity branches matter: larger token projections than the init
        for p in adapter.parameters():
            p.mul_(3.0)
    data = Stage2Data(T.identities(n=3, views=3, time_ids=layout == "sdxl"), SamplingConfig(seed=2, **NO_DROP), comp)
    model = Stage2Model(adapter, comp, lc or LossConfig(), cfg)
    model.set_uncond_text(data.text_cache[""])
    return comp, adapter, data, model


@pytest.mark.parametrize("layout,prediction,steps,guidance", [("sd15", "epsilon", 4, 1.0),
                                                               ("sdxl", "v_prediction", 2, 2.5),
                                                               ("sd15", "v_prediction", 1, 1.0)])
def test_branch_equals_the_euler_trailing_sampler_outside_training(layout, prediction, steps, guidance):
    cfg = LightningConfig(x0_source="lightning", steps=steps, guidance=guidance)
    comp, adapter, data, model = _model(layout, prediction, cfg)
    batch = data.batch(0, 3)
    noise = torch.randn(batch["sample"].shape, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        x0 = lightning_x0(model, batch, torch.arange(3), noise, cfg, data.text_cache[""])
    model.detach_unet()
    # outside training: the plain diffusers scheduler loop with BoLID's processors attached
    sched = EulerDiscreteScheduler.from_config(comp.noise_scheduler.config, timestep_spacing="trailing")
    sched.set_timesteps(steps)
    controller = BoLIDDiffusers.attach(comp.unet, adapter, 1.0, 1.0)
    face, body = batch["face"], batch["body"]
    text, pooled, tids = batch["text_embeds"], batch["pooled"], batch["time_ids"]
    if guidance > 1:
        u_text, u_pooled = data.text_cache[""]
        text = torch.cat([u_text.expand(3, -1, -1), text])
        pooled = None if pooled is None else torch.cat([u_pooled.expand(3, -1), pooled])
        tids = None if tids is None else torch.cat([tids, tids])
        face, body = torch.cat([torch.zeros_like(face), face]), torch.cat([torch.zeros_like(body), body])
    controller.set_identity(face, body)
    x = noise * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([x, x]) if guidance > 1 else x, t)
            added = None if pooled is None else {"text_embeds": pooled, "time_ids": tids}
            pred = comp.unet(inp, t, encoder_hidden_states=text, added_cond_kwargs=added).sample
            if guidance > 1:
                pred = pred[:3] + guidance * (pred[3:] - pred[:3])
            x = sched.step(pred, t, x).prev_sample
    controller.detach()
    assert x0.shape == x.shape
    torch.testing.assert_close(x0, x, atol=2e-4, rtol=1e-4)
    # and the identity condition matters for this comparison: another body gives another image
    model2 = Stage2Model(adapter, comp, LossConfig(), cfg)
    model2.set_uncond_text(data.text_cache[""])
    other = dict(batch, body=batch["body"].roll(1, 0))
    with torch.no_grad():
        x0_other = lightning_x0(model2, other, torch.arange(3), noise, cfg, data.text_cache[""])
    model2.detach_unet()
    assert (x0_other - x0).abs().max() > 1e-3


def _grads(model, adapter, batch, noise, branch_noise):
    adapter.zero_grad(set_to_none=True)
    out = model(batch, noise, torch.full((len(noise),), 999), branch_noise)
    (out["id"] + out["clip"]).backward()
    return out, {k: None if p.grad is None else p.grad.clone() for k, p in adapter.named_parameters()}


def test_gradients_reach_only_the_adapter_through_last_or_all_steps():
    lc = LossConfig(id_weight=1.0, clip_weight=1.0)
    base = LightningConfig(x0_source="lightning", steps=3, grad_steps="last")
    comp, adapter, data, model = _model("sd15", "epsilon", base, pose=True, clip=True, lc=lc)
    adapter.requires_grad_(True)
    batch = data.batch(1, 2)
    noise = torch.randn(batch["sample"].shape, generator=torch.Generator().manual_seed(1))
    branch_noise = torch.randn(batch["sample"].shape, generator=torch.Generator().manual_seed(2))
    results = {}
    for name, cfg in (("last", base), ("all", LightningConfig(x0_source="lightning", steps=3, grad_steps="all")),
                      ("all_nockpt", LightningConfig(x0_source="lightning", steps=3, grad_steps="all",
                                                     checkpointing=False))):
        object.__setattr__(model, "lightning", cfg)
        out, grads = _grads(model, adapter, batch, noise, branch_noise)
        # timestep 999 is far above id_max_timestep: these rows have the losses only through the branch
        assert out["id_rows"] == 2 and out["clip_rows"] == 2 and out["id"] > 0
        results[name] = grads
        for m in (comp.unet, comp.vae, comp.pose_net):
            assert all(p.grad is None and not p.requires_grad for p in m.parameters())
        body = [g for k, g in grads.items() if "body" in k]
        assert body and all(g is not None and torch.isfinite(g).all() for g in body)
        assert sum(float(g.abs().sum()) for g in body) > 0
    # all steps carry gradient: a different gradient than the last step alone; checkpointing changes nothing
    key = next(k for k, g in results["last"].items() if g is not None and "body" in k)
    assert not torch.allclose(results["last"][key], results["all"][key], atol=1e-8)
    for k, g in results["all"].items():
        if g is not None:
            torch.testing.assert_close(g, results["all_nockpt"][k], atol=1e-6, rtol=1e-4)
    # without branch noise (a step where the branch does not run) nothing auxiliary is computed
    calls = comp.pose_net.calls
    out = model(batch, noise, torch.full((2,), 999), None)
    assert out["id_rows"] == 0 and out["clip_rows"] == 0 and comp.pose_net.calls == calls
    # max_rows bounds the branch's batch
    object.__setattr__(model, "lightning", LightningConfig(x0_source="lightning", steps=2, max_rows=1))
    out = model(batch, noise, torch.full((2,), 999), branch_noise)
    assert out["id_rows"] == 1 and out["clip_rows"] == 1
    model.detach_unet()


class _InterruptError(Exception):
    pass


def _run(out, resume=None, stop_at=None):
    comp = T.components("sd15", pose=True, clip=False)
    adapter = T.adapter_for(comp)
    data = Stage2Data(T.identities(n=3, views=4), SamplingConfig(seed=4), comp)
    tc = Stage2TrainingConfig(max_steps=4, batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-3,
                              warmup_steps=1, checkpointing_steps=2, checkpoints_total_limit=1, report_to="none",
                              export_ip_adapter=False)
    cfg = LightningConfig(x0_source="lightning", steps=2, every=2, grad_steps="all", guidance=1.5)

    def on_step(step, logs):
        if stop_at is not None and step == stop_at:
            raise _InterruptError

    try:
        return train_stage2_loop(comp, adapter, data, tc, LossConfig(id_weight=0.5), output_dir=out, resume=resume,
                                 seed=3, on_step=on_step, lightning=cfg)
    except _InterruptError:
        return None


def test_resume_with_the_branch_equals_an_uninterrupted_run(tmp_path):
    full = _run(tmp_path / "full")
    # every = 2: the branch ran at steps 0 and 2 only
    assert [h["id_rows"] > 0 for h in full["losses"]] == [True, False, True, False]
    assert _run(tmp_path / "cut", stop_at=3) is None
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["checkpoint-00000002"]
    resumed = _run(tmp_path / "cut", resume="latest")
    assert resumed["step"] == 4
    for a, b in zip(full["losses"][2:], resumed["losses"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["id"] == pytest.approx(b["id"], rel=1e-6)
    sa, sb = full["adapter"].state_dict(), resumed["adapter"].state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-7) for k in sa)
    meta = read_safetensors_metadata(tmp_path / "full" / "bolid_adapter.safetensors")
    info = json.loads(meta["bolid_training"])
    assert info["lightning"] == {"x0_source": "lightning", "steps": 2, "every": 2, "grad_steps": "all",
                                 "checkpointing": True, "guidance": 1.5, "max_rows": 0, "diff_timesteps": "uniform",
                                 "schedule_steps": 0}
    assert json.loads(meta["bolid_loss_weights"])["x0_source"] == "lightning"


def test_lightning_table_is_typed_and_unknown_keys_are_rejected(tmp_path):
    from training.stage2 import Stage2Config, Stage2ConfigError

    raw = {"stage": 2, "output_dir": str(tmp_path / "out"), "model": {"pretrained": "x", "body_encoder": "y"},
           "dataset": {"cache_dir": str(tmp_path / "c"), "subsets": [{"root": str(tmp_path)}]}}
    assert Stage2Config.from_dict(raw, tmp_path).lightning == LightningConfig()
    cfg = Stage2Config.from_dict({**raw, "lightning": {"x0_source": "lightning", "steps": 8, "every": 4,
                                                       "diff_timesteps": "schedule"}}, tmp_path)
    assert cfg.lightning.branch and cfg.lightning.steps == 8 and cfg.lightning.runs_at(4) and not cfg.lightning.runs_at(5)
    with pytest.raises(Stage2ConfigError, match=r"\[lightning\] has unknown keys \['step'\]"):
        Stage2Config.from_dict({**raw, "lightning": {"step": 4}}, tmp_path)
    with pytest.raises(LightningConfigError, match="x0_source"):
        Stage2Config.from_dict({**raw, "lightning": {"x0_source": "lightening"}}, tmp_path)
    for bad in ({"grad_steps": "first"}, {"steps": 0}, {"every": 0}, {"guidance": 0.5},
                {"diff_timesteps": "lightning"}):
        with pytest.raises(LightningConfigError):
            LightningConfig(**bad)


@pytest.mark.parametrize("name", ["stage2_sdxl_lightning_example.toml", "stage2_sdxl_example.toml"])
def test_example_configs_parse(name):
    from training import train
    from training.stage2 import Stage2Config

    path = Path(__file__).resolve().parents[1] / "training" / "configs" / name
    cfg = Stage2Config.from_dict(train.load_config(path), path.parent)
    if "lightning" in name:
        assert cfg.lightning.branch and cfg.lightning.diff_timesteps == "schedule" and cfg.lightning.steps == 4
        assert cfg.model.unet_weights.endswith("sdxl_lightning_4step_unet.safetensors")
    else:
        assert cfg.lightning == LightningConfig()
