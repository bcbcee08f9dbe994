"""The experiment's conditions: one value per arm, whose keys and labels are the published results format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.experiment import conditions as C
from training.experiment.config import ExperimentConfig

CONFIG = Path(__file__).resolve().parents[1] / "training" / "configs" / "experiment.toml"
ALL_ON = {"arms": {"shuffled_control": True, "no_id_loss": True, "target_in_context": True}}


def test_every_condition_has_its_published_key_and_a_unique_label():
    conds = C.conditions_for(ExperimentConfig.load(CONFIG, ALL_ON))
    assert [c.key for c in conds] == ["real", "text", "oracle", "oracle_swapped", "bolid", "bolid_single",
                                      "bolid_stored", "bolid_swapped", "bolid_sampled", "shuffled", "no_id",
                                      "target_in_context"]
    assert len({c.label for c in conds}) == len(conds)
    for c in conds:  # an adapter needs a body per person; without one there is none
        assert (c.adapter is None) == (c.body is None), c.key
    assert [c.key for c in conds if not c.generated] == ["real"]
    assert {c.key for c in conds if c.donor_shift} == {"oracle_swapped", "bolid_swapped"}
    assert set(C.GRID) <= set(conds)


@pytest.mark.parametrize("arms", [{}, {"shuffled_control": False}, {"no_id_loss": True}, ALL_ON["arms"]])
def test_conditions_follow_the_arms_table_and_adapters_train_once_in_ladder_order(arms):
    cfg = ExperimentConfig.load(CONFIG, {"arms": arms})
    conds = C.conditions_for(cfg)
    optional = {"shuffled": cfg.arms.shuffled_control, "no_id": cfg.arms.no_id_loss,
                "target_in_context": cfg.arms.target_in_context}
    assert {k for k, on in optional.items() if on} == {c.key for c in conds} & set(optional)
    recipes = C.adapters_for(conds)
    assert [r.key for r in recipes] == ["oracle", "bolid", *(k for k, on in optional.items() if on)]
    assert {c.adapter for c in conds if c.adapter is not None} == set(recipes)


def test_training_body_matches_the_heldout_body_of_the_same_kind():
    assert C.TrainingBody.ORACLE.heldout_body is C.BodySource.ORACLE
    assert C.TrainingBody.BOLID.heldout_body is C.TrainingBody.SHUFFLED.heldout_body is C.BodySource.MULTI
    assert not C.TrainingBody.ORACLE.uses_encoder and C.TrainingBody.SHUFFLED.uses_encoder

    class Encoder:
        latent_dim = 7

    assert C.TrainingBody.BOLID.body_dim(Encoder()) == 7
    assert C.TrainingBody.ORACLE.body_dim(None) == C.ORACLE_DIM
    for cond in (C.ORACLE, C.BOLID, C.SHUFFLED, C.NO_ID, C.TARGET_IN_CONTEXT):  # each adapter's own condition
        assert cond.body is cond.adapter.body.heldout_body and cond.donor_shift == 0


def test_heldout_body_reads_the_oracle_vector_and_refuses_sources_that_need_a_file_or_a_draw():
    from bolid.synthetic import make_identity
    from training.experiment.stages import HeldOut, heldout_body

    person = HeldOut(make_identity(0, 1_000_000), [], [])
    vec = heldout_body(C.BodySource.ORACLE, person, None, None)
    assert torch.equal(vec, torch.from_numpy(person.identity.oracle_vector()))
    with pytest.raises(ValueError, match="stored"):
        heldout_body(C.BodySource.STORED, person, None, None)
