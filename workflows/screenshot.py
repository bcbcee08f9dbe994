"""Screenshot of an example workflow in ComfyUI's graph editor (headless Chromium), for the README.

    python workflows/screenshot.py /path/to/ComfyUI [workflow name] [--out docs/workflow.png] [--chromium PATH]
    python workflows/screenshot.py /path/to/ComfyUI --thumbnails   # example_workflows/<name>.jpg for every example
    python workflows/screenshot.py --schematic NAME                  # without ComfyUI or a browser: a drawn map

Starts ComfyUI (--cpu, 127.0.0.1, free port, temporary --base-directory with the pack linked into custom_nodes and
empty placeholder files named as the workflow expects, so its file lists show those names), opens the editor in
headless Chromium through Playwright (never downloads a browser: give the system Chromium), loads the workflow
with the frontend's own ``app.loadGraphData`` and saves a PNG. ``--thumbnails`` saves a small JPEG of every
example next to it in example_workflows/, which ComfyUI's template browser shows as the template's picture. The
server is always stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLACEHOLDERS = ("checkpoints/sdxl_lightning_4step.safetensors", "checkpoints/v1-5-pruned-emaonly.safetensors",
                "bolid/bolid_sdxl.safetensors", "bolid/bolid_sd15.safetensors", "bolid/bolid_body_encoder.safetensors",
                "bolid_pose/yolo11n-pose.onnx", "bolid_body_ids/my_body.safetensors",
                "insightface/models/antelopev2/scrfd_10g_bnkps.onnx", "insightface/models/buffalo_l/det_10g.onnx",
                "checkpoints/sd_xl_base_1.0.safetensors",
                "controlnet/control_v11p_sd15_openpose.safetensors",
                "bolid/bolid_ip-adapter-faceid_sd15.safetensors", "bolid/bolid_ip-adapter-faceid_sdxl.safetensors",
                "loras/ip-adapter-faceid_sd15_lora.safetensors", "loras/ip-adapter-faceid_sdxl_lora.safetensors",
                "bolid_body_ids/person_a.safetensors", "bolid_body_ids/person_b.safetensors",
                "bolid_face_ids/person_a.safetensors", "bolid_face_ids/person_b.safetensors")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare_base(base: Path) -> None:
    import numpy as np
    from PIL import Image

    for rel in PLACEHOLDERS:
        (base / "models" / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / "models" / rel).touch()
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "ComfyUI-BoLID").symlink_to(REPO, target_is_directory=True)
    (base / "input").mkdir()
    (base / "user" / "default").mkdir(parents=True)
    # no first-run template dialog, no minimap over the graph
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps({"Comfy.TutorialCompleted": True,
                                                                                   "Comfy.Minimap.Visible": False}))
    try:
        import skimage.data

        photo = skimage.data.astronaut()
    except ImportError:
        photo = np.full((512, 512, 3), 128, np.uint8)
    for name in ("person.png", "pose_reference.png"):  # the photos the workflows preselect
        Image.fromarray(photo).save(base / "input" / name)
    (base / "input" / "my_person").mkdir()  # the photo folder photos_to_body_id preselects
    for name in ("person_1.png", "person_2.png"):
        Image.fromarray(photo).save(base / "input" / "my_person" / name)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--schematic"] and len(argv) == 2:
        out = REPO / "example_workflows" / f"{argv[1]}.jpg"
        schematic(argv[1], out)
        print(f"wrote {out}")
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("comfyui", type=Path)
    parser.add_argument("workflow", nargs="?", default="photo_face_body_sdxl_lightning")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "workflow_photo_face_body_sdxl_lightning.png")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--size", default="1600x1000")
    parser.add_argument("--thumbnails", action="store_true", help="a JPEG per example in example_workflows/")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    if args.thumbnails:
        shots = [(p.stem, p.with_suffix(".jpg")) for p in sorted((REPO / "example_workflows").glob("*.json"))]
    else:
        shots = [(args.workflow, args.out)]

    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="bolid-shot-") as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        _prepare_base(base)
        port = _free_port()
        log = open(Path(tmp) / "comfyui.log", "wb")
        proc = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                 "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
                                 "--disable-auto-launch"], cwd=args.comfyui, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 600  # a busy machine starts ComfyUI slowly
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("ComfyUI did not start:\n" + (Path(tmp) / "comfyui.log").read_text()[-3000:])
                try:
                    urllib.request.urlopen(url + "/object_info", timeout=10).read()
                    break
                except OSError:
                    time.sleep(1)
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=args.chromium, headless=True, args=[
                    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync"])
                page = browser.new_page(viewport={"width": width, "height": height})
                page.goto(url, wait_until="networkidle", timeout=120_000)
                page.wait_for_function("window.app && window.app.graph && window.app.canvas", timeout=120_000)
                for name, out in shots:
                    workflow = json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
                    page.evaluate("async ([wf, name]) => { await window.app.loadGraphData(wf, true, true, name); }",
                                  [workflow, f"{name}.json"])
                    page.wait_for_timeout(4000)
                    page.keyboard.press("Escape")  # close any toast/dialog
                    page.wait_for_timeout(1000)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    png = Path(tmp) / "shot.png"
                    page.screenshot(path=str(png))
                    _save(png, out, thumbnail=args.thumbnails)
                    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")
                browser.close()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            log.close()
    return 0


def schematic(name: str, out: Path, size: tuple[int, int] = (768, 438)) -> None:
    """The template picture drawn from the UI file alone (node boxes at their positions, titles, links), for
    machines without Chromium; the real editor screenshot (--thumbnails) replaces it where one is available."""
    from PIL import Image, ImageDraw, ImageFont

    ui = json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
    nodes = {n["id"]: n for n in ui["nodes"]}
    x0 = min(n["pos"][0] for n in nodes.values()) - 20
    y0 = min(n["pos"][1] for n in nodes.values()) - 50
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes.values()) + 20
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes.values()) + 20
    scale = min(size[0] / (x1 - x0), size[1] / (y1 - y0))

    def at(x: float, y: float) -> tuple[float, float]:
        return ((x - x0) * scale + (size[0] - (x1 - x0) * scale) / 2, (y - y0) * scale + (size[1] - (y1 - y0) * scale) / 2)

    image = Image.new("RGB", size, (32, 32, 32))
    draw = ImageDraw.Draw(image)
    try:
        font = ImageFont.load_default(size=max(8, round(22 * scale)))
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    for link in ui["links"]:
        src, dst = nodes[link[1]], nodes[link[3]]
        a = at(src["pos"][0] + src["size"][0], src["pos"][1] + 20 + 22 * link[2])
        b = at(dst["pos"][0], dst["pos"][1] + 20 + 22 * link[4])
        draw.line([a, b], fill=(150, 150, 150), width=max(1, round(3 * scale)))
    for node in nodes.values():
        (ax, ay), (bx, by) = at(*node["pos"]), at(node["pos"][0] + node["size"][0], node["pos"][1] + node["size"][1])
        top = at(node["pos"][0], node["pos"][1] - 30)[1]
        draw.rectangle([ax, top, bx, by], fill=node.get("bgcolor", "#353535"), outline=(90, 90, 90))
        draw.rectangle([ax, top, bx, ay], fill=node.get("color", "#222222"))
        draw.text((ax + 3, top + 1), node.get("title") or node["type"], fill=(230, 230, 230), font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, "JPEG", quality=82, optimize=True)


def _save(png: Path, out: Path, thumbnail: bool) -> None:
    from PIL import Image

    image = Image.open(png).convert("RGB")
    if thumbnail:  # the canvas only (no side bar / top bar), small
        image = image.crop((64, 80, image.width, image.height)).resize((768, 438), Image.LANCZOS)
        image.save(out, "JPEG", quality=82, optimize=True)
    else:
        image.save(out, optimize=True)


if __name__ == "__main__":
    sys.exit(main())
