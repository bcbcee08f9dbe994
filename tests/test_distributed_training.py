"""Both training stages under 2 processes (``accelerate launch --multi_gpu --num_processes 2``: gloo on a CPU-only
machine) through the real entry point, training/train.py, on the tiny models of the other training tests.

For each stage, one 2-process run of 4 steps (checkpoints at 2 and 4) and one 2-process run resumed from the
first run's step-2 checkpoint, against a 1-process run in this process with the same global batch (2x the
gradient accumulation). Checked:
- the ranks hold bit-identical trainable parameters at the end;
- the 2-process loss curve equals the 1-process one within LOSS_RTOL (the same samples and noise reach the same
  global batch: only the order of float sums differs), and so do the final weights (PARAM_ATOL);
- the resumed run ends bit-identical to the uninterrupted one (losses of steps 3-4 and weights);
- only process 0 writes checkpoints, exports, tensorboard logs and the stage-2 cache, and only it logs INFO lines;
  the one file another process writes is accelerate's per-process RNG state in each checkpoint
  (``random_states_<rank>.pkl``, which that process reads back on resume).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_stage1_training import FakePoseRunner, make_dataset
from test_stage2_config import save_tiny_pipeline

from bolid.body_encoder import BodyEncoder, BodyEncoderConfig
from bolid.body_encoder_io import save_body_encoder
from bolid.dataset import dataset_config_from_dict
from bolid.dataset_prepare import prepare_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
LOSS_RTOL = 1e-4  # 2 processes vs 1 process with the same global batch: float summation order only
PARAM_ATOL = 1e-4  # the same, on the final weights after 4 AdamW steps (Adam scales float noise up where a
#                    gradient is near 0: single elements differed by 3e-5 after 4 steps)
# Conv biases that feed a GroupNorm (the decoder's convs, the view encoder's CNN) are removed by it: their true
# gradient is 0 and what they get is float noise, which Adam scales up to steps of the learning rate's size, in a
# direction that depends on the summation order. They are left out of the weight comparison (the losses still
# cover them; the CNN's last conv, which feeds no norm, is left out with them).
NOISE_ONLY_GRADIENT = re.compile(r"(decoder\.convs|view_encoder\.cnn)\.\d+\.bias")
STEPS = 4


def _toml_value(value: object) -> str:
    return json.dumps(value)  # strings, numbers and booleans are written alike in TOML and JSON


def write_toml(path: Path, raw: dict) -> Path:
    """A config dict (top-level scalars, tables, and dataset.subsets) as a TOML file for training/train.py."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in raw.items() if not isinstance(v, dict)]
    for table, body in raw.items():
        if not isinstance(body, dict):
            continue
        lines.append(f"[{table}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in body.items() if not isinstance(v, list)]
        for key, rows in ((k, v) for k, v in body.items() if isinstance(v, list)):
            for row in rows:
                lines.append(f"[[{table}.{key}]]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in row.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(config: Path, record: Path, watched: Path, *train_args: str) -> dict[int, dict]:
    """Run training/train.py under the worker in 2 processes; returns each rank's record."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": "",
           "HF_HOME": str(record / "hf"),  # no accelerate default config
           "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true"}  # gloo on the CPU, also where GPUs exist
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(WORKER), str(record), str(watched), "--",
           "--config", str(config), *train_args]
    # a generous limit: on a loaded 2-core machine three processes importing torch can take minutes
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    out = {}
    for rank in (0, 1):
        out[rank] = json.loads((record / f"rank{rank}.json").read_text())
        out[rank]["params"] = torch.load(record / f"rank{rank}.params.pt", weights_only=True)
        assert out[rank]["exit"] == 0
    return out


def tensorboard_losses(logs: Path) -> dict[int, float]:
    """step -> train/loss from the tensorboard event files under ``logs``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses = {}
    for run in {p.parent for p in logs.rglob("events.out.tfevents.*")}:
        acc = EventAccumulator(str(run))
        acc.Reload()
        if "train/loss" in acc.Tags().get("scalars", []):
            losses.update({e.step: e.value for e in acc.Scalars("train/loss")})
    return losses


def assert_ranks_identical(records: dict[int, dict]) -> None:
    a, b = records[0]["params"], records[1]["params"]
    assert a and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


def assert_one_writer(records: dict[int, dict], must_write: list[str]) -> None:
    """Rank 0 wrote ``must_write`` (regexes); rank 1 wrote nothing but its RNG state and made no other folder."""
    written0 = {p for kind, p in records[0]["events"] if kind == "write"}
    for pattern in must_write:
        assert any(re.fullmatch(pattern, p) for p in written0), (pattern, sorted(written0))
    for kind, path in records[1]["events"]:
        ok = (kind == "write" and re.fullmatch(r".*/checkpoint-\d{8}/random_states_1\.pkl", path)) or \
             (kind == "os.mkdir" and re.fullmatch(r".*/checkpoint-\d{8}", path))
        assert ok, (kind, path)
    assert not any(p.endswith("random_states_1.pkl") for p in written0)
    checkpoints = {p.rsplit("/", 1)[0] for p in written0 if p.endswith("/random_states_0.pkl")}
    assert checkpoints and checkpoints == {p.rsplit("/", 1)[0] for kind, p in records[1]["events"]
                                           if p.endswith("/random_states_1.pkl")}
    assert records[0]["info"] and not records[1]["info"], records[1]["info"]


def assert_resume_equals(full: Path, resumed: Path, full_rank0: dict, resumed_records: dict[int, dict],
                         export: str) -> None:
    assert_ranks_identical(resumed_records)
    a, b = full_rank0["params"], resumed_records[0]["params"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert {s: v for s, v in tensorboard_losses(full / "logs").items() if s > 2} == tensorboard_losses(resumed / "logs")
    fa, fb = load_file(str(full / export)), load_file(str(resumed / export))
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


def assert_trained(params: dict[str, torch.Tensor], step2_weights: Path) -> None:
    """The final weights moved away from the step-2 checkpoint's (so the equalities above are not vacuous)."""
    before = load_file(str(step2_weights))
    assert any(not torch.equal(params[f"0.{k}"], v) for k, v in before.items() if f"0.{k}" in params)


def run_pair(tmp: Path, raw: dict, export: str) -> tuple[dict[int, dict], dict[int, dict]]:
    """The 2-process run and the run resumed from its step-2 checkpoint (in another output folder)."""
    watched = tmp / "w"
    full, resumed = watched / "full", watched / "resumed"
    records = launch_two(write_toml(tmp / "full.toml", {**raw, "output_dir": str(full)}), tmp / "rec_full", watched)
    assert sorted(p.name for p in full.glob("checkpoint-*")) == ["checkpoint-00000002", "checkpoint-00000004"]
    assert (full / "checkpoint-00000002" / "random_states_1.pkl").is_file()
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-00000002", resumed / "checkpoint-00000002")
    again = launch_two(write_toml(tmp / "resumed.toml", {**raw, "output_dir": str(resumed)}), tmp / "rec_resumed",
                       watched, "--resume", "latest")
    assert_resume_equals(full, resumed, records[0], again, export)
    return records, again


# ----------------------------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    runner = FakePoseRunner()
    make_dataset(tmp / "data", runner, identities=3, views=4)
    dataset = {"cache_dir": str(tmp / "cache1"), "min_resolution": 64, "crop_size": 32, "max_context_views": 3,
               "subsets": [{"root": str(tmp / "data")}]}
    prepare_dataset(dataset_config_from_dict(dataset), runner, crop_margin=1.15)
    return {"tmp": tmp, "dataset": dataset}


# ----------------------------------------------------------------------------------------------- stage 1


def stage1_raw(data: dict, **training) -> dict:
    return {"stage": 1, "seed": 3, "output_dir": "",
            "model": {"latent_dim": 8, "crop_size": 32, "decoder_size": 16, "width": 8, "hidden": 32},
            "dataset": data["dataset"],
            "training": {"max_steps": STEPS, "batch_size": 3, "learning_rate": 3e-3, "warmup_steps": 1,
                         "kl_warmup_steps": 0, "num_workers": 0, "report_to": "tensorboard", "log_every": 1,
                         "checkpointing_steps": 2, "checkpoints_total_limit": 0, **training}}


def test_stage1_two_processes(data, tmp_path):
    from training.stage1 import Stage1Config, train_stage1

    raw = stage1_raw(data)
    records, _ = run_pair(tmp_path, raw, "body_encoder.safetensors")
    assert_ranks_identical(records)
    assert_one_writer(records, [r"full/body_encoder\.safetensors", r"full/checkpoint-00000004/model\.safetensors",
                                r"full/checkpoint-00000004/bolid_state\.json", r"full/logs/.*tfevents.*"])
    # one process, the same global batch: 3 x 2 accumulation instead of 3 x 2 processes
    one = train_stage1(Stage1Config.from_dict({**stage1_raw(data, gradient_accumulation_steps=2, report_to="none",
                                                            checkpointing_steps=100),
                                               "output_dir": str(tmp_path / "one")}))
    two = tensorboard_losses(tmp_path / "w" / "full" / "logs")
    assert sorted(two) == list(range(1, STEPS + 1))
    torch.testing.assert_close(torch.tensor([two[s] for s in sorted(two)]), torch.tensor(one["losses"]),
                               rtol=LOSS_RTOL, atol=0)
    single = load_file(str(one["export"]))
    multi = load_file(str(tmp_path / "w" / "full" / "body_encoder.safetensors"))
    assert single.keys() == multi.keys()
    for k in single:
        if NOISE_ONLY_GRADIENT.fullmatch(k):
            continue
        torch.testing.assert_close(multi[k], single[k], rtol=0, atol=PARAM_ATOL, msg=lambda m, k=k: f"{k}: {m}")
    assert_trained(records[0]["params"], tmp_path / "w" / "full" / "checkpoint-00000002" / "model.safetensors")


# ----------------------------------------------------------------------------------------------- stage 2


@pytest.fixture(scope="module")
def stage2_models(data):
    tmp = data["tmp"]
    torch.manual_seed(0)
    save_body_encoder(BodyEncoder(BodyEncoderConfig(latent_dim=16, crop_size=32, decoder_size=16, width=8,
                                                    hidden=32)), tmp / "body_encoder.safetensors")
    save_tiny_pipeline(tmp / "sd15", "sd15")
    return tmp


def stage2_raw(data: dict, models: Path, cache: Path, **training) -> dict:
    return {"stage": 2, "seed": 5, "output_dir": "",
            "model": {"pretrained": str(models / "sd15"), "body_encoder": str(models / "body_encoder.safetensors")},
            "adapter": {"face_tokens": 2, "body_tokens": 2},
            "dataset": data["dataset"],
            "cache": {"dir": str(cache), "resolution": 32, "step": 16},
            "training": {"max_steps": STEPS, "batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 1,
                         "ema_decay": 0.9, "report_to": "tensorboard", "log_every": 1, "checkpointing_steps": 2,
                         "checkpoints_total_limit": 0, "validation_steps": STEPS, "validation_inference_steps": 2,
                         **training}}


def test_stage2_two_processes(data, stage2_models, tmp_path):
    from training.stage2 import run

    cache = tmp_path / "w" / "cache2"  # built by process 0 of the first run, read by everyone after
    records, _ = run_pair(tmp_path, stage2_raw(data, stage2_models, cache), "bolid_adapter.safetensors")
    assert_ranks_identical(records)
    assert_one_writer(records, [r"cache2/.*\.safetensors", r"full/bolid_adapter\.safetensors",
                                r"full/bolid_adapter\.body_ip_adapter\.safetensors",
                                r"full/checkpoint-00000004/model\.safetensors",
                                r"full/checkpoint-00000004/custom_checkpoint_0\.pkl",  # the EMA
                                r"full/validation/step_00000004\.png", r"full/logs/.*tfevents.*"])
    assert_trained(records[0]["params"], tmp_path / "w" / "full" / "checkpoint-00000002" / "model.safetensors")
    # one process, the same global batch: 2 x 2 accumulation instead of 2 x 2 processes
    raw = stage2_raw(data, stage2_models, cache, gradient_accumulation_steps=2, report_to="none",
                     checkpointing_steps=100, validation_steps=0)
    one = run({**raw, "output_dir": str(tmp_path / "one")}, tmp_path)
    two = tensorboard_losses(tmp_path / "w" / "full" / "logs")
    assert sorted(two) == list(range(1, STEPS + 1))
    torch.testing.assert_close(torch.tensor([two[s] for s in sorted(two)]),
                               torch.tensor([h["loss"] for h in one["losses"]]), rtol=LOSS_RTOL, atol=0)
    single = load_file(str(tmp_path / "one" / "bolid_adapter.safetensors"))  # EMA weights
    multi = load_file(str(tmp_path / "w" / "full" / "bolid_adapter.safetensors"))
    assert single.keys() == multi.keys()
    for k in single:
        torch.testing.assert_close(multi[k], single[k], rtol=0, atol=PARAM_ATOL, msg=lambda m, k=k: f"{k}: {m}")


def test_example_accelerate_configs_load():
    from accelerate.commands.config.config_args import ClusterConfig

    single = ClusterConfig.from_yaml_file(REPO_ROOT / "training" / "configs" / "accelerate_multi_gpu.yaml")
    multi = ClusterConfig.from_yaml_file(REPO_ROOT / "training" / "configs" / "accelerate_multi_node.yaml")
    assert str(single.distributed_type) == str(multi.distributed_type) == "DistributedType.MULTI_GPU"
    assert (single.num_machines, single.num_processes) == (1, 4)
    assert (multi.num_machines, multi.num_processes, multi.main_process_port) == (2, 16, 29500)
    assert not single.use_cpu and not multi.use_cpu
