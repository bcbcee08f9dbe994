"""Captioning in the stage-1 prepare step with a tiny random BLIP-2 saved as a local folder: photos without a
caption get one, user captions are kept, the caption cache is reused and invalidated, missing folders are clear
errors, the word filter and the prepare report."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_stage1_training import FakePoseRunner, identity_params, write_views
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessor,
    CLIPImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from bolid.identity_cache import load_identity_caches
from bolid.safetensors_io import read_safetensors_metadata
from training import captions as C
from training import train
from training.stage1 import Stage1Config, prepare_stage1

WORDS = ("a person man woman tall slim young in on at the with red blue black white shirt dress jeans jacket "
         "standing sitting walking beach street park room question what is are wearing how posed where they "
         "answer").split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A WordPiece tokenizer over a fixed word list, built offline (random captions decode to these words)."""
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", *WORDS, ",", "?", ":", "."])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
                                   unk_token="[UNK]")


def save_tiny_blip2(folder: Path, seed: int = 0) -> Path:
    """A random BLIP-2 (ViT + Q-Former + OPT, hidden size 16) and its processor, saved with save_pretrained."""
    tok = tiny_tokenizer()
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok,
                               num_query_tokens=4)  # adds the <image> token
    vocab = len(tok)
    config = Blip2Config(
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8, "initializer_range": 1.0},
        qformer_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                        "encoder_hidden_size": 16, "vocab_size": vocab},
        # no EOS: every caption runs to max_new_tokens, so none is empty by chance; a wide init gives word variety
        text_config={"model_type": "opt", "hidden_size": 16, "ffn_dim": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "vocab_size": vocab, "word_embed_proj_dim": 16,
                     "max_position_embeddings": 128, "init_std": 1.0, "bos_token_id": tok.bos_token_id,
                     "eos_token_id": None, "pad_token_id": tok.pad_token_id},
        num_query_tokens=4, image_token_index=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    Blip2ForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                 "<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def save_tiny_llava(folder: Path) -> Path:
    """A random LLaVA (CLIP vision tower + Llama) with a chat template: a model that loads only through
    transformers' generic image-text-to-text classes."""
    tok = tiny_tokenizer()
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE)
    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 16, "intermediate_size": 32,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
                       "projection_dim": 16},
        text_config={"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": len(tok),
                     "max_position_embeddings": 128, "initializer_range": 1.0, "bos_token_id": tok.bos_token_id,
                     "eos_token_id": None, "pad_token_id": tok.pad_token_id},
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def blip2(tmp_path_factory) -> Path:
    return save_tiny_blip2(tmp_path_factory.mktemp("blip2") / "tiny-blip2")


def make_photos(root: Path, runner: FakePoseRunner) -> None:
    """alice: 3 photos without captions; bob: 3 photos with the user's captions."""
    rng = np.random.default_rng(0)
    write_views(root / "alice", identity_params(rng), 3, rng, runner)
    write_views(root / "bob", identity_params(rng), 3, rng, runner, caption="bob by the user")


def stage1_config(tmp: Path, **captions) -> Stage1Config:
    raw = {"stage": 1, "output_dir": str(tmp / "out"),
           "model": {"latent_dim": 16, "crop_size": 32, "decoder_size": 16, "width": 8, "hidden": 64},
           "dataset": {"cache_dir": str(tmp / "cache"), "min_resolution": 64, "crop_size": 32,
                       "subsets": [{"root": str(tmp / "data")}]}}
    if captions:
        raw["captions"] = {"max_new_tokens": 6, "batch_size": 2, **captions}
    return Stage1Config.from_dict(raw)


class CountingLoader:
    """load_captioner, counting the loads and the photos the model captions."""

    def __init__(self, load) -> None:
        self.load = load
        self.loads = 0
        self.photos = 0

    def __call__(self, config: C.CaptionConfig):
        self.loads += 1
        captioner = self.load(config)

        def run(images):
            self.photos += len(images)
            return captioner(images)

        return run


@pytest.fixture()
def counting(monkeypatch) -> CountingLoader:
    loader = CountingLoader(C.load_captioner)
    monkeypatch.setattr(C, "load_captioner", loader)
    return loader


def captions_by_file(cache_dir: Path) -> dict[str, tuple[str, str]]:
    out = {}
    for c in load_identity_caches(cache_dir):
        sources = json.loads(read_safetensors_metadata(c.path)["caption_sources"])
        for name, text, source in zip(c.files, c.captions, sources, strict=True):
            out[f"{c.identity}/{name}"] = (text, source)
    return out


def test_photos_without_captions_get_one_and_user_captions_are_kept(tmp_path, blip2, counting):
    runner = FakePoseRunner()
    make_photos(tmp_path / "data", runner)
    whole = (tmp_path / "data" / "alice" / "00.png").read_bytes()
    (tmp_path / "data" / "alice" / "broken.png").write_bytes(whole[: len(whole) // 2])  # header only
    config = stage1_config(tmp_path, model=str(blip2))
    prepare_stage1(config, runner)
    assert (counting.loads, counting.photos) == (1, 3)  # only alice's photos went through the model
    got = captions_by_file(tmp_path / "cache")
    for j in range(3):
        text, source = got[f"alice/{j:02d}.png"]
        assert source == "model" and 1 <= len(text.split()) <= 6  # the prompt is not part of the caption
        assert got[f"bob/{j:02d}.png"] == (f"bob by the user, view {j}", "file")
    report = json.loads((tmp_path / "cache" / "prepare_report.json").read_text())
    assert report["captions"] == {"file": 3, "model": 3, "none": 0}
    assert [(Path(p).name, why.split(" ")[0]) for p, why in report["skipped"]] == [("broken.png", "unreadable")]
    assert not (tmp_path / "data" / "alice" / "00.txt").exists()  # nothing is written next to the photos
    cached = json.loads((tmp_path / "cache" / C.CACHE_FILE).read_text())
    assert sorted(Path(p).name for p in cached["photos"]) == ["00.png", "01.png", "02.png"]
    assert {e["caption"] for e in cached["photos"].values()} == {got[f"alice/{j:02d}.png"][0] for j in range(3)}

    # overwrite = true: the model captions bob's photos too; his files stay as they were
    prepare_stage1(stage1_config(tmp_path, model=str(blip2), overwrite=True), runner)
    assert counting.photos == 3 + 3
    got = captions_by_file(tmp_path / "cache")
    assert {got[f"bob/{j:02d}.png"][1] for j in range(3)} == {"model"}
    assert (tmp_path / "data" / "bob" / "01.txt").read_text() == "bob by the user, view 1"


def test_caption_cache_is_reused_and_invalidated(tmp_path, blip2, counting):
    runner = FakePoseRunner()
    make_photos(tmp_path / "data", runner)
    prepare_stage1(stage1_config(tmp_path, model=str(blip2)), runner)
    assert (counting.loads, counting.photos) == (1, 3)
    first = captions_by_file(tmp_path / "cache")
    pose_calls = runner.calls

    # unchanged photos and captioner: the model is not even loaded, and the stage-1 cache is reused too
    prepare_stage1(stage1_config(tmp_path, model=str(blip2)), runner)
    assert (counting.loads, counting.photos) == (1, 3)
    assert runner.calls == pose_calls
    assert captions_by_file(tmp_path / "cache") == first
    report = json.loads((tmp_path / "cache" / "prepare_report.json").read_text())
    assert report["captions"] == {"file": 3, "model": 3, "none": 0}  # counted from the reused caches

    # a changed photo is captioned again, alone
    photo = tmp_path / "data" / "alice" / "01.png"
    before = np.asarray(Image.open(photo).convert("RGB"))
    after = np.ascontiguousarray(before[:, ::-1])
    Image.fromarray(after).save(photo)
    runner.table[runner.key(after)] = runner.table[runner.key(before)]  # the fake pose model still finds someone
    prepare_stage1(stage1_config(tmp_path, model=str(blip2)), runner)
    assert (counting.loads, counting.photos) == (2, 4)

    # a user caption removed: that photo now gets a model caption
    (tmp_path / "data" / "bob" / "02.txt").unlink()
    prepare_stage1(stage1_config(tmp_path, model=str(blip2)), runner)
    assert (counting.loads, counting.photos) == (3, 5)
    assert captions_by_file(tmp_path / "cache")["bob/02.png"][1] == "model"

    # another prompt, or other model files: every photo that needs a caption is captioned again
    prepare_stage1(stage1_config(tmp_path, model=str(blip2), prompt="a photo of"), runner)
    assert (counting.loads, counting.photos) == (4, 9)
    other = save_tiny_blip2(tmp_path / "other-blip2", seed=1)
    prepare_stage1(stage1_config(tmp_path, model=str(other), prompt="a photo of"), runner)
    assert (counting.loads, counting.photos) == (5, 13)
    prepare_stage1(stage1_config(tmp_path, model=str(other), prompt="a photo of"), runner)
    assert counting.loads == 5

    # the word filter applies to cached captions: changing it needs no model run
    prepare_stage1(stage1_config(tmp_path, model=str(other), prompt="a photo of", drop_words=list(WORDS)), runner)
    assert counting.loads == 5
    got = captions_by_file(tmp_path / "cache")
    assert all(text.strip(" ,.?:") == "" for text, source in got.values() if source != "file")


def test_word_filter_and_its_log(tmp_path, blip2, caplog):
    f = C.WordFilter(["man", "woman", "tall"], {"young man": "person"})
    assert f("A tall man, in a red shirt") == ("A, in a red shirt", {"tall": 1, "man": 1})
    text, hits = f("a young man and a woman walking, tall")
    assert text == "a person and a walking"
    assert hits == {"young man": 1, "woman": 1, "tall": 1}
    assert f("manly human") == ("manly human", {})  # whole words only
    assert not C.WordFilter()

    runner = FakePoseRunner()
    make_photos(tmp_path / "data", runner)
    prepare_stage1(stage1_config(tmp_path, model=str(blip2), prompt="", max_new_tokens=12), runner)
    raw = json.loads((tmp_path / "cache" / C.CACHE_FILE).read_text())["photos"]
    assert len(raw) == 3
    # words the random model did write (its first word of every caption), plus some it may not have
    drop = sorted({e["caption"].split()[0] for e in raw.values()} | {"man", "woman"})
    with caplog.at_level(logging.INFO, logger="bolid"):
        prepare_stage1(stage1_config(tmp_path, model=str(blip2), prompt="", max_new_tokens=12, drop_words=drop),
                       runner)
    assert "the word filter changed 3 of 3 model captions" in caplog.text
    got = captions_by_file(tmp_path / "cache")
    word_filter = C.WordFilter(drop)
    for path, entry in raw.items():
        filtered, hits = word_filter(entry["caption"])
        assert hits and got[f"alice/{Path(path).name}"] == (filtered, "model")
        assert not set(filtered.lower().split()) & set(drop)
    assert got["bob/00.png"] == ("bob by the user, view 0", "file")  # user captions are not filtered


def test_any_local_image_text_to_text_chat_model(tmp_path, caplog):
    llava = save_tiny_llava(tmp_path / "tiny-llava")
    runner = FakePoseRunner()
    make_photos(tmp_path / "data", runner)
    config = stage1_config(tmp_path, model=str(llava))
    with caplog.at_level(logging.INFO, logger="bolid"):
        result = C.caption_dataset(config.dataset, config.captions)
    assert "llava model from" in caplog.text and C.DEFAULT_INSTRUCTION in caplog.text  # the chat prompt
    assert (result.kept_files, result.generated, result.reused) == (3, 3, 0)
    assert sorted(Path(p).parent.name for p in result.captions) == ["alice"] * 3
    assert all(1 <= len(t.split()) <= 6 for t in result.captions.values())  # the chat prompt is not returned
    captioner = C.load_captioner(config.captions)
    assert captioner.text.startswith(f"user: <image>{C.DEFAULT_INSTRUCTION}")
    assert captioner.text.endswith("assistant:")


def test_missing_or_incomplete_model_folder_is_a_clear_error(tmp_path, blip2):
    runner = FakePoseRunner()
    make_photos(tmp_path / "data", runner)
    missing = tmp_path / "models" / "blip2-opt-2.7b"
    with pytest.raises(C.CaptionModelError, match=rf"folder {missing} .*does not exist.*nothing is downloaded"):
        prepare_stage1(stage1_config(tmp_path, model=str(missing)), runner)
    assert runner.calls == 0  # refused before the pose model runs
    missing.mkdir(parents=True)
    (missing / "config.json").write_text((blip2 / "config.json").read_text())
    with pytest.raises(C.CaptionModelError, match=rf"{missing} has no \*\.safetensors weights"):
        prepare_stage1(stage1_config(tmp_path, model=str(missing)), runner)
    (missing / "model.safetensors").write_bytes((blip2 / "model.safetensors").read_bytes())
    with pytest.raises(C.CaptionModelError, match=rf"{missing}: the blip-2 model or its processor cannot be loaded"):
        prepare_stage1(stage1_config(tmp_path, model=str(missing)), runner)  # no processor/tokenizer files
    (missing / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(C.CaptionModelError, match=r"holds a 'bert' model, which is not an image-text-to-text"):
        prepare_stage1(stage1_config(tmp_path, model=str(missing)), runner)
    with pytest.raises(C.CaptionConfigError, match=r"\[captions\] has unknown keys \['modle'\]"):
        stage1_config(tmp_path, model=str(blip2), modle="x")


def test_example_config_captions_table_parses():
    import tomllib

    path = Path(__file__).resolve().parents[1] / "training" / "configs" / "stage1_example.toml"
    lines = path.read_text().splitlines()
    start = lines.index("# [captions]")
    block = []
    for line in lines[start:]:
        if not line.startswith("# "):
            break
        block.append(line[2:])
    config = C.caption_config_from_dict(tomllib.loads("\n".join(block))["captions"], path.parent)
    assert config.model.endswith("blip2-opt-2.7b") and config.prompt is None and not config.overwrite
    assert C.WordFilter(config.drop_words, config.replace_words)("a young man, tall")[0] == "a person"


def test_caption_model_cli_flag(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("training.stage1.prepare_stage1", lambda config, pose_runner=None: seen.update(c=config))
    config = tmp_path / "stage1.toml"
    config.write_text(f'stage = 1\noutput_dir = "out"\n[dataset]\ncache_dir = "cache"\n[[dataset.subsets]]\n'
                      f'root = "{tmp_path}"\n[captions]\nmodel = "from-config"\ndrop_words = ["man"]\n')
    monkeypatch.chdir(tmp_path)
    assert train.main(["--config", str(config), "--prepare-only", "--caption-model", "models/blip2"]) == 0
    assert seen["c"].captions.model == str(tmp_path / "models" / "blip2")  # relative to the working directory
    assert seen["c"].captions.drop_words == ("man",)
    stage2 = tmp_path / "stage2.toml"
    stage2.write_text('stage = 2\noutput_dir = "out"\n')
    assert train.main(["--config", str(stage2), "--caption-model", "models/blip2"]) == 2
