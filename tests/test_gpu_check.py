"""benchmarks/gpu_check.py in its CPU flow mode (``--device cpu --tiny``): every part runs on the tests' tiny
models, the JSON and Markdown land in the folder named on the command line, and a part whose dependency is
missing is reported as skipped while the others still run. (The figures of a tiny run mean nothing.)"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.py"


def test_tiny_cpu_run_writes_every_part(tmp_path):
    out = tmp_path / "report"
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}  # the ComfyUI rows must skip cleanly
    env.update(OMP_NUM_THREADS="1", PYTHONPATH="", YOLO_CONFIG_DIR=str(tmp_path / "yolo"))
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), "--device", "cpu", "--tiny"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    parts = report["parts"]
    assert {k: v["status"] for k, v in parts.items()} == {"adapter": "ok", "perception": "ok", "train": "ok"}
    assert report["tiny"] and report["environment"]["device"] == "cpu"

    adapter = parts["adapter"]
    rows = {r["variant"]: r for r in adapter["tables"]["diffusers"]}
    assert set(rows) == {"diffusers unpatched", "diffusers BoLID active", "diffusers BoLID weights 0",
                         "diffusers stock IP-Adapter x2"}
    assert rows["diffusers unpatched"]["median_ratio"] == 1.0
    assert all(r["median_ms"] > 0 and r["rounds"] == 2 for r in rows.values())
    assert "ComfyUI" in adapter["comfyui_skipped"] and "comfyui" not in adapter["tables"]

    perception = parts["perception"]
    assert [r["provider"] for r in perception["rows"]] == ["CPU"]
    assert perception["rows"][0]["active_pose"] == "CPUExecutionProvider"
    assert all(perception["rows"][0][k] > 0 for k in ("pose_images_per_s", "face_images_per_s"))
    assert perception["skipped"] == {"CUDA": "--device cpu"}

    train = parts["train"]
    assert [(r["precision"], r["aux_losses"]) for r in train["rows"]] == [
        ("fp16", False), ("fp16", True), ("bf16", False), ("bf16", True)]
    for r in train["rows"]:
        assert math.isfinite(r["loss"]) and r["median_step_s"] > 0 and r["peak_cuda_mb"] is None
        assert (r["id_rows"] > 0 and r["clip_rows"] > 0) == r["aux_losses"]  # the auxiliary losses really ran

    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# BoLID GPU check, ") and "TINY models" in md
    for heading in ("## adapter", "## perception", "## train"):
        assert heading in md
    assert "| diffusers BoLID active |" in md and "| bf16 | on |" in md and "CUDA skipped: --device cpu" in md


def test_a_missing_dependency_skips_its_part_and_a_failure_loses_no_other_part(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))

    def broken(args, device):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setitem(gpu_check.PARTS, "train", broken)
    assert gpu_check.main([str(tmp_path), "--device", "cpu", "--tiny", "--parts", "perception,train"]) == 1
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert parts["perception"]["status"] == "skipped"
    assert parts["perception"]["reason"] == "onnxruntime is not installed (the perception runners)"
    assert parts["train"]["status"] == "error" and "simulated" in parts["train"]["reason"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "skipped: onnxruntime is not installed" in md and "error: RuntimeError: CUDA out of memory" in md
