"""IP-Adapter FaceID import: BoLID's face branch equals diffusers' stock load_ip_adapter of the same file.

The FaceID files are built here with the key layout of the public tencent-ailab/IP-Adapter implementation
(``IPAdapterFaceID``): ``image_proj`` = the MLPProjModel (proj.0, proj.2, norm) and ``ip_adapter`` = the state
dict of a ModuleList over ALL attention processors of the UNet, in order: every processor has LoRA layers
``to_{q,k,v,out}_lora.{down,up}.weight`` and the cross-attention ones (odd indices) also ``to_k_ip`` /
``to_v_ip``. ``.bin`` files are ``torch.save({"image_proj": ..., "ip_adapter": ...})``; ``.safetensors`` files
are flat with those two prefixes.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file
from tiny_unets import CTX, sdxl_added_cond, tiny_sd15_unet, tiny_sdxl_unet

from bolid.adapter import MissingBranchError
from bolid.adapter_io import export_ip_adapter, load_adapter
from bolid.diffusers_integration import BoLIDDiffusers
from bolid.faceid import FACEID_SOURCE_KEY, FaceIDFileError, import_faceid, main, write_faceid_adapter
from bolid.safetensors_io import load_safetensors

LORA_RANK = 4
LAYOUTS = {
    "sd15": (tiny_sd15_unet, StableDiffusionPipeline, lambda b: None),
    "sdxl": (tiny_sdxl_unet, StableDiffusionXLPipeline, sdxl_added_cond),
}


def faceid_state_dict(unet, tokens: int = 4, seed: int = 0, plus: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """A FaceID checkpoint for ``unet`` with the public key layout and random (non-trivial) values."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    ctx = unet.config.cross_attention_dim
    image_proj = {"proj.0.weight": rnd(1024, 512, std=0.05), "proj.0.bias": rnd(1024),
                  "proj.2.weight": rnd(ctx * tokens, 1024, std=0.05), "proj.2.bias": rnd(ctx * tokens),
                  "norm.weight": 1 + rnd(ctx), "norm.bias": rnd(ctx)}
    if plus:  # FaceID Plus / Plus v2: the same MLP followed by a perceiver resampler over CLIP features
        image_proj.update({"perceiver_resampler.proj_in.weight": rnd(ctx, 1280),
                           "perceiver_resampler.proj_in.bias": rnd(ctx),
                           "perceiver_resampler.norm_out.weight": rnd(ctx)})
    ip_adapter = {}
    for i, name in enumerate(unet.attn_processors):
        module = unet.get_submodule(name[: -len(".processor")])
        hidden = int(module.to_q.weight.shape[0])
        cross = ctx if not name.endswith("attn1.processor") else hidden
        for proj, (n_in, n_out) in {"to_q": (hidden, hidden), "to_k": (cross, hidden), "to_v": (cross, hidden),
                                    "to_out": (hidden, hidden)}.items():
            ip_adapter[f"{i}.{proj}_lora.down.weight"] = rnd(LORA_RANK, n_in)
            ip_adapter[f"{i}.{proj}_lora.up.weight"] = rnd(n_out, LORA_RANK)
        if not name.endswith("attn1.processor"):
            ip_adapter[f"{i}.to_k_ip.weight"] = rnd(hidden, ctx)
            ip_adapter[f"{i}.to_v_ip.weight"] = rnd(hidden, ctx)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def write_faceid(state: dict[str, dict[str, torch.Tensor]], path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({f"{part}.{k}": v.contiguous() for part, d in state.items() for k, v in d.items()}, str(path))
    else:
        torch.save(state, str(path))
    return path


def _stock(unet, pipeline_cls, path: Path, scale: float, monkeypatch):
    # diffusers would also merge the file's LoRA into the UNet when peft is installed; BoLID leaves that LoRA to
    # ComfyUI's LoraLoaderModelOnly, so the comparison is of the IP-Adapter part alone
    import diffusers.loaders.ip_adapter as ip_loader

    monkeypatch.setattr(ip_loader, "USE_PEFT_BACKEND", False, raising=False)
    extra = {"text_encoder_2": None, "tokenizer_2": None} if pipeline_cls is StableDiffusionXLPipeline else {
        "safety_checker": None, "requires_safety_checker": False}
    pipe = pipeline_cls(vae=None, text_encoder=None, tokenizer=None, unet=copy.deepcopy(unet),
                        scheduler=DDIMScheduler(), feature_extractor=None, image_encoder=None, **extra)
    pipe.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(scale)
    return pipe.unet


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_imported_face_branch_equals_stock_load_ip_adapter(layout, suffix, tmp_path, monkeypatch):
    make_unet, pipeline_cls, added = LAYOUTS[layout]
    unet = make_unet()
    path = write_faceid(faceid_state_dict(unet), tmp_path / f"ip-adapter-faceid_{layout}{suffix}")
    out = write_faceid_adapter(path, tmp_path / "models" / "bolid")
    adapter, _ = load_adapter(out)  # through the ComfyUI loader's own validation
    assert not adapter.config.body_branch and adapter.branches == ("face",)
    assert adapter.config.face_tokens == 4 and adapter.config.context_dim == CTX
    scale = 0.8
    stock = _stock(unet, pipeline_cls, path, scale, monkeypatch)

    torch.manual_seed(5)
    batch = 2
    sample, text = torch.randn(batch, 4, 8, 8), torch.randn(batch, 7, CTX)
    face = torch.nn.functional.normalize(torch.randn(batch, 512), dim=-1)
    timestep = torch.tensor([500, 20])
    cond = added(batch) or {}
    with torch.no_grad():
        expected = stock(sample, timestep, encoder_hidden_states=text,
                         added_cond_kwargs={**cond, "image_embeds": [face[:, None]]}).sample
        controller = BoLIDDiffusers.attach(unet, adapter, weight_face=scale, weight_body=1.0)
        controller.set_identity(face)
        ours = unet(sample, timestep, encoder_hidden_states=text, added_cond_kwargs=cond or None).sample
        with pytest.raises(MissingBranchError, match="no body branch"):
            controller.set_identity(face, torch.zeros(batch, 8))
        controller.detach()
        base = unet(sample, timestep, encoder_hidden_states=text, added_cond_kwargs=cond or None).sample
    assert (ours - expected).abs().max().item() <= 1e-5
    assert (ours - base).abs().max().item() > 1e-3, "the face branch must change the output"
    # the face branch exports back to a stock file holding exactly the FaceID weights (LoRA keys dropped)
    export_ip_adapter(adapter, "face", tmp_path / "back.safetensors")
    back, _ = load_safetensors(tmp_path / "back.safetensors")
    src = faceid_state_dict(unet)
    for key, value in back.items():
        part, _, rest = key.partition(".")
        assert torch.equal(value, src[part][rest]), key
    with pytest.raises(MissingBranchError):
        export_ip_adapter(adapter, "body", tmp_path / "body.safetensors")


def test_lora_keys_ignored_with_a_note(tmp_path, caplog):
    unet = tiny_sd15_unet()
    state = faceid_state_dict(unet)
    n_lora = sum("_lora." in k for k in state["ip_adapter"])
    assert n_lora == 8 * len(unet.attn_processors)
    path = write_faceid(state, tmp_path / "ip-adapter-faceid_sd15.bin")
    with caplog.at_level(logging.INFO, logger="bolid"):
        result = import_faceid(path)
    assert result.lora_keys_ignored == n_lora
    assert "LoraLoaderModelOnly" in caplog.text
    assert not any("lora" in k for k in result.adapter.state_dict())
    out = write_faceid_adapter(path, tmp_path / "faceid.safetensors")
    _, meta = load_safetensors(out)
    assert meta[FACEID_SOURCE_KEY] == "ip-adapter-faceid_sd15.bin"
    assert meta["bolid_faceid_lora_keys_ignored"] == str(n_lora)
    # a FaceID file without LoRA (FaceID Portrait style, 16 tokens) imports too
    no_lora = faceid_state_dict(unet, tokens=16)
    no_lora["ip_adapter"] = {k: v for k, v in no_lora["ip_adapter"].items() if "_lora." not in k}
    portrait = import_faceid(write_faceid(no_lora, tmp_path / "portrait.safetensors"))
    assert portrait.lora_keys_ignored == 0 and portrait.adapter.config.face_tokens == 16


def test_plus_and_image_adapters_are_refused(tmp_path):
    unet = tiny_sd15_unet()
    plus = write_faceid(faceid_state_dict(unet, plus=True), tmp_path / "ip-adapter-faceid-plusv2_sd15.bin")
    with pytest.raises(FaceIDFileError, match=r"FaceID Plus / Plus v2 .*CLIP-vision"):
        import_faceid(plus)
    image = faceid_state_dict(unet)
    image["image_proj"] = {"proj.weight": torch.zeros(CTX * 4, 1024), "proj.bias": torch.zeros(CTX * 4),
                           "norm.weight": torch.ones(CTX), "norm.bias": torch.zeros(CTX)}
    with pytest.raises(FaceIDFileError, match="not the FaceID MLP"):
        import_faceid(write_faceid(image, tmp_path / "ip-adapter_sd15.safetensors"))
    full_face = faceid_state_dict(unet)
    full_face["image_proj"]["proj.0.weight"] = torch.zeros(1024, 1024)
    with pytest.raises(FaceIDFileError, match="CLIP image embedding"):
        import_faceid(write_faceid(full_face, tmp_path / "full.bin"))
    broken = faceid_state_dict(unet)
    del broken["ip_adapter"]["3.to_v_ip.weight"]
    with pytest.raises(FaceIDFileError, match="layer 3 lacks"):
        import_faceid(write_faceid(broken, tmp_path / "broken.bin"))


class _Payload:
    """Any object outside torch's weights-only allow-list."""


def test_bin_is_never_fully_unpickled(tmp_path):
    path = tmp_path / "evil.bin"
    torch.save({"image_proj": {"proj.0.weight": torch.zeros(2)}, "ip_adapter": {}, "x": _Payload()}, str(path))
    with pytest.raises(FaceIDFileError, match=r"weights_only=True.*never unpickles"):
        import_faceid(path)
    with pytest.raises(FaceIDFileError, match="not found"):
        import_faceid(tmp_path / "missing.bin")
    (tmp_path / "weird.onnx").write_bytes(b"x")
    with pytest.raises(FaceIDFileError, match="unsupported file type"):
        import_faceid(tmp_path / "weird.onnx")


def test_cli_import(tmp_path, caplog):
    unet = tiny_sdxl_unet()
    path = write_faceid(faceid_state_dict(unet), tmp_path / "ip-adapter-faceid_sdxl.bin")
    with caplog.at_level(logging.INFO, logger="bolid"):
        assert main(["import", str(path), "--out", str(tmp_path / "out")]) == 0
    written = tmp_path / "out" / "bolid_ip-adapter-faceid_sdxl.safetensors"
    assert written.is_file() and "face branch only" in caplog.text
    assert main(["import", str(tmp_path / "nope.bin"), "--out", str(tmp_path)]) == 2
