"""The stage-2 loop in-process: the loss falls, frozen weights stay bit-identical, resume equals an uninterrupted
run, and the exported files load in the nodes' loader and in diffusers."""

from __future__ import annotations

import copy
import json

import pytest
import stage2_tiny as T
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from tiny_unets import CTX

from bolid.adapter_io import load_adapter
from bolid.diffusers_integration import BoLIDDiffusers
from bolid.safetensors_io import read_safetensors_metadata
from training.common import list_checkpoints
from training.stage2_loop import Stage2TrainingConfig, train_stage2_loop
from training.stage2_model import LossConfig, Stage2Model
from training.stage2_sampling import SamplingConfig, Stage2Data


def _eval_loss(comp, adapter, data, lc):
    """Mean diffusion loss over fixed batches, noise and timesteps (no dropout)."""
    model = Stage2Model(adapter, comp, lc)
    gen = torch.Generator().manual_seed(123)
    total = 0.0
    with torch.no_grad():
        for i in range(4):
            batch = data.batch(10_000 + i, 4)
            noise = torch.randn(batch["sample"].shape, generator=gen)
            t = torch.randint(0, 1000, (4,), generator=gen)
            total += model(batch, noise, t)["diff"].item()
    model.detach_unet()
    return total / 4


def test_loss_falls_and_frozen_weights_are_untouched():
    comp = T.components("sd15", pose=True, clip=True)
    adapter = T.adapter_for(comp)
    frozen = {name: copy.deepcopy(m.state_dict()) for name, m in (("unet", comp.unet), ("vae", comp.vae),
                                                                  ("pose", comp.pose_net))}
    data = Stage2Data(T.identities(n=3, views=4), SamplingConfig(seed=1), comp)
    lc = LossConfig(id_weight=0.1, clip_weight=0.1)
    eval_data = Stage2Data(data.identities, SamplingConfig(seed=9, drop_text=0, drop_face=0, drop_body=0, drop_all=0),
                           text_cache=data.text_cache)
    before = _eval_loss(comp, adapter, eval_data, LossConfig())
    tc = Stage2TrainingConfig(max_steps=12, batch_size=4, learning_rate=1e-2, warmup_steps=2, lr_schedule="constant",
                              report_to="none")
    result = train_stage2_loop(comp, adapter, data, tc, lc, seed=0)
    after = _eval_loss(comp, adapter, eval_data, LossConfig())
    assert result["step"] == 12 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result["losses"])
    assert any(h["id_rows"] > 0 for h in result["losses"]) and any(h["clip_rows"] > 0 for h in result["losses"])
    # only the adapter trains (the random base UNet stays as it is), so the reachable drop is a few percent; the
    # comparison is deterministic (same batches, noise and timesteps before and after)
    assert after < 0.97 * before, (before, after)
    for name, m in (("unet", comp.unet), ("vae", comp.vae), ("pose", comp.pose_net)):
        now = m.state_dict()
        assert all(torch.equal(now[k], v) for k, v in frozen[name].items()), name
    # the processors were removed again: the UNet is the plain base model after training
    assert not any(type(p).__name__ == "BoLIDAttnProcessor" for p in comp.unet.attn_processors.values())


class _InterruptError(Exception):
    pass


def _run(out, resume=None, stop_at=None, **overrides):
    comp = T.components("sdxl", pose=False, clip=False)
    adapter = T.adapter_for(comp)
    data = Stage2Data(T.identities(n=3, views=4, time_ids=True), SamplingConfig(seed=4), comp)
    settings = dict(max_steps=4, batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-3, warmup_steps=1,
                    ema_decay=0.9, checkpointing_steps=2, checkpoints_total_limit=1, report_to="none")
    tc = Stage2TrainingConfig(**{**settings, **overrides})

    def on_step(step, logs):
        if stop_at is not None and step == stop_at:
            raise _InterruptError

    try:
        result = train_stage2_loop(comp, adapter, data, tc, LossConfig(), output_dir=out, resume=resume, seed=7,
                                   on_step=on_step)
    except _InterruptError:
        return None
    return result


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    full = _run(tmp_path / "full", report_to="tensorboard", validation_steps=4, validation_inference_steps=2)
    assert _run(tmp_path / "cut", stop_at=3) is None
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["checkpoint-00000002"]
    resumed = _run(tmp_path / "cut", resume="latest")
    assert resumed["step"] == 4 and len(resumed["losses"]) == 2
    for a, b in zip(full["losses"][2:], resumed["losses"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    sa, sb = full["adapter"].state_dict(), resumed["adapter"].state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-7) for k in sa)
    assert all(torch.allclose(full["ema"][k], resumed["ema"][k], atol=1e-7) for k in sa)
    # rotation kept only the newest checkpoint; validation grid and tensorboard logs were written
    assert [p.name for p in list_checkpoints(tmp_path / "full")] == ["checkpoint-00000004"]
    assert (tmp_path / "full" / "validation" / "step_00000004.png").is_file()
    assert list((tmp_path / "full" / "logs").rglob("events.out.tfevents.*"))
    # the export holds the EMA weights, not the raw ones
    exported = load_adapter(tmp_path / "full" / "bolid_adapter.safetensors")[0].state_dict()
    assert all(torch.allclose(exported[k], full["ema"][k]) for k in exported)


def test_export_loads_in_the_nodes_loader_and_in_diffusers(tmp_path):
    comp = T.components("sd15", pose=False, clip=False)
    adapter = T.adapter_for(comp)
    data = Stage2Data(T.identities(n=2, views=3), SamplingConfig(), comp)
    tc = Stage2TrainingConfig(max_steps=2, batch_size=2, warmup_steps=0, learning_rate=1e-2, report_to="none",
                              checkpointing_steps=100)
    lc = LossConfig(id_weight=0.0, clip_weight=0.0)
    result = train_stage2_loop(comp, adapter, data, tc, lc, output_dir=tmp_path, seed=0)
    main, face_file, body_file = result["export"]
    loaded, _ = load_adapter(main)
    trained = result["adapter"].state_dict()
    assert all(torch.equal(loaded.state_dict()[k], trained[k].cpu()) for k in trained)
    meta = read_safetensors_metadata(main)
    info = json.loads(meta["bolid_training"])
    assert meta["bolid_base_model"] == "tiny-sd15" and meta["bolid_training_steps"] == "2"
    assert json.loads(meta["bolid_dataset_size"]) == {"identities": 2, "views": 6}
    assert json.loads(meta["bolid_loss_weights"])["id"] == 0.0 and info["stage"] == 2

    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=copy.deepcopy(comp.unet),
                                   scheduler=DDIMScheduler(), feature_extractor=None, image_encoder=None,
                                   safety_checker=None, requires_safety_checker=False)
    pipe.load_ip_adapter([str(tmp_path), str(tmp_path)], subfolder=["", ""],
                         weight_name=[face_file.name, body_file.name], image_encoder_folder=None)
    pipe.set_ip_adapter_scale([1.0, 1.0])
    torch.manual_seed(0)
    sample, text = torch.randn(1, 4, 8, 8), torch.randn(1, 7, CTX)
    face, body = torch.nn.functional.normalize(torch.randn(1, 512), dim=-1), torch.randn(1, T.BODY_DIM)
    with torch.no_grad():
        stock = pipe.unet(sample, torch.tensor([300]), encoder_hidden_states=text,
                          added_cond_kwargs={"image_embeds": [face[:, None], body[:, None]]}).sample
        controller = BoLIDDiffusers.attach(comp.unet, loaded)
        controller.set_identity(face, body)
        ours = comp.unet(sample, torch.tensor([300]), encoder_hidden_states=text).sample
        controller.detach()
    assert (stock - ours).abs().max().item() < 1e-5
