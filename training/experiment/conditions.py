"""The conditions of the experiment (the oracle ladder) as values, not label strings.

A :class:`Condition` is one column of the results: its key in ``results.json`` (``arms``), its label in
``results.md``, the adapter that draws it (an :class:`AdapterRecipe`, or none for text only and the real photos)
and where each held-out person's body condition comes from (a :class:`BodySource`). Every adapter is trained by
the same recipe; an :class:`AdapterRecipe` says only what differs: the body condition stage 2 trains on
(:class:`TrainingBody`), the L_id weight, whether the target is among the context views, the Lightning branch.

The keys and labels are a published format (``results.json``, ``results.md``, the README): they never change.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from bolid.synthetic import ORACLE_DIM

from .config import ExperimentConfig


class TrainingBody(Enum):
    """What stage 2 feeds as a training person's body condition."""

    BOLID = "bolid"  # the stage-1 encoder's per-view posteriors of the person (leave-one-out)
    ORACLE = "oracle"  # the person's true identity vector
    SHUFFLED = "shuffled"  # the encoder's posteriors of another training person (a fixed derangement): control

    @property
    def uses_encoder(self) -> bool:
        return self is not TrainingBody.ORACLE

    def body_dim(self, encoder: Any) -> int:
        """Width of the body condition: the oracle vector's, or the encoder's latent."""
        return encoder.latent_dim if self.uses_encoder else ORACLE_DIM

    @property
    def heldout_body(self) -> BodySource:
        """The held-out people's body of the same kind (what the adapter's own condition looks like at test)."""
        return BodySource.ORACLE if self is TrainingBody.ORACLE else BodySource.MULTI


class BodySource(Enum):
    """Where a held-out person's body condition comes from at generation."""

    MULTI = "multi"  # c_body of all reference photos
    SINGLE = "single"  # c_body of the first reference photo
    STORED = "stored"  # the multi-view Body ID saved to its file and loaded back (text-only mode)
    ORACLE = "oracle"  # the true identity vector
    SAMPLED = "sampled"  # drawn from the encoder's stored distribution (Sample Body ID)


@dataclass(frozen=True)
class AdapterRecipe:
    """One adapter to train; ``key`` names it in ``stage2_final_losses`` and ``body_branch_response``."""

    key: str
    body: TrainingBody
    id_weight: float | None = None  # None: the config's [stage2] id_weight
    target_in_context: bool = False
    lightning: Any = None  # a training.lightning_branch.LightningConfig; None: stage 2's default (one-step x0)


@dataclass(frozen=True)
class Condition:
    """One arm of the ladder: which adapter draws it, and which body condition each held-out person gets."""

    key: str  # the key in results.json
    label: str  # the row label in results.md
    adapter: AdapterRecipe | None = None  # None: no adapter (text only, or the real photos)
    body: BodySource | None = None
    donor_shift: int = 0  # the body belongs to held-out person (k + donor_shift) % P
    generated: bool = True  # False: the real target photos (the measurement floor), nothing is generated


ORACLE_ADAPTER = AdapterRecipe("oracle", TrainingBody.ORACLE)
BOLID_ADAPTER = AdapterRecipe("bolid", TrainingBody.BOLID)
SHUFFLED_ADAPTER = AdapterRecipe("shuffled", TrainingBody.SHUFFLED)
NO_ID_ADAPTER = AdapterRecipe("no_id", TrainingBody.BOLID, id_weight=0.0)
IN_CONTEXT_ADAPTER = AdapterRecipe("target_in_context", TrainingBody.BOLID, target_in_context=True)

REAL = Condition("real", "real held-out photos (measurement floor)", generated=False)
TEXT = Condition("text", "text only (base model)")
ORACLE = Condition("oracle", "oracle: true identity vector", ORACLE_ADAPTER, BodySource.ORACLE)
ORACLE_SWAPPED = Condition("oracle_swapped", "oracle, another person's vector", ORACLE_ADAPTER, BodySource.ORACLE, 1)
BOLID = Condition("bolid", "BoLID, multi-view Body ID", BOLID_ADAPTER, BodySource.MULTI)
BOLID_SINGLE = Condition("bolid_single", "BoLID, single photo", BOLID_ADAPTER, BodySource.SINGLE)
BOLID_STORED = Condition("bolid_stored", "BoLID, stored Body ID (file, text-only mode)", BOLID_ADAPTER,
                         BodySource.STORED)
BOLID_SWAPPED = Condition("bolid_swapped", "BoLID, another person's Body ID", BOLID_ADAPTER, BodySource.MULTI, 1)
BOLID_SAMPLED = Condition("bolid_sampled", "BoLID, Sample Body ID (stored distribution)", BOLID_ADAPTER,
                          BodySource.SAMPLED)
SHUFFLED = Condition("shuffled", "control: adapter trained on shuffled c_body", SHUFFLED_ADAPTER, BodySource.MULTI)
NO_ID = Condition("no_id", "ablation: no L_id (id_weight 0)", NO_ID_ADAPTER, BodySource.MULTI)
TARGET_IN_CONTEXT = Condition("target_in_context", "ablation: target photo in context", IN_CONTEXT_ADAPTER,
                              BodySource.MULTI)

GRID = (REAL, TEXT, ORACLE, BOLID, BOLID_SINGLE, BOLID_SWAPPED, SHUFFLED)  # the columns of grid.png


def conditions_for(cfg: ExperimentConfig) -> list[Condition]:
    """Every condition of a run, in the order of ``results.json``: the floor, text only, the ladder, then the
    control and ablations that ``[arms]`` switches on."""
    out = [REAL, TEXT, ORACLE, ORACLE_SWAPPED, BOLID, BOLID_SINGLE, BOLID_STORED, BOLID_SWAPPED, BOLID_SAMPLED]
    optional = ((cfg.arms.shuffled_control, SHUFFLED), (cfg.arms.no_id_loss, NO_ID),
                (cfg.arms.target_in_context, TARGET_IN_CONTEXT))
    return out + [cond for on, cond in optional if on]


def adapters_for(conditions: list[Condition]) -> list[AdapterRecipe]:
    """The adapters those conditions need, each once, in order of first use (the training order)."""
    return list(dict.fromkeys(c.adapter for c in conditions if c.adapter is not None))
