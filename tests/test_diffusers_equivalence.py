"""The diffusers path equals diffusers' own IP-Adapter processors loading the two exported branches."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from tiny_unets import CTX, randomize_, sdxl_added_cond, tiny_sd15_unet, tiny_sdxl_unet

from bolid.adapter_io import export_ip_adapter
from bolid.diffusers_integration import BoLIDDiffusers, adapter_config_for_unet, init_adapter_from_unet

BODY_DIM = 16
LAYOUTS = {
    "sd15": (tiny_sd15_unet, StableDiffusionPipeline, lambda b: None),
    "sdxl": (tiny_sdxl_unet, StableDiffusionXLPipeline, sdxl_added_cond),
}


def _stock_ip_adapter_unet(unet, pipeline_cls, folder, w_face, w_body):
    """A copy of ``unet`` with the two exported files loaded by diffusers' own load_ip_adapter."""
    extra = {"text_encoder_2": None, "tokenizer_2": None} if pipeline_cls is StableDiffusionXLPipeline else {
        "safety_checker": None, "requires_safety_checker": False}
    pipe = pipeline_cls(vae=None, text_encoder=None, tokenizer=None, unet=copy.deepcopy(unet),
                        scheduler=DDIMScheduler(), feature_extractor=None, image_encoder=None, **extra)
    pipe.load_ip_adapter([str(folder), str(folder)], subfolder=["", ""],
                         weight_name=["face.safetensors", "body.safetensors"], image_encoder_folder=None)
    pipe.set_ip_adapter_scale([w_face, w_body])
    return pipe.unet


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize(("w_face", "w_body"), [(0.7, 1.3), (1.0, 0.0), (0.0, 0.5)])
def test_bolid_equals_stock_ip_adapters(layout, w_face, w_body, tmp_path):
    make_unet, pipeline_cls, added = LAYOUTS[layout]
    unet = make_unet()
    config = adapter_config_for_unet(unet, body_dim=BODY_DIM, face_tokens=4, body_tokens=3)
    adapter = randomize_(init_adapter_from_unet(unet, config), seed=3).eval()
    export_ip_adapter(adapter, "face", tmp_path / "face.safetensors")
    export_ip_adapter(adapter, "body", tmp_path / "body.safetensors")
    stock = _stock_ip_adapter_unet(unet, pipeline_cls, tmp_path, w_face, w_body)

    torch.manual_seed(5)
    batch = 2
    sample, text = torch.randn(batch, 4, 8, 8), torch.randn(batch, 7, CTX)
    face = torch.nn.functional.normalize(torch.randn(batch, 512), dim=-1)
    body = torch.randn(batch, BODY_DIM)
    timestep = torch.tensor([500, 20])
    cond = added(batch) or {}

    with torch.no_grad():
        expected = stock(sample, timestep, encoder_hidden_states=text,
                         added_cond_kwargs={**cond, "image_embeds": [face[:, None], body[:, None]]}).sample
        controller = BoLIDDiffusers.attach(unet, adapter, weight_face=w_face, weight_body=w_body)
        controller.set_identity(face, body)
        ours = unet(sample, timestep, encoder_hidden_states=text, added_cond_kwargs=cond or None).sample
        controller.detach()
        base = unet(sample, timestep, encoder_hidden_states=text, added_cond_kwargs=cond or None).sample

    assert (ours - expected).abs().max().item() <= 1e-5
    assert (ours - base).abs().max().item() > 1e-3, "the branches must change the output"


def test_missing_branch_is_the_zero_embedding():
    unet = tiny_sd15_unet()
    adapter = randomize_(init_adapter_from_unet(unet, adapter_config_for_unet(unet, body_dim=BODY_DIM)), seed=4)
    torch.manual_seed(1)
    sample, text, body = torch.randn(2, 4, 8, 8), torch.randn(2, 7, CTX), torch.randn(2, BODY_DIM)
    controller = BoLIDDiffusers.attach(unet, adapter, 0.6, 1.0)
    with torch.no_grad():
        controller.set_identity(None, body)
        implicit = unet(sample, 10, encoder_hidden_states=text).sample
        controller.set_identity(torch.zeros(2, 512), body)
        explicit = unet(sample, 10, encoder_hidden_states=text).sample
        controller.set_identity(None, None)
        off = unet(sample, 10, encoder_hidden_states=text).sample
        controller.detach()
        base = unet(sample, 10, encoder_hidden_states=text).sample
    assert torch.equal(implicit, explicit)
    assert torch.equal(off, base)
