"""Stage 2 from a config file: local diffusers folders (SD1.5 trained end to end, SDXL loaded), the cache, the
train.py entry, resume, and clear errors for missing files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import stage2_tiny as T
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from test_stage1_training import FakePoseRunner, make_dataset
from tiny_unets import CTX, tiny_sd15_unet, tiny_sdxl_unet
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from bolid.adapter_io import load_adapter
from bolid.body_encoder import BodyEncoder, BodyEncoderConfig
from bolid.body_encoder_io import save_body_encoder
from bolid.dataset import dataset_config_from_dict
from bolid.dataset_prepare import prepare_dataset
from bolid.safetensors_io import read_safetensors_metadata
from training import train
from training.models import BaseModelError, load_base_model, make_encode_text


def _tokenizer() -> CLIPTokenizer:
    import open_clip

    simple = open_clip.SimpleTokenizer()
    merges = [tuple(pair) for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])]
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(k, k): v for k, v in simple.encoder.items()}
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    assert len(tok) == 49408  # transformers 5 adds missing special tokens silently: check nothing was added
    return tok


def _text_config(hidden: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=2,
                          num_hidden_layers=2, max_position_embeddings=77, projection_dim=8)


def save_tiny_pipeline(folder: Path, family: str) -> Path:
    torch.manual_seed(0)
    vae, tok = T.tiny_vae(), _tokenizer()
    if family == "sd15":
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(_text_config(CTX)), tokenizer=tok,
                                       unet=tiny_sd15_unet(), scheduler=DDPMScheduler(), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    else:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(_text_config(CTX // 2)), tokenizer=tok,
                                         text_encoder_2=CLIPTextModelWithProjection(_text_config(CTX // 2)),
                                         tokenizer_2=tok, unet=tiny_sdxl_unet(), scheduler=DDPMScheduler())
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stage2cfg")
    runner = FakePoseRunner()
    make_dataset(tmp / "data", runner, identities=3, views=3)
    dataset = {"cache_dir": str(tmp / "cache1"), "min_resolution": 64, "crop_size": 32,
               "subsets": [{"root": str(tmp / "data")}]}
    prepare_dataset(dataset_config_from_dict(dataset), runner, crop_margin=1.15)
    torch.manual_seed(0)
    save_body_encoder(BodyEncoder(BodyEncoderConfig(latent_dim=16, crop_size=32, decoder_size=16, width=8,
                                                    hidden=32)), tmp / "body_encoder.safetensors")
    save_tiny_pipeline(tmp / "sd15", "sd15")
    return {"tmp": tmp, "dataset": dataset}


def _config(setup, out: Path, **model) -> Path:
    tmp = setup["tmp"]
    lines = [
        "stage = 2", f'output_dir = "{out}"', "seed = 5",
        "[model]", f'pretrained = "{tmp / "sd15"}"', f'body_encoder = "{tmp / "body_encoder.safetensors"}"',
        *[f'{k} = "{v}"' for k, v in model.items()],
        "[adapter]", "face_tokens = 2", "body_tokens = 2",
        "[dataset]", f'cache_dir = "{setup["dataset"]["cache_dir"]}"', "min_resolution = 64", "crop_size = 32",
        "[[dataset.subsets]]", f'root = "{tmp / "data"}"',
        "[cache]", f'dir = "{tmp / "cache2"}"', "resolution = 32", "step = 16",
        "[training]", "max_steps = 2", "batch_size = 2", "warmup_steps = 0", "checkpointing_steps = 1",
        "checkpoints_total_limit = 1", 'report_to = "none"',
    ]
    path = out.parent / f"{out.name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_train_py_stage2_end_to_end_and_resume(setup, tmp_path):
    out = tmp_path / "run"
    config = _config(setup, out)
    assert train.main(["--config", str(config)]) == 0
    adapter, _ = load_adapter(out / "bolid_adapter.safetensors")
    assert adapter.config.body_dim == 16 and adapter.config.num_layers == 16
    meta = read_safetensors_metadata(out / "bolid_adapter.safetensors")
    assert meta["bolid_training_steps"] == "2" and meta["bolid_base_model"] == "sd15:sd15"
    assert json.loads(meta["bolid_dataset_size"]) == {"identities": 3, "views": 9}
    encoder_meta = read_safetensors_metadata(setup["tmp"] / "body_encoder.safetensors")
    assert meta["bolid_body_encoder_hash"] == encoder_meta["bolid_encoder_hash"] != ""
    for branch in ("face", "body"):
        assert (out / f"bolid_adapter.{branch}_ip_adapter.safetensors").is_file()
    # the cache holds latents at the bucket, SDXL size conditioning and keypoints moved into the bucket's frame
    cache = setup["tmp"] / "cache2"
    files = sorted(p for p in cache.glob("*.safetensors") if p.name != "text_embeddings.safetensors")
    assert len(files) == 3
    from safetensors.torch import load_file

    t = load_file(str(files[0]))
    assert t["latent.0"].shape == (4, 16, 16) and t["time_ids"][0].tolist() == [96, 96, 0, 0, 32, 32]
    assert t["body_mu"].shape == (3, 16) and not t["face_valid"].any()
    # the colours at body landmarks of each view (L_id's appearance term), read from the photo in the bucket's frame
    assert t["appearance"].shape == t["appearance_confidence"].shape == (3, 12)
    assert 0 <= float(t["appearance"].min()) and float(t["appearance"].max()) <= 1
    assert float(t["appearance_confidence"].max()) > 0
    mtime = files[0].stat().st_mtime_ns
    # resume: the newest checkpoint is step 2 = max_steps, so nothing more is trained; the cache is reused
    config2 = _config(setup, out)
    text = config2.read_text().replace("max_steps = 2", "max_steps = 3")
    config2.write_text(text)
    assert train.main(["--config", str(config2), "--resume", "latest"]) == 0
    assert read_safetensors_metadata(out / "bolid_adapter.safetensors")["bolid_training_steps"] == "3"
    assert files[0].stat().st_mtime_ns == mtime
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-00000003"]


def test_missing_files_are_named(setup, tmp_path):
    config = _config(setup, tmp_path / "bad", unet_weights=str(tmp_path / "nowhere" / "lightning_unet.safetensors"))
    with pytest.raises(BaseModelError, match="lightning_unet.safetensors"):
        from training.stage2 import Stage2Config, build

        build(Stage2Config.from_dict(train.load_config(config), config.parent))
    with pytest.raises(BaseModelError, match="config_dir"):
        load_base_model(setup["tmp"] / "body_encoder.safetensors")
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "unet").mkdir()
    with pytest.raises(BaseModelError, match="vae"):
        load_base_model(folder)


def test_sdxl_folder_and_unet_weights(tmp_path):
    folder = save_tiny_pipeline(tmp_path / "sdxl", "sdxl")
    base = load_base_model(folder)
    assert base.family == "sdxl" and len(base.text_encoders) == 2
    embeds, pooled = make_encode_text(base)(["a photo", ""])
    assert embeds.shape == (2, 77, CTX) and pooled.shape == (2, 8)
    # a Lightning-style UNet file (diffusers keys) replaces the UNet weights
    from safetensors.torch import save_file

    other = tiny_sdxl_unet(seed=7)
    save_file(other.state_dict(), str(tmp_path / "lightning_unet.safetensors"))
    swapped = load_base_model(folder, unet_weights=tmp_path / "lightning_unet.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(swapped.unet.state_dict().values(), other.state_dict().values(),
                                                  strict=True))
    assert "lightning_unet" in swapped.source


def test_stage1_crop_margin_must_match_the_body_encoder(tmp_path):
    from types import SimpleNamespace

    from bolid.dataset import DatasetCacheError
    from training.stage2_cache import _check_crop_margin

    encoder = SimpleNamespace(config=SimpleNamespace(crop_margin=1.15))
    _check_crop_margin(tmp_path / "a.safetensors", {"crop_margin": "1.15"}, encoder)
    _check_crop_margin(tmp_path / "a.safetensors", {}, encoder)  # written before the margin was recorded
    with pytest.raises(DatasetCacheError, match=r"a\.safetensors was cropped with crop_margin 1\.3.*uses 1\.15"):
        _check_crop_margin(tmp_path / "a.safetensors", {"crop_margin": "1.3"}, encoder)


def test_face_branch_from_faceid_stays_bit_identical_and_body_learns(setup, tmp_path, caplog):
    """[adapter] face_init: the FaceID weights become the face branch, frozen (EMA on); the body branch trains."""
    from test_faceid import faceid_state_dict, write_faceid

    from bolid.diffusers_integration import cross_attention_modules

    base = load_base_model(setup["tmp"] / "sd15")
    faceid = faceid_state_dict(base.unet, tokens=4, seed=3)
    path = write_faceid(faceid, tmp_path / "ip-adapter-faceid_sd15.bin")
    out = tmp_path / "faceid_run"
    config = _config(setup, out)
    text = config.read_text().replace("[adapter]\n", f'[adapter]\nface_init = "{path}"\n')
    config.write_text(text + "ema_decay = 0.9\nlearning_rate = 0.01\n")
    assert train.main(["--config", str(config)]) == 0
    adapter, _ = load_adapter(out / "bolid_adapter.safetensors")
    assert adapter.config.face_tokens == 4 and adapter.config.body_branch  # token count from the file, not the config
    for key, value in adapter.face_proj.state_dict().items():
        assert torch.equal(value, faceid["image_proj"][key]), key
    layers = cross_attention_modules(base.unet)
    body_moved = 0
    for i, (_, module) in enumerate(layers):
        to_k, to_v = adapter.layer(i).projections("face")
        assert torch.equal(to_k.weight, faceid["ip_adapter"][f"{2 * i + 1}.to_k_ip.weight"])
        assert torch.equal(to_v.weight, faceid["ip_adapter"][f"{2 * i + 1}.to_v_ip.weight"])
        body_k, _ = adapter.layer(i).projections("body")
        body_moved += not torch.equal(body_k.weight, module.to_k.weight)  # initialised from the UNet's to_k
    assert body_moved == len(layers), "every layer's body K must have trained"
    training = json.loads(read_safetensors_metadata(out / "bolid_adapter.safetensors")["bolid_training"])
    assert training["face_init"] == "ip-adapter-faceid_sd15.bin"
    plus = write_faceid(faceid_state_dict(base.unet, plus=True), tmp_path / "ip-adapter-faceid-plusv2_sd15.bin")
    config.write_text(text.replace(str(path), str(plus)))
    with caplog.at_level("ERROR", logger="bolid"):
        assert train.main(["--config", str(config)]) == 2
    assert "FaceID Plus / Plus v2" in caplog.text
