"""BoLID inside a real, running ComfyUI server (COMFYUI_PATH): the pack imports, /object_info lists every BoLID
node with its declared inputs, the example workflows are served as templates, and the example workflows run end
to end through POST /prompt and /history with random-weight files of the real architectures standing in for real
weights (SD1.5 checkpoint built with ComfyUI's own classes, a matching BoLID adapter, yolo11n-pose exported to
ONNX, a tiny InsightFace pack, a small Body-ID encoder) at 64x64 and 2 steps.

The server runs on 127.0.0.1 on a free port, with --cpu and a temporary --base-directory (models, custom_nodes,
input, output, user); the repository is linked into its custom_nodes. Every wait is bounded; the server is always
stopped. Building the 2 GB checkpoint takes ~1-2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

PACK_DIR_NAME = "ComfyUI-BoLID"
API_DIR = REPO_ROOT / "workflows" / "api"
CKPT = "bolid_test_sd15_random.safetensors"
ADAPTER = "bolid_test_sd15_random_adapter.safetensors"
ENCODER = "bolid_test_body_encoder.safetensors"
POSE = "yolo11n-pose-random.onnx"
CONTROLNET = "bolid_test_sd15_random_controlnet.safetensors"
FACE_PACK = "tinypack"
BODY_DIM = 32
EXAMPLE_FILE_NAMES = ("checkpoints/sdxl_lightning_4step.safetensors", "checkpoints/v1-5-pruned-emaonly.safetensors",
                      "bolid/bolid_sdxl.safetensors", "bolid/bolid_sd15.safetensors",
                      "bolid/bolid_body_encoder.safetensors", "bolid_pose/yolo11n-pose.onnx",
                      "bolid_body_ids/my_body.safetensors", "controlnet/control_v11p_sd15_openpose.safetensors",
                      "bolid_body_ids/person_a.safetensors", "bolid_body_ids/person_b.safetensors",
                      "bolid_face_ids/person_a.safetensors", "bolid_face_ids/person_b.safetensors")
START_TIMEOUT_S = 240
PROMPT_TIMEOUT_S = 420
# building the 2 GB random checkpoint: 1-2 minutes on an idle 2-core machine; a loaded one needs more
BUILD_TIMEOUT_S = int(os.environ.get("BOLID_SERVER_BUILD_TIMEOUT_S", "900"))


# A second adapter pack for the server, following the stacking protocol of IPAdapter_plus/PuLID/InstantID
# (tests/stacking_standin.py): SD1.5-style (block, number) keys, .add on a patch found there.
STACKING_NODE = """
import logging
import sys

sys.path[:0] = [{tests!r}, {repo!r}]
import torch
from stacking_standin import StandInReplace, extra_tokens_attention


class StackAdapter:
    @classmethod
    def INPUT_TYPES(cls):
        return {{"required": {{"model": ("MODEL",), "weight": ("FLOAT", {{"default": 1.0}})}}}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = "testing"

    def apply(self, model, weight):
        model = model.clone()
        unet = model.get_model_object("diffusion_model")
        blocks = [("input", i, b) for i, b in enumerate(unet.input_blocks)] + [("middle", 0, unet.middle_block)]
        blocks += [("output", i, b) for i, b in enumerate(unet.output_blocks)]
        gen = torch.Generator().manual_seed(0)
        attn2 = model.model_options["transformer_options"].setdefault("patches_replace", {{}}).setdefault("attn2", {{}})
        stacked = own = 0
        for name, number, block in blocks:
            layers = [t.attn2 for m in block.modules() for t in getattr(m, "transformer_blocks", [])]
            if not layers:
                continue
            inner = layers[0].to_k.weight.shape[0]
            kwargs = {{"tokens_k": torch.randn(1, 3, inner, generator=gen), "tokens_v": torch.randn(1, 3, inner, generator=gen),
                      "weight": weight, "sigma_start": 1e9, "sigma_end": 0.0}}
            if (name, number) in attn2:
                attn2[(name, number)].add(extra_tokens_attention, **kwargs)
                stacked += 1
            else:
                attn2[(name, number)] = StandInReplace(extra_tokens_attention, **kwargs)
                own += 1
        logging.info("stand-in adapter: stacked on %d existing patches, %d of its own", stacked, own)
        return (model,)


NODE_CLASS_MAPPINGS = {{"BoLIDTestStackAdapter": StackAdapter}}
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _photos() -> dict[str, np.ndarray]:
    """Real photos shipped in installed packages, each with a bright textured square: the tiny InsightFace
    stand-in detector finds such squares as faces."""
    import cv2
    import skimage.data

    from bolid.pose import import_ultralytics

    ultralytics = import_ultralytics()
    assets = Path(ultralytics.__file__).parent / "assets"
    photos = {"astronaut": skimage.data.astronaut(),
              "bus": cv2.imread(str(assets / "bus.jpg"))[..., ::-1],
              "zidane": cv2.imread(str(assets / "zidane.jpg"))[..., ::-1]}
    rng = np.random.default_rng(0)
    out = {}
    for name, img in photos.items():
        img = np.ascontiguousarray(img).copy()
        h, w = img.shape[:2]
        side = min(h, w) // 4
        x0 = w // 2 - side // 2
        img[h // 8:h // 8 + side, x0:x0 + side] = rng.integers(235, 256, (side, side, 3), dtype=np.uint8)
        out[name] = img
    return out


def _build_pose_model(folder: Path, photos: list[np.ndarray], target: Path) -> None:
    """Seeded random yolo11n-pose (tests/test_pose.py) with the person score biased up, so that every photo has
    detections above the runner's default confidence (0.25); exported to ONNX by BoLID's own exporter."""
    import test_pose
    import torch

    from bolid.pose import export_pose_onnx, import_ultralytics

    YOLO = import_ultralytics().YOLO  # noqa: N806 - the library's class name
    seeded = YOLO(str(test_pose.build_seeded_pose_model(folder, photos)))
    for seq in seeded.model.model[-1].cv3:
        torch.nn.init.constant_(seq[-1].bias, 2.0)
    hot = folder / "hot-pose.pt"
    seeded.save(str(hot))
    export_pose_onnx(hot, imgsz=320, output=target)


@pytest.fixture(scope="module")
def base_dir(comfyui, tmp_path_factory) -> Path:
    """ComfyUI's --base-directory with every model file the example workflows need."""
    import test_face
    from PIL import Image

    from bolid.body_encoder import BodyEncoder, BodyEncoderConfig
    from bolid.body_encoder_io import save_body_encoder

    base = tmp_path_factory.mktemp("comfy_base")
    models = base / "models"
    for sub in ("checkpoints", "bolid", "bolid_pose", "bolid_body_ids", "bolid_face_ids", "insightface/models", "loras",
                "controlnet"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK_DIR_NAME).symlink_to(REPO_ROOT, target_is_directory=True)
    (base / "custom_nodes" / "bolid_test_stacking").mkdir()
    (base / "custom_nodes" / "bolid_test_stacking" / "__init__.py").write_text(STACKING_NODE.format(
        tests=str(REPO_ROOT / "tests"), repo=str(REPO_ROOT)))
    (base / "input").mkdir()
    (base / "user" / "default").mkdir(parents=True)
    # no first-run dialogs in the graph editor
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    # empty files with the names the example workflows preselect: only listed, never loaded (the runs below
    # point the workflows at the random-weight files)
    for rel in EXAMPLE_FILE_NAMES:
        (models / rel).touch()

    started = time.monotonic()
    subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "comfy_random_sd15.py"), str(comfyui),
                    str(models / "checkpoints" / CKPT), str(models / "bolid" / ADAPTER), "--body-dim",
                    str(BODY_DIM), "--controlnet", str(models / "controlnet" / CONTROLNET)],
                   check=True, timeout=BUILD_TIMEOUT_S, cwd=REPO_ROOT)
    photos = _photos()
    _build_pose_model(tmp_path_factory.mktemp("pose"), list(photos.values()), models / "bolid_pose" / POSE)
    test_face.build_tiny_pack(models / "insightface" / "models" / FACE_PACK)
    import torch

    torch.manual_seed(0)
    encoder = BodyEncoder(BodyEncoderConfig(latent_dim=BODY_DIM, crop_size=32, decoder_size=16, width=8, hidden=64))
    save_body_encoder(encoder.eval(), models / "bolid" / ENCODER)
    _faceid_stand_ins(models, tmp_path_factory.mktemp("faceid"))
    for name, img in photos.items():
        Image.fromarray(img).save(base / "input" / f"{name}.png")
    # a photo set of three sizes (512x512, 810x1080 portrait, 1280x720 landscape) for Load Images From Folder
    (base / "input" / "server_photos").mkdir()
    for name, img in photos.items():
        Image.fromarray(img).save(base / "input" / "server_photos" / f"{name}.png")
    print(f"[server test] model files built in {time.monotonic() - started:.0f} s")
    return base


FACEID_ADAPTER = "bolid_test_faceid_sd15.safetensors"
FACEID_LORA = "test_faceid_lora.safetensors"
SD15_HIDDEN = (320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280)  # diffusers order


def _faceid_stand_ins(models: Path, work: Path) -> None:
    """A FaceID file with the public key layout (random values, SD1.5's layers, plus LoRA keys the importer must
    ignore) imported by `python -m bolid.faceid import`, run by the server's Python (in tests/test_fresh_install.py
    a venv with requirements.txt alone), as the README's five-minute guide does; and a one-layer LoRA in kohya
    format for core LoraLoaderModelOnly."""
    import torch
    from safetensors.torch import save_file

    from bolid.adapter_io import read_adapter_config

    g = torch.Generator().manual_seed(3)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    tokens, ctx = 4, 768
    ip_adapter = {}
    for n, hidden in enumerate(SD15_HIDDEN):  # processor 2n is the self-attention, 2n + 1 the cross-attention
        ip_adapter[f"{2 * n}.to_q_lora.down.weight"] = rnd(4, hidden)
        ip_adapter[f"{2 * n + 1}.to_k_lora.down.weight"] = rnd(4, ctx)
        ip_adapter[f"{2 * n + 1}.to_k_ip.weight"] = rnd(hidden, ctx)
        ip_adapter[f"{2 * n + 1}.to_v_ip.weight"] = rnd(hidden, ctx)
    state = {"image_proj": {"proj.0.weight": rnd(1024, 512), "proj.0.bias": rnd(1024),
                            "proj.2.weight": rnd(ctx * tokens, 1024), "proj.2.bias": rnd(ctx * tokens),
                            "norm.weight": 1 + rnd(ctx), "norm.bias": rnd(ctx)},
             "ip_adapter": ip_adapter}
    source = work / "ip-adapter-faceid_sd15.bin"
    torch.save(state, str(source))
    out = models / "bolid" / FACEID_ADAPTER
    subprocess.run([os.environ.get("BOLID_SERVER_PYTHON") or sys.executable, "-m", "bolid.faceid", "import",
                    str(source), "--out", str(out)], check=True, timeout=300, cwd=REPO_ROOT)
    config = read_adapter_config(out)
    assert (config.num_layers, config.context_dim, config.face_tokens) == (16, ctx, tokens), config.describe()
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{key}.lora_down.weight": torch.randn(4, 768) * 0.01, f"{key}.lora_up.weight": torch.randn(320, 4) * 0.01,
               f"{key}.alpha": torch.tensor(4.0)}, str(models / "loras" / FACEID_LORA))


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path) -> None:
        self.url, self.proc, self.log = url, proc, log

    def get(self, path: str, timeout: float = 30) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
            return resp.read()

    def get_json(self, path: str):
        return json.loads(self.get(path))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def run(self, prompt: dict, timeout: float = PROMPT_TIMEOUT_S) -> dict:
        """Queue a prompt, wait for it, return its /history entry (fails with the server's error)."""
        body = json.dumps({"prompt": prompt, "client_id": uuid.uuid4().hex}).encode()
        request = urllib.request.Request(self.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                prompt_id = json.loads(resp.read())["prompt_id"]
        except urllib.error.HTTPError as exc:
            pytest.fail(f"POST /prompt refused the workflow: {exc.read().decode(errors='replace')[:3000]}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"ComfyUI exited:\n{self.log_text()[-3000:]}"
            try:
                history = self.get_json(f"/history/{prompt_id}")
            except (TimeoutError, urllib.error.URLError):  # a busy server (e.g. loading a checkpoint): ask again
                continue
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") != "success":
                    pytest.fail(f"prompt failed: {json.dumps(entry['status'])[:3000]}\n{self.log_text()[-3000:]}")
                return entry
            time.sleep(1.0)
        pytest.fail(f"prompt {prompt_id} did not finish in {timeout} s\n{self.log_text()[-3000:]}")

    def image(self, item: dict):
        from PIL import Image

        query = urllib.parse.urlencode({k: item[k] for k in ("filename", "subfolder", "type")})
        return Image.open(io.BytesIO(self.get(f"/view?{query}")))


@pytest.fixture(scope="module")
def server(comfyui, base_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("comfy_log") / "comfyui.log"
    # BOLID_SERVER_PYTHON: another interpreter runs the server (tests/test_fresh_install.py's fresh venv)
    command = [os.environ.get("BOLID_SERVER_PYTHON") or sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base_dir), "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch", "--preview-method", "none"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=comfyui, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    started = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with {proc.returncode} while starting:\n{server.log_text()[-4000:]}")
            try:
                server.get("/object_info", timeout=10)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                if time.monotonic() - started > START_TIMEOUT_S:
                    pytest.fail(f"ComfyUI did not answer in {START_TIMEOUT_S} s:\n{server.log_text()[-4000:]}")
                time.sleep(1.0)
        print(f"[server test] ComfyUI answered /object_info after {time.monotonic() - started:.0f} s")
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)


def _prompt(name: str) -> dict:
    return copy.deepcopy(json.loads((API_DIR / f"{name}.json").read_text()))


def _set(prompt: dict, class_type: str, **values) -> None:
    nodes = [n for n in prompt.values() if n["class_type"] == class_type]
    assert nodes, f"no {class_type} node"
    for node in nodes:
        for key, value in values.items():
            assert key in node["inputs"], f"{class_type} has no input {key}"
            node["inputs"][key] = value


def _set_titled(prompt: dict, title: str, **values) -> None:
    """Set widget values of the one node with this title (where a workflow has two nodes of a type)."""
    (node,) = [n for n in prompt.values() if n["_meta"]["title"] == title]
    for key, value in values.items():
        assert key in node["inputs"], f"{title!r} has no input {key}"
        node["inputs"][key] = value


def _stand_in_files(prompt: dict) -> dict:
    """Point the workflow at the random-weight files and shrink it to 64x64, 2 steps; nothing else changes."""
    present = {n["class_type"] for n in prompt.values()}
    replacements = {
        "CheckpointLoaderSimple": {"ckpt_name": CKPT}, "BoLIDLoadAdapter": {"adapter_name": ADAPTER},
        "BoLIDLoadBodyEncoder": {"encoder_name": ENCODER}, "BoLIDLoadPoseModel": {"model_name": POSE},
        "BoLIDLoadInsightFace": {"model_name": FACE_PACK}, "ControlNetLoader": {"control_net_name": CONTROLNET},
        "BoLIDPosesToOpenPose": {"width": 64, "height": 64, "min_confidence": 0.0},
        "EmptyLatentImage": {"width": 64, "height": 64}, "KSampler": {"steps": 2},
        # random pose weights give low keypoint confidences: keep every detected view
        "BoLIDEncodeBodyFromImages": {"min_confidence": 0.0},
    }
    for class_type, values in replacements.items():
        if class_type in present:
            _set(prompt, class_type, **values)
    return prompt


def _saved_images(server: Server, entry: dict, prompt: dict, class_type: str) -> list:
    images = []
    for node_id, node in prompt.items():
        if node["class_type"] == class_type:
            images += [server.image(item) for item in entry["outputs"].get(node_id, {}).get("images", [])]
    return images


# ----------------------------------------------------------------------------------------------------- tests


def test_pack_imports_without_failure(server, pack):
    log = server.log_text()
    assert "IMPORT FAILED" not in log, log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    times = log[log.index("Import times for custom nodes:"):]
    assert PACK_DIR_NAME in times.split("\n\n")[0]


def test_object_info_lists_every_bolid_node_with_its_inputs(server, pack):
    from test_workflows import build

    info = server.get_json("/object_info")
    declared = build.bolid_definitions()
    assert set(pack.NODE_CLASS_MAPPINGS) <= set(info)
    for class_type, definition in declared.items():
        served = info[class_type]
        assert served["display_name"] == pack.NODE_DISPLAY_NAME_MAPPINGS[class_type]
        assert served["category"].startswith("BoLID")
        assert served["output"] == definition["output"] and served["output_name"] == definition["output_name"]
        for section in ("required", "optional"):
            assert list(served["input"].get(section, {})) == list(definition["input"][section]), (class_type, section)
        ours, theirs = (build.spec_from_definition(class_type, d) for d in (definition, served))
        assert theirs.inputs == ours.inputs, class_type
        assert [(w.name, w.kind) for w in theirs.widgets] == [(w.name, w.kind) for w in ours.widgets], class_type
    # the model folders are registered: the files put there are offered in the combos
    assert ADAPTER in info["BoLIDLoadAdapter"]["input"]["required"]["adapter_name"][0]
    assert ENCODER in info["BoLIDLoadBodyEncoder"]["input"]["required"]["encoder_name"][0]
    assert POSE in info["BoLIDLoadPoseModel"]["input"]["required"]["model_name"][0]
    assert FACE_PACK in info["BoLIDLoadInsightFace"]["input"]["required"]["model_name"][0]


def test_example_workflows_are_served_as_templates(server):
    templates = server.get_json("/workflow_templates")
    names = templates.get(PACK_DIR_NAME, [])
    expected = sorted(p.stem for p in (REPO_ROOT / "example_workflows").glob("*.json"))
    assert sorted(names) == expected, f"each example listed exactly once: {templates}"
    for name in expected:
        served = server.get(f"/api/workflow_templates/{PACK_DIR_NAME}/{name}.json")
        assert json.loads(served) == json.loads((REPO_ROOT / "example_workflows" / f"{name}.json").read_text())
        picture = server.get(f"/api/workflow_templates/{PACK_DIR_NAME}/{name}.jpg")
        assert picture[:3] == b"\xff\xd8\xff"  # the template browser's picture (a JPEG)


def test_the_frontend_sends_exactly_the_api_files(server):
    """ComfyUI's own frontend (served by this server, in headless Chromium) loads each UI workflow and turns it into
    a prompt with app.graphToPrompt(): that prompt must equal the checked-in API file (widget order, links)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright to run the frontend check")
    chromium = os.environ.get("BOLID_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("no Chromium (apt-get install chromium, or set BOLID_CHROMIUM)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(server.url, wait_until="networkidle", timeout=120_000)
            page.wait_for_function("window.app && window.app.graph && window.app.canvas", timeout=120_000)
            for path in sorted((REPO_ROOT / "example_workflows").glob("*.json")):
                sent = page.evaluate("async (wf) => { await window.app.loadGraphData(wf, true, true, 'check');"
                                     " return (await window.app.graphToPrompt()).output; }",
                                     json.loads(path.read_text()))
                expected = json.loads((API_DIR / path.name).read_text())
                assert {k: (v["class_type"], v["inputs"]) for k, v in sent.items()} == \
                       {k: (v["class_type"], v["inputs"]) for k, v in expected.items()}, path.name
        finally:
            browser.close()


def test_sd15_photo_workflow_runs(server):
    prompt = _stand_in_files(_prompt("photo_face_body_sd15"))
    _set(prompt, "LoadImage", image="astronaut.png")
    started = time.monotonic()
    entry = server.run(prompt)
    elapsed = time.monotonic() - started
    (image,) = _saved_images(server, entry, prompt, "SaveImage")
    assert image.size == (64, 64)
    (views,) = _saved_images(server, entry, prompt, "PreviewImage")  # the views the body was encoded from
    assert views.size[0] > 0
    assert "BoLID: patched 16 cross-attention layers" in server.log_text()
    print(f"[server test] photo_face_body_sd15 ran in {elapsed:.1f} s; /history outputs: "
          f"{json.dumps(entry['outputs'])}")


def test_photos_to_body_id_then_text_only_workflow_runs(server, base_dir):
    from bolid.body_id_io import load_body_id

    photos_prompt = _stand_in_files(_prompt("photos_to_body_id"))
    _set(photos_prompt, "BoLIDLoadImagesFromFolder", folder="server_photos")
    _set(photos_prompt, "BoLIDSaveBodyID", name="server_test_body", overwrite=True)
    server.run(photos_prompt)
    saved = base_dir / "models" / "bolid_body_ids" / "server_test_body.safetensors"
    body = load_body_id(saved)
    assert body.dim == BODY_DIM and len(body.views) == 3
    # the three photos of three shapes reached the encoder as a list, each at its own size
    assert "BoLID: loaded 3 photo(s) from server_photos (astronaut.png 512x512, bus.png 810x1080, " \
           "zidane.png 1280x720)" in server.log_text()

    text_prompt = _stand_in_files(_prompt("text_only_body_id_sdxl_lightning"))
    _set(text_prompt, "BoLIDLoadBodyID", body_id_name=saved.name)
    entry = server.run(text_prompt)
    (with_body,) = _saved_images(server, entry, text_prompt, "SaveImage")
    assert with_body.size == (64, 64)
    print(f"[server test] text-only /history outputs: {json.dumps(entry['outputs'])}")

    # the body branch changes the result: weight_body 0 (bit-identical to the plain model) gives another image
    _set(text_prompt, "BoLIDApplyAdapter", weight_body=0.0)
    (without,) = _saved_images(server, server.run(text_prompt), text_prompt, "SaveImage")
    a, b = (np.asarray(im.convert("RGB"), dtype=np.int16) for im in (with_body, without))
    assert a.std() > 0, "the random-weight model decoded a flat image: the comparison would mean nothing"
    assert np.abs(a - b).max() > 0


def test_faceid_face_only_workflow_runs(server):
    """The FaceID template (imported face branch, FaceID LoRA through core LoraLoaderModelOnly, no body branch)."""
    prompt = _stand_in_files(_prompt("faceid_face_only_sd15"))
    _set(prompt, "BoLIDLoadAdapter", adapter_name=FACEID_ADAPTER)
    _set(prompt, "LoraLoaderModelOnly", lora_name=FACEID_LORA)
    _set(prompt, "LoadImage", image="astronaut.png")
    entry = server.run(prompt)
    (image,) = _saved_images(server, entry, prompt, "SaveImage")
    assert image.size == (64, 64)
    log = server.log_text()
    assert "branches: face" in log and "lora key not loaded" not in log


def test_pose_controlnet_workflow_runs(server, base_dir):
    """Pose from a photo through a random-weight SD1.5 ControlNet (core ControlNetApplyAdvanced), body from a stored
    Body ID through Apply Adapter (BoLID): the control image is drawn and changes the result."""
    from bolid.body_id_io import sample_body_id, save_body_id

    save_body_id(sample_body_id(BODY_DIM, seed=3), base_dir / "models" / "bolid_body_ids" / "server_pose_body.safetensors",
                 overwrite=True)
    prompt = _stand_in_files(_prompt("pose_controlnet_body_id_sd15"))
    _set(prompt, "LoadImage", image="zidane.png")
    _set(prompt, "BoLIDLoadBodyID", body_id_name="server_pose_body.safetensors")
    entry = server.run(prompt)
    (image,) = _saved_images(server, entry, prompt, "SaveImage")
    (control,) = _saved_images(server, entry, prompt, "PreviewImage")
    assert image.size == (64, 64) and control.size == (64, 64)
    assert np.asarray(control.convert("RGB")).max() > 0, "no pose drawn in the control image"
    assert "BoLID: patched 16 cross-attention layers" in server.log_text()
    _set(prompt, "ControlNetApplyAdvanced", strength=0.0)
    (without,) = _saved_images(server, server.run(prompt), prompt, "SaveImage")
    a, b = (np.asarray(im.convert("RGB"), dtype=np.int16) for im in (image, without))
    assert np.abs(a - b).max() > 0, "the ControlNet did not change the image"


def test_bolid_and_a_second_adapter_pack_on_one_model(server):
    """BoLID, then another pack stacking at SD1.5-style keys (the stand-in protocol node) on the same model."""
    prompt = _stand_in_files(_prompt("photo_face_body_sd15"))
    _set(prompt, "LoadImage", image="astronaut.png")
    (apply_id,) = [k for k, n in prompt.items() if n["class_type"] == "BoLIDApplyAdapter"]
    (bolid_only,) = _saved_images(server, server.run(prompt), prompt, "SaveImage")
    stack_id = str(max(int(k) for k in prompt) + 1)
    prompt[stack_id] = {"class_type": "BoLIDTestStackAdapter", "inputs": {"model": [apply_id, 0], "weight": 1.0}}
    for node in prompt.values():
        if node["class_type"] == "KSampler":
            node["inputs"]["model"] = [stack_id, 0]
    (both,) = _saved_images(server, server.run(prompt), prompt, "SaveImage")
    assert "stand-in adapter: stacked on 16 existing patches, 0 of its own" in server.log_text()
    a, b = (np.asarray(im.convert("RGB"), dtype=np.int16) for im in (bolid_only, both))
    assert a.std() > 0 and np.abs(a - b).max() > 0, "the second adapter changed the image"


def test_two_people_regional_workflow_runs(server, base_dir):
    """Two Apply Adapter (BoLID) nodes on one model with disjoint masks from core mask nodes (left / right half),
    each with its own stored Body ID and Face ID: both patch the model, and the right person's identity matters
    (giving the right half the left person's identity changes the image). That each identity acts only inside its
    mask is shown layer by layer in tests/test_comfyui_real.py."""
    import torch

    from bolid.body_id_io import sample_body_id, save_body_id
    from bolid.face_id_io import save_face_id
    from bolid.identity import FaceEmbeds

    models = base_dir / "models"
    for seed, person in enumerate(("left", "right")):
        save_body_id(sample_body_id(BODY_DIM, seed=10 + seed),
                     models / "bolid_body_ids" / f"server_{person}.safetensors", overwrite=True)
        face = torch.nn.functional.normalize(torch.randn(512, generator=torch.Generator().manual_seed(20 + seed)), dim=0)
        save_face_id(FaceEmbeds(face, source="server test"), models / "bolid_face_ids" / f"server_{person}.safetensors",
                     overwrite=True)
    prompt = _stand_in_files(_prompt("two_people_regional_sd15"))
    for person in ("left", "right"):
        _set_titled(prompt, f"Body ID: {person} person", body_id_name=f"server_{person}.safetensors")
        _set_titled(prompt, f"Face ID: {person} person", face_id_name=f"server_{person}.safetensors")
    patched_before = server.log_text().count("BoLID: patched 16 cross-attention layers")
    entry = server.run(prompt)
    (image,) = _saved_images(server, entry, prompt, "SaveImage")
    assert image.size == (64, 64)
    assert server.log_text().count("BoLID: patched 16 cross-attention layers") == patched_before + 2
    _set_titled(prompt, "Body ID: right person", body_id_name="server_left.safetensors")
    _set_titled(prompt, "Face ID: right person", face_id_name="server_left.safetensors")
    (same_twice,) = _saved_images(server, server.run(prompt), prompt, "SaveImage")
    a, b = (np.asarray(im.convert("RGB"), dtype=np.int16) for im in (image, same_twice))
    assert a.std() > 0 and np.abs(a - b).max() > 0, "the right person's identity did not change the image"
