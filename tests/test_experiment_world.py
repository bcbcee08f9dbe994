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
    """The base model learns a word -> skin / hair route from pretraining captions that name them; the experiment's
    captions (stage 2, generation, the text-only arm) never do, so text only stays identity-free."""
    from bolid.synthetic import caption_vocabulary, render_identity_photos
    from training.experiment.world_models import (
        HAIR_WORDS,
        IDENTITY_VOCABULARY,
        SKIN_WORDS,
        CaptionEncoder,
        described_caption,
    )

    assert len(SKIN_WORDS) == len(SKIN_TONES) and len(HAIR_WORDS) == len(HAIR_COLOURS)
    # "black" (a clothing colour) and "grey" ("a grey wall") are words the captions use anyway
    naming = (set(SKIN_WORDS) | set(HAIR_WORDS) | {"skin", "hair"}) - set(caption_vocabulary())
    assert naming == {"skin", "hair", "fair", "tan", "brown", "dark", "brunette", "blond", "ginger"}
    photos = [p for i in range(20) for p in render_identity_photos(0, i, 3)]
    for p in photos:
        assert not naming & set(tokenize(p.caption)), p.caption
    assert not {"skin", "hair"} & set(caption_vocabulary())
    ident = make_identity(0, 3)
    rng = np.random.default_rng(0)
    named = described_caption("a person waving", ident, rng, 1.0)
    assert named == f"a person waving, with {SKIN_WORDS[ident.skin_index]} skin and {HAIR_WORDS[ident.hair_index]} hair"
    assert described_caption("a person waving", ident, rng, 0.0) == "a person waving"
    # every word of a named caption is in the encoder's vocabulary (none maps to <unk>)
    enc = CaptionEncoder()
    assert set(IDENTITY_VOCABULARY) <= set(enc.vocab) and 1 not in enc.token_ids([named])[0].tolist()


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
