"""Comfy Registry metadata (pyproject.toml) and what the published archive holds.

comfy-cli (`comfy node pack` / `comfy node publish`) zips the git-tracked files minus the gitignore-style
patterns of `.comfyignore`. CI does not install it, so the archive's file list is computed the same way:
``git ls-files`` minus the patterns; with ``COMFY_CLI=/path/to/comfy`` a gated test runs the real `comfy node
validate` and `comfy node pack` (both offline) and checks that the zip holds exactly that list. Only two pattern forms are used, and checked to be
the only ones: an anchored folder or file (``/tests/``, ``/requirements-dev.txt``) and a file-name glob
(``*.pt``).
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import zipfile

import pytest
from conftest import REPO_ROOT

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (the pack itself supports 3.10)
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
# comfy-cli's accepted classifier values (comfy_cli/registry/config_parser.py)
OS_PREFIXES = ("Microsoft", "POSIX", "MacOS", "OS Independent")
ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                "GPU :: Apple Metal"}
VERSION_PART = re.compile(r"^(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)?$")


def test_registry_fields():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    name = project["name"]
    assert "comfyui" not in name.lower(), "the registry's convention: no 'ComfyUI' in the node id"
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*", name) and len(name) < 100
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["urls"]["Repository"].startswith("https://github.com/")
    assert comfy["PublisherId"] and comfy["DisplayName"]
    for part in comfy["requires-comfyui"].split(","):
        assert VERSION_PART.match(part.strip()), comfy["requires-comfyui"]
    classifiers = project["classifiers"]
    os_values = [c.removeprefix("Operating System :: ") for c in classifiers if c.startswith("Operating System :: ")]
    assert os_values and all(v.startswith(OS_PREFIXES) for v in os_values)
    accelerators = [c.removeprefix("Environment :: ") for c in classifiers if c.startswith("Environment ::")]
    assert accelerators and set(accelerators) <= ACCELERATORS
    icon = comfy["Icon"]
    assert icon.startswith("https://") and icon.endswith(".png")
    assert (REPO_ROOT / icon.split("/main/", 1)[1]).is_file(), "the icon URL points at a file of this repository"


def _requirement_lines(text: str) -> list[str]:
    lines = [line.split(" #")[0].strip() for line in text.splitlines()]
    return [line.replace("'", '"') for line in lines if line and not line.startswith("#")]


def test_dependencies_equal_requirements_txt_and_pick_one_onnxruntime():
    from packaging.markers import Marker
    from packaging.requirements import Requirement

    reqs = _requirement_lines((REPO_ROOT / "requirements.txt").read_text())
    assert [r.replace("'", '"') for r in PYPROJECT["project"]["dependencies"]] == reqs
    parsed = [Requirement(r) for r in reqs]
    assert not any(r.name in ("insightface", "torch") for r in parsed), "insightface is a test dependency only"
    runtimes = [r for r in parsed if r.name in ("onnxruntime", "onnxruntime-gpu")]
    assert len(runtimes) == 2
    platforms = {
        "linux x86_64": {"sys_platform": "linux", "platform_machine": "x86_64"},
        "windows": {"sys_platform": "win32", "platform_machine": "AMD64"},
        "macOS arm64": {"sys_platform": "darwin", "platform_machine": "arm64"},
        "macOS x86_64": {"sys_platform": "darwin", "platform_machine": "x86_64"},
        "linux aarch64": {"sys_platform": "linux", "platform_machine": "aarch64"},
    }
    expected = {"linux x86_64": "onnxruntime-gpu", "windows": "onnxruntime-gpu", "macOS arm64": "onnxruntime",
                "macOS x86_64": "onnxruntime", "linux aarch64": "onnxruntime"}
    for label, env in platforms.items():
        chosen = [r.name for r in runtimes if Marker(str(r.marker)).evaluate(env)]
        assert chosen == [expected[label]], (label, chosen)


def _ignore_patterns() -> list[str]:
    lines = [line.strip() for line in (REPO_ROOT / ".comfyignore").read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        if pattern.startswith("/"):
            anchored = pattern[1:]
            if path == anchored.rstrip("/") or (anchored.endswith("/") and path.startswith(anchored)):
                return True
        elif fnmatch.fnmatch(path.rsplit("/", 1)[-1], pattern):
            return True
    return False


def _archive_listing() -> list[str]:
    """The files comfy-cli would pack: git-tracked, present, not matched by `.comfyignore`."""
    patterns = _ignore_patterns()
    for pattern in patterns:
        assert re.fullmatch(r"/[\w./-]+|\*\.[\w]+", pattern), f"unsupported .comfyignore pattern form: {pattern}"
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout: comfy-cli packs the git-tracked files")
    tracked = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files"], capture_output=True, text=True,
                             check=True).stdout.split()
    return [p for p in tracked if (REPO_ROOT / p).exists() and not _ignored(p, patterns)]


def test_published_archive_holds_the_nodes_and_nothing_for_development():
    archive = _archive_listing()
    for prefix in ("tests/", "training/", "benchmarks/", ".ci/"):
        assert not any(p.startswith(prefix) for p in archive), prefix
    assert not any(p.endswith((".pt", ".pth", ".bin", ".ckpt", ".onnx")) for p in archive)
    assert not any(p.endswith(".safetensors") for p in archive), "no weights (e.g. training/experiment_assets)"
    needed = {"__init__.py", "requirements.txt", "pyproject.toml", "LICENSE", "README.md"}
    needed |= {str(p.relative_to(REPO_ROOT)) for folder in ("bolid", "nodes") for p in (REPO_ROOT / folder).glob("*.py")}
    needed |= {str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "example_workflows").glob("*.json")}
    assert needed <= set(archive), sorted(needed - set(archive))
    # the pack imports nothing from the folders left out
    for path in archive:
        if path.endswith(".py"):
            text = (REPO_ROOT / path).read_text()
            assert not re.search(r"^\s*(from|import)\s+\.*(training|tests|benchmarks)\b", text, re.M), path


@pytest.mark.skipif(not os.environ.get("COMFY_CLI"), reason="set COMFY_CLI=/path/to/comfy (pip install comfy-cli)")
def test_comfy_cli_validates_and_packs_exactly_the_computed_archive(tmp_path):
    """Gated: the real comfy-cli (offline: `validate` and `pack` need no network) accepts pyproject.toml and packs
    the same files as the listing above, from a clean clone of the committed tree (no untracked files)."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], check=True)
    env = {**os.environ, "DO_NOT_TRACK": "1"}
    cli = [os.environ["COMFY_CLI"], "--skip-prompt", "--no-enable-telemetry", "node"]
    validated = subprocess.run([*cli, "validate"], cwd=clone, env=env, capture_output=True, text=True, timeout=300)
    assert validated.returncode == 0 and "passed" in validated.stdout + validated.stderr, validated.stdout + validated.stderr
    subprocess.run([*cli, "pack"], cwd=clone, env=env, capture_output=True, text=True, timeout=300, check=True)
    packed = zipfile.ZipFile(clone / "node.zip").namelist()
    committed = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-tree", "-r", "--name-only", "HEAD"],
                               capture_output=True, text=True, check=True).stdout.split()
    expected = sorted(set(_archive_listing()) & set(committed))
    assert sorted(p for p in packed if not p.endswith("/")) == expected
