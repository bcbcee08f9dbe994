"""The experiment's config: one typed table per section, unknown keys rejected (a typo is an error, not a default).

    python -m training.experiment --config training/configs/experiment.toml
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from bolid.errors import BoLIDError
from training.common import config_table

PRETRAINING_IDENTITIES = 50_000  # the world models train on identities 0 .. 49_999 (pretrain.TRAIN_IDENTITIES)
HELDOUT_FIRST_INDEX = 1_000_000  # the experiment's held-out people: indices from here


class ExperimentConfigError(BoLIDError):
    """The experiment config is invalid."""


@dataclass(frozen=True)
class WorldOptions:
    """How many people and photos (see bolid.synthetic; held-out people are never seen by any training)."""

    train_identities: int = 400
    photos_per_identity: int = 6
    heldout_identities: int = 32
    heldout_reference_photos: int = 6  # the multi-view Body ID; single photo = the first; halves for stage-1 checks
    heldout_target_photos: int = 2  # whose captions drive generation (and whose photos are the real-image floor)
    # the first held-out identity index: another value draws a fresh set of people for the same trained models
    heldout_first_index: int = HELDOUT_FIRST_INDEX

    def __post_init__(self) -> None:
        if self.heldout_identities < 2 or self.heldout_reference_photos < 2 or self.photos_per_identity < 2:
            raise ValueError("need >= 2 held-out identities, >= 2 reference photos and >= 2 photos per identity")
        if self.heldout_first_index < max(PRETRAINING_IDENTITIES, self.train_identities):
            raise ValueError(f"heldout_first_index {self.heldout_first_index} would reuse people the world models or "
                             f"stages train on (indices below {max(PRETRAINING_IDENTITIES, self.train_identities)})")


@dataclass(frozen=True)
class Stage1Options:
    """Body-ID VAE size and stage-1 training (targets are standardised: no hand-set loss weights needed)."""

    latent_dim: int = 32
    crop_size: int = 32
    decoder_size: int = 16
    width: int = 16
    hidden: int = 128
    max_steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 1e-3
    kl_weight: float = 1e-3
    proportion_weight: float = 1.0
    appearance_weight: float = 1.0

    def model(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("latent_dim", "crop_size", "decoder_size", "width", "hidden")}

    def training(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in self.model()}


@dataclass(frozen=True)
class Stage2Options:
    """Adapter training, leave-one-out; the face branch is off in generation, so it is frozen in training."""

    max_steps: int = 300
    batch_size: int = 16
    learning_rate: float = 2e-3
    warmup_steps: int = 20
    body_tokens: int = 4
    max_context_views: int = 4
    id_weight: float = 0.1
    id_max_timestep: int = 400
    snr_gamma: float = 0.0  # Min-SNR-gamma weighting of L_diff (0: the plain mean)
    min_timestep: int = 0  # L_diff's timesteps are drawn from min_timestep..999
    appearance_weight: float = 0.0  # L_id's appearance term (colours at the view's landmarks), t < its max
    appearance_max_timestep: int = 1000
    drop_text: float = 0.05
    drop_body: float = 0.05
    drop_all: float = 0.05

    def __post_init__(self) -> None:
        """The loss settings are checked by stage 2's own rule when the config is read, not after stage 1."""
        from training.stage2_model import LossConfig

        try:
            LossConfig(id_weight=self.id_weight, id_max_timestep=self.id_max_timestep, snr_gamma=self.snr_gamma,
                       min_timestep=self.min_timestep, appearance_weight=self.appearance_weight,
                       appearance_max_timestep=self.appearance_max_timestep)
        except BoLIDError as err:
            raise ExperimentConfigError(f"[stage2]: {err}") from err


@dataclass(frozen=True)
class SamplingOptions:
    steps: int = 10
    guidance: float = 1.5
    seeds_per_caption: int = 1
    batch: int = 128


@dataclass(frozen=True)
class ArmOptions:
    """Which adapters to train besides BoLID (leave-one-out) and the oracle."""

    shuffled_control: bool = True  # c_body shuffled across people in training
    no_id_loss: bool = False  # ablation: id_weight = 0
    target_in_context: bool = False  # ablation: the target photo is among the context views


@dataclass(frozen=True)
class StatsOptions:
    n_boot: int = 2000
    n_perm: int = 2000
    ci: float = 0.95


@dataclass(frozen=True)
class TopLevel:
    """The keys outside any table; paths are relative to the config file."""

    output_dir: str = "../../outputs/experiment"
    assets: str = "../experiment_assets"
    seed: int = 0
    threads: int = 0  # torch threads (0 = torch's default)
    workers: int = 0  # processes training adapters beside the main one, 1 thread each (training/experiment/parallel)


@dataclass(frozen=True)
class ExperimentConfig:
    output_dir: Path
    assets: Path
    seed: int = 0
    threads: int = 0
    workers: int = 0
    world: WorldOptions = field(default_factory=WorldOptions)
    stage1: Stage1Options = field(default_factory=Stage1Options)
    stage2: Stage2Options = field(default_factory=Stage2Options)
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    arms: ArmOptions = field(default_factory=ArmOptions)
    stats: StatsOptions = field(default_factory=StatsOptions)

    TABLES = {"world": WorldOptions, "stage1": Stage1Options, "stage2": Stage2Options,
              "sampling": SamplingOptions, "arms": ArmOptions, "stats": StatsOptions}

    @classmethod
    def load(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
        """Read a TOML file; ``overrides`` ({table: {key: value}} or {key: value}) replace its values."""
        path = Path(path).resolve()
        with open(path, "rb") as f:
            raw = tomllib.load(f)
        for key, value in (overrides or {}).items():
            raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
        known = {f.name for f in fields(TopLevel)} | set(cls.TABLES)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ExperimentConfigError(f"{path}: unknown keys {unknown}; known: {sorted(known)}")
        base = path.parent
        top = config_table(TopLevel, {k: v for k, v in raw.items() if k not in cls.TABLES}, "top level",
                           ExperimentConfigError)
        tables = {name: config_table(kind, dict(raw.get(name, {})), name, ExperimentConfigError)
                  for name, kind in cls.TABLES.items()}  # an absent table is all defaults
        if top.workers < 0 or top.threads < 0:
            raise ExperimentConfigError(f"{path}: threads and workers must be >= 0, got {top.threads} and "
                                        f"{top.workers}")
        return cls(output_dir=(base / top.output_dir).resolve(), assets=(base / top.assets).resolve(),
                   seed=int(top.seed), threads=int(top.threads), workers=int(top.workers),
                   **tables)

    def as_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "threads": self.threads, "workers": self.workers, **{k: asdict(getattr(self, k)) for k in self.TABLES}}
