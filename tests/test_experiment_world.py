"""The experiment's world and instrument: the oracle vector is standardised, identities are visible to the pose
model's readout, and the failed-render check rejects broken figures (also kinds it never saw in training)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bolid.synthetic import HAIR_COLOURS, ORACLE_DIM, SKIN_TONES, make_identity, tokenize
from training.experiment.render_check import HELD_OUT_BREAKS, TRAINED_BREAKS, break_photo, render_failed
from training.experiment.world_models import WorldPoseNet, load_module, render_world_photo, to_model_range

REPO_ROOT = Path(__file__).resolve().parents[1]
POSE = REPO_ROOT / "training" / "experiment_assets" / "pose_net.safetensors"
UNSEEN = 3_000_000  # identities no pretraining, stage or experiment uses


def test_oracle_vector_is_standardised_over_people():
    vecs = np.stack([make_identity(0, i).oracle_vector() for i in range(4000)])
    assert vecs.shape == (4000, ORACLE_DIM)
    cont = vecs[:, :8]
    assert np.allclose(cont.mean(0), 0, atol=0.06) and np.allclose(cont.std(0), 1, atol=0.06)
    skin, hair = vecs[:, 8 : 8 + len(SKIN_TONES)], vecs[:, 8 + len(SKIN_TONES) :]
    assert np.all(skin.sum(1) == 1) and np.all(hair.sum(1) == 1) and hair.shape[1] == len(HAIR_COLOURS)


def test_breaks_change_the_image_and_are_deterministic():
    photos = [render_world_photo(make_identity(0, UNSEEN + i), i) for i in range(2)]
    for kind in TRAINED_BREAKS + HELD_OUT_BREAKS:
        a = break_photo(photos[0], kind, np.random.default_rng(1), other=photos[1])
        b = break_photo(photos[0], kind, np.random.default_rng(1), other=photos[1])
        assert a.shape == photos[0].image.shape and a.dtype == np.uint8 and np.array_equal(a, b)
        assert np.abs(a.astype(int) - photos[0].image).mean() > 1.0, kind
    with pytest.raises(ValueError, match="unknown break"):
        break_photo(photos[0], "nope", np.random.default_rng(0))


@pytest.fixture(scope="module")
def pose_net():
    if not POSE.is_file():
        pytest.skip("world models not committed")
    net = WorldPoseNet()
    load_module(net, POSE, "world_pose_net")
    return net.eval()


@pytest.fixture(scope="module")
def unseen_photos():
    return [render_world_photo(make_identity(0, UNSEEN + i), 17 + i) for i in range(96)]


def _failed(net: WorldPoseNet, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return render_failed(net(to_model_range(images)))


def test_failed_render_check_accepts_clean_figures_and_rejects_broken_ones(pose_net, unseen_photos):
    clean = np.stack([p.image for p in unseen_photos])
    assert _failed(pose_net, clean).mean() <= 0.05
    rng = np.random.default_rng(5)
    rates = {}
    for kind in TRAINED_BREAKS + HELD_OUT_BREAKS:
        broken = np.stack([break_photo(p, kind, rng, other=unseen_photos[(i + 1) % len(unseen_photos)])
                           for i, p in enumerate(unseen_photos)])
        rates[kind] = float(_failed(pose_net, broken).mean())
    assert rates["blank"] == 1.0
    assert np.mean([rates[k] for k in TRAINED_BREAKS]) >= 0.8, rates
    assert np.mean([rates[k] for k in HELD_OUT_BREAKS]) >= 0.6, rates  # never seen in training


def test_appearance_readout_sees_the_identity(pose_net, unseen_photos):
    with torch.no_grad():
        out = pose_net(to_model_range(np.stack([p.image for p in unseen_photos])))
    idents = [make_identity(0, p.identity) for p in unseen_photos]
    skin = (out["skin"].argmax(1).numpy() == np.array([i.skin_index for i in idents])).mean()
    hair = (out["hair"].argmax(1).numpy() == np.array([i.hair_index for i in idents])).mean()
    assert skin >= 0.8 and hair >= 0.8, (skin, hair)


def test_identity_words_are_only_in_pretraining_captions():
    """The base model learns a word -> skin / hair / proportion route from pretraining captions that name them; the
    experiment's captions (stage 2, generation, the text-only arm) never do, so text only stays identity-free."""
    from dataclasses import replace

    from bolid.synthetic import BONE_RANGES, caption_vocabulary, render_identity_photos
    from training.experiment.world_models import (
        HAIR_WORDS,
        IDENTITY_VOCABULARY,
        MAX_TOKENS,
        PROPORTION_WORDS,
        SKIN_WORDS,
        CaptionEncoder,
        described_caption,
        proportion_words,
    )

    assert len(SKIN_WORDS) == len(SKIN_TONES) and len(HAIR_WORDS) == len(HAIR_COLOURS)
    assert set(PROPORTION_WORDS) == set(BONE_RANGES)
    naming = set(IDENTITY_VOCABULARY)
    assert len(naming) == len(IDENTITY_VOCABULARY) and not naming & set(caption_vocabulary())
    photos = [p for i in range(20) for p in render_identity_photos(0, i, 3)]
    for p in photos:
        assert not naming & set(tokenize(p.caption)), p.caption
    ident = make_identity(0, 3)
    rng = np.random.default_rng(0)
    named = described_caption("a person waving", ident, rng, 1.0)
    expected = [SKIN_WORDS[ident.skin_index], HAIR_WORDS[ident.hair_index], *proportion_words(ident)]
    assert named == "a person waving, " + " ".join(expected)
    assert described_caption("a person waving", ident, rng, 0.0) == "a person waving"
    assert described_caption("a person waving", ident, rng, 1.0, plain=1.0) == "a person waving"
    # every word of a named caption is in the encoder's vocabulary (none maps to <unk>), and the longest named
    # caption of the world still fits the encoder's tokens (nothing is cut off)
    enc = CaptionEncoder()
    assert set(IDENTITY_VOCABULARY) <= set(enc.vocab) and 1 not in enc.token_ids([named])[0].tolist()
    # worst case: the longest plain caption of many photos, for a person with every proportion in an outer third
    extreme = replace(ident, bones={n: lo for n, (lo, _) in BONE_RANGES.items()})
    assert len(proportion_words(extreme)) == len(PROPORTION_WORDS)
    plain = max((render_world_photo(make_identity(0, i), i).caption for i in range(2000)), key=lambda c: len(tokenize(c)))
    longest = described_caption(plain, extreme, rng, 1.0)
    assert len(tokenize(longest)) == len(tokenize(plain)) + 2 + len(PROPORTION_WORDS) <= MAX_TOKENS, longest


def test_proportion_words_name_the_outer_thirds():
    """A known answer: a bone at 10 % of its range is "short", at 50 % unnamed, at 90 % "long"."""
    from dataclasses import replace

    from bolid.synthetic import BONE_RANGES
    from training.experiment.world_models import PROPORTION_WORDS, proportion_words

    ident = make_identity(0, 3)
    for name, (lo, hi) in BONE_RANGES.items():
        mid = {n: (a + b) / 2 for n, (a, b) in BONE_RANGES.items()}
        for at, expected in ((0.1, [PROPORTION_WORDS[name][0]]), (0.5, []), (0.9, [PROPORTION_WORDS[name][1]])):
            bones = {**mid, name: lo + at * (hi - lo)}
            assert proportion_words(replace(ident, bones=bones)) == expected, (name, at)


def test_identity_word_stage_keeps_every_trained_word():
    from training.experiment.pretrain import with_identity_words
    from training.experiment.world_models import CaptionEncoder

    torch.manual_seed(0)
    first = CaptionEncoder(identity_words=False)
    wider = with_identity_words(first)
    assert len(wider.vocab) > len(first.vocab)
    caption = ["a person standing with arms raised, front view, wearing a red t-shirt and blue shorts, in front of a beach"]
    with torch.no_grad():
        assert torch.equal(first.eval()(caption), wider.eval()(caption))


def test_describe_stage_runs_on_a_first_stage_and_only_once(tmp_path):
    """`pretrain --only describe` on a saved first stage: writes an encoder that knows the identity words and a log
    of its settings; run again on its own output it refuses (the words would be trained twice)."""
    import json

    from bolid.errors import BoLIDError
    from training.experiment import pretrain
    from training.experiment.world_models import IDENTITY_VOCABULARY, CaptionEncoder, make_base_unet, save_module

    torch.manual_seed(0)
    save_module(make_base_unet(), tmp_path / "base_unet.safetensors", "world_base_unet", {"steps": 0})
    save_module(CaptionEncoder(identity_words=False), tmp_path / "caption_encoder.safetensors",
                "world_caption_encoder", {"steps": 0})
    args = ["--out", str(tmp_path), "--only", "describe", "--describe-steps", "2", "--base-batch", "2",
            "--threads", "1", "--describe-plain", "0.3"]
    assert pretrain.main(args) == 0
    log = json.loads((tmp_path / "pretrain_log.json").read_text())["describe"]
    assert (log["steps"], log["plain"], log["probability"]) == (2, 0.3, 1.0)
    text = CaptionEncoder()
    meta = load_module(text, tmp_path / "caption_encoder.safetensors", "world_caption_encoder")
    assert meta["identity_words"] and set(IDENTITY_VOCABULARY) <= set(text.vocab)
    with pytest.raises(BoLIDError, match="not a first-stage caption encoder"):
        pretrain.main(args)


def test_pose_runner_fingerprint_names_the_weights():
    """Stage 1's prepare cache is keyed on the pose runner's fingerprint: a retrained pose model must not reuse
    keypoints another model measured, and the same weights must give the same fingerprint."""
    from training.experiment.readout import WorldPose

    torch.manual_seed(0)
    a, b = WorldPoseNet(), WorldPoseNet()
    b.load_state_dict(a.state_dict())
    assert WorldPose(a).fingerprint == WorldPose(b).fingerprint
    with torch.no_grad():
        b.heat.bias[0] += 1e-3
    assert WorldPose(a).fingerprint != WorldPose(b).fingerprint
