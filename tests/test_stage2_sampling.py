"""Leave-one-out batches: the body branch never sees the target photo, face from another photo, dropout, buckets."""

from __future__ import annotations

import stage2_tiny as T
import torch

from bolid.body_encoder import aggregate_views
from training.stage2_sampling import SamplingConfig, Stage2Data


def _data(**sampling):
    return Stage2Data(T.identities(n=3, views=5, face_missing=1, shapes=((8, 8), (8, 12))),
                      SamplingConfig(**sampling), text_cache=None, components=T.components(pose=False, clip=False))


def test_body_condition_never_uses_the_target_view():
    data = _data(drop_text=0, drop_face=0, drop_body=0, drop_all=0, max_context_views=4)
    sizes = set()
    for index in range(150):
        batch = data.batch(index, 4)
        for r in range(4):
            ident = data.identities[batch["identity_index"][r]]
            j, ctx = batch["target_index"][r], batch["context_indices"][r]
            assert j not in ctx and 1 <= len(ctx) <= 4
            sizes.add(len(ctx))
            expected, _ = aggregate_views(ident.body_mu[ctx], ident.body_logvar[ctx], ident.body_weights[ctx])
            assert torch.allclose(batch["body"][r], expected, atol=1e-6)
            with_target, _ = aggregate_views(ident.body_mu[ctx + [j]], ident.body_logvar[ctx + [j]],
                                             ident.body_weights[ctx + [j]])
            assert not torch.allclose(batch["body"][r], with_target, atol=1e-4)
            # face: another photo of the same person that has a face (view 0 has none)
            f = batch["face_index"][r]
            assert f != j and f != 0 and torch.equal(batch["face"][r], ident.face[f].float())
            # the diffusion target is the held-out photo itself
            assert torch.equal(batch["sample"][r], ident.samples[j])
    assert sizes == {1, 2, 3, 4}


def test_face_source_options():
    same = _data(face_source="same", drop_text=0, drop_face=0, drop_body=0, drop_all=0).batch(3, 8)
    for r in range(8):
        j = same["target_index"][r]
        assert same["face_index"][r] == (j if j != 0 else -1)
    mean = _data(face_source="mean_others", drop_text=0, drop_face=0, drop_body=0, drop_all=0).batch(3, 4)
    assert torch.allclose(mean["face"].norm(dim=-1), torch.ones(4), atol=1e-5)


def test_condition_dropout_rates_and_values():
    data = _data()
    counts = dict.fromkeys(("none", "text", "face", "body", "all"), 0)
    empty = data.text_cache[""][0]
    total = 0
    for index in range(500):
        batch = data.batch(index, 8)
        for r, kind in enumerate(batch["drop"]):
            counts[kind] += 1
            total += 1
            text_dropped = kind in ("text", "all")
            assert torch.equal(batch["text_embeds"][r], empty) == text_dropped
            assert bool((batch["body"][r] == 0).all()) == (kind in ("body", "all"))
            if kind in ("face", "all"):
                assert (batch["face"][r] == 0).all()
            assert bool(batch["body_present"][r]) == (kind not in ("body", "all"))
    for kind in ("text", "face", "body", "all"):
        assert 0.03 < counts[kind] / total < 0.07, counts
    off = _data(drop_text=0, drop_face=0, drop_body=0, drop_all=0)
    assert all(k == "none" for i in range(50) for k in off.batch(i, 4)["drop"])


def test_batches_are_deterministic_and_bucketed():
    data = _data()
    a, b = data.batch(17, 6), data.batch(17, 6)
    assert a["target_index"] == b["target_index"] and torch.equal(a["sample"], b["sample"])
    shapes = {tuple(data.batch(i, 6)["sample"].shape[-2:]) for i in range(40)}
    assert shapes == {(8, 8), (8, 12)}
    assert data.describe()["buckets"] == {"4x8x12": 6, "4x8x8": 9}
