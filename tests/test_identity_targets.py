"""Stage 1's identity targets: the appearance descriptor, targets standardised over people (scale-free heads),
the stored distribution of training identities that Sample Body ID draws from, and format-1 encoder files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bolid.appearance import APPEARANCE_DIM, aggregate_appearance, appearance_descriptor
from bolid.body_encoder import BodyEncoder, BodyEncoderConfig, fit_body_prior
from bolid.body_encoder_io import BodyEncoderFileError, load_body_encoder, save_body_encoder
from bolid.body_id_io import sample_body_id
from bolid.keypoints import flip_index
from bolid.safetensors_io import atomic_save_safetensors

TINY = BodyEncoderConfig(latent_dim=6, crop_size=16, decoder_size=8, width=8, hidden=16)


def test_appearance_descriptor_reads_colours_at_the_landmarks_and_ignores_flips():
    crops = torch.zeros(1, 3, 32, 32)
    crops[0, 0, :10, :] = 1.0  # red above y = 10 (the head)
    crops[0, 2, 24:, :] = 1.0  # blue below y = 24 (the ankles)
    kp = torch.zeros(1, 17, 3)
    kp[..., 2] = 1.0
    kp[0, 0:5, :2] = torch.tensor([0.5, 0.2])  # head at y = 6.4 px
    kp[0, (5, 6), 1] = 0.35
    kp[0, (5, 6), 0] = torch.tensor([0.4, 0.6])
    kp[0, (9, 10), :2] = torch.tensor([0.5, 0.55])
    kp[0, (15, 16), :2] = torch.tensor([0.5, 0.9])
    desc, conf = appearance_descriptor(crops, kp)
    assert desc.shape == (1, APPEARANCE_DIM) and torch.all(conf == 1)
    assert torch.allclose(desc[0, 0:3], torch.tensor([1.0, 0.0, 0.0]))  # head
    assert torch.allclose(desc[0, 3:6], torch.tensor([1.0, 0.0, 0.0]))  # top of the head
    assert torch.allclose(desc[0, 9:12], torch.tensor([0.0, 0.0, 1.0]))  # ankles
    flipped = kp[:, torch.from_numpy(flip_index())].clone()
    flipped[..., 0] = 1.0 - flipped[..., 0]
    desc_f, _ = appearance_descriptor(crops.flip(-1), flipped)
    assert torch.allclose(desc, desc_f, atol=1e-5)
    mean, _ = aggregate_appearance(torch.stack([desc[0], desc[0] * 0]), torch.tensor([[1.0] * 12, [0.0] * 12]))
    assert torch.allclose(mean, desc[0])  # a zero-confidence photo adds nothing


def test_heads_predict_in_standardised_units_and_report_in_real_units():
    mean = tuple(float(v) for v in np.linspace(0.3, 0.9, 6 + APPEARANCE_DIM))
    std = tuple(0.01 * (i + 1) for i in range(6 + APPEARANCE_DIM))
    torch.manual_seed(0)
    model = BodyEncoder(BodyEncoderConfig(**{**TINY.architecture(), "target_mean": mean, "target_std": std}))
    z = torch.randn(3, 6)
    raw = model.proportion_head(z)
    assert torch.allclose(model.predict_proportions(z), raw * torch.tensor(std[:6]) + torch.tensor(mean[:6]))
    # a prediction equal to the population mean costs (target - mean)^2 / std^2: the same for every target unit
    targets = torch.tensor(mean).expand(2, -1) + torch.tensor(std).expand(2, -1)
    z_std = model.standardise_targets(targets)
    assert torch.allclose(z_std, torch.ones_like(z_std))
    with pytest.raises(ValueError, match="target_std"):
        BodyEncoderConfig(**{**TINY.architecture(), "target_mean": mean, "target_std": (0.0,) * len(mean)})


def test_body_prior_is_stored_with_the_encoder_and_sampled_from(tmp_path):
    torch.manual_seed(1)
    model = BodyEncoder(TINY).eval()
    means = torch.randn(200, 6) * 0.3 + 2.0  # shrunk, off-centre posterior means: far from N(0, I)
    model.body_prior = fit_body_prior(means)
    path = tmp_path / "enc.safetensors"
    digest = save_body_encoder(model, path)
    loaded, _ = load_body_encoder(path)
    assert loaded.body_prior is not None and torch.allclose(loaded.body_prior[0], model.body_prior[0])
    draws = torch.stack([sample_body_id(6, s, distribution=loaded.body_prior).c_body for s in range(3000)])
    assert torch.allclose(draws.mean(0), means.mean(0), atol=0.05)
    assert torch.allclose(draws.std(0), means.std(0), rtol=0.15)
    drawn = sample_body_id(6, 5, "h", distribution=loaded.body_prior)
    assert torch.equal(drawn.c_body, sample_body_id(6, 5, "h", distribution=loaded.body_prior).c_body)
    assert drawn.extra["source"] == "training identities"
    # without a stored distribution: the prior N(0, I)
    plain = torch.stack([sample_body_id(6, s).c_body for s in range(3000)])
    assert plain.std().item() == pytest.approx(1.0, abs=0.05)
    with pytest.raises(ValueError, match="expected"):
        sample_body_id(5, 0, distribution=loaded.body_prior)
    # a damaged distribution is refused, naming the file
    from bolid.safetensors_io import load_safetensors

    tensors, meta = load_safetensors(path, BodyEncoderFileError)
    tensors["body_prior.scale_tril"] = torch.full((6, 6), float("nan"))
    atomic_save_safetensors(tensors, tmp_path / "bad.safetensors", meta)
    with pytest.raises(BodyEncoderFileError, match="bad.safetensors"):
        load_body_encoder(tmp_path / "bad.safetensors")
    assert digest


def test_format_1_encoder_files_still_load_without_an_appearance_head(tmp_path):
    torch.manual_seed(2)
    old = BodyEncoder(BodyEncoderConfig(**{**TINY.architecture(), "appearance_dim": 0}))
    state = {k: v.detach().clone() for k, v in old.state_dict().items()}
    config = {k: v for k, v in old.config.architecture().items()
              if k not in ("appearance_dim", "target_mean", "target_std")}
    config["format_version"] = 1
    meta = {"bolid_kind": "bolid_body_encoder", "bolid_format_version": "1",
            "bolid_config": json.dumps({**config, "training": {}})}
    atomic_save_safetensors(state, tmp_path / "v1.safetensors", meta)
    loaded, info = load_body_encoder(tmp_path / "v1.safetensors")
    assert info.format_version == 1
    assert loaded.appearance_head is None and loaded.config.appearance_dim == 0
    z = torch.randn(2, 6)
    assert torch.allclose(loaded.predict_proportions(z), old.proportion_head(z))
