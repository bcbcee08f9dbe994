"""Build BoLID's example workflows from one Python description, in ComfyUI's UI format and in API format.

    python workflows/build.py            write workflows/ui/*.json, workflows/api/*.json, example_workflows/*.json
    python workflows/build.py --check    exit 1 if any of those files differs from what this script builds
    python workflows/build.py --dump-core /path/to/ComfyUI
                                         refresh workflows/spec/core_nodes.json from a real ComfyUI
    python workflows/build.py --update-widget-lock
                                         record BoLID's widget order (refuses anything but appending)

Widget values are positional in the UI format, so their order is taken from the nodes' own INPUT_TYPES (BoLID's
nodes from this repository, ComfyUI's core nodes from the checked-in workflows/spec/core_nodes.json): a workflow
here names widgets, never positions. The same spec functions are used by tests/test_workflows.py to validate
the files independently of how they were built.

Runs without ComfyUI: BoLID's INPUT_TYPES are read with a stand-in ``folder_paths`` (model-file lists empty).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import sys
import tempfile
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
UI_DIR = WORKFLOWS / "ui"  # not workflows/*.json: ComfyUI would list each template twice
API_DIR = WORKFLOWS / "api"
EXAMPLES = REPO / "example_workflows"
CORE_SPEC = WORKFLOWS / "spec" / "core_nodes.json"
WIDGET_LOCK = WORKFLOWS / "spec" / "bolid_widgets.json"
PACK_MODULE_NAME = "bolid_pack"  # the name tests/conftest.py uses, so both share one loaded copy

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
UPLOAD_KEYS = ("image_upload", "video_upload", "animated_image_upload")
# Nodes that exist only in ComfyUI's frontend (never sent to the server): type -> widget names.
FRONTEND_ONLY = {"MarkdownNote": ("text",), "Note": ("text",)}
CORE_NODE_TYPES = ("CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode",
                   "SaveImage", "PreviewImage", "LoadImage", "ImageBatch", "LoraLoaderModelOnly",
                   "ControlNetLoader", "ControlNetApplyAdvanced", "SolidMask", "MaskComposite", "InvertMask")
# core nodes defined outside ComfyUI's nodes.py (its comfy_extras modules, loaded at start-up): type -> module
CORE_EXTRA_MODULES = {"SolidMask": "comfy_extras.nodes_mask", "MaskComposite": "comfy_extras.nodes_mask",
                      "InvertMask": "comfy_extras.nodes_mask"}

# File names the workflows expect (README "User guide" lists where each goes).
SDXL_LIGHTNING_CKPT = "sdxl_lightning_4step.safetensors"
SD15_CKPT = "v1-5-pruned-emaonly.safetensors"
ADAPTER_SDXL = "bolid_sdxl.safetensors"
ADAPTER_SD15 = "bolid_sd15.safetensors"
BODY_ENCODER = "bolid_body_encoder.safetensors"
POSE_MODEL = "yolo11n-pose.onnx"
FACE_PACK = "antelopev2"
BODY_ID_NAME = "my_body"
PHOTO = "person.png"
SDXL_BASE_CKPT = "sd_xl_base_1.0.safetensors"
# face-only adapters written by `python -m bolid.faceid import <FaceID .bin> --out models/bolid` (default names)
FACEID_ADAPTER = {"sd15": "bolid_ip-adapter-faceid_sd15.safetensors", "sdxl": "bolid_ip-adapter-faceid_sdxl.safetensors"}
FACEID_LORA = {"sd15": "ip-adapter-faceid_sd15_lora.safetensors", "sdxl": "ip-adapter-faceid_sdxl_lora.safetensors"}
FACEID_BIN = {"sd15": "ip-adapter-faceid_sd15.bin", "sdxl": "ip-adapter-faceid_sdxl.bin"}
FACEID_REPO = "https://huggingface.co/h94/IP-Adapter-FaceID/resolve/main/"

# Where the public files come from: ComfyUI's frontend reads a node's properties.models (name, url, directory)
# to offer the download of a missing file.
PUBLIC_MODELS: dict[str, dict[str, str]] = {
    SD15_CKPT: {"url": "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
                       "v1-5-pruned-emaonly.safetensors", "directory": "checkpoints"},
    SDXL_LIGHTNING_CKPT: {"url": "https://huggingface.co/ByteDance/SDXL-Lightning/resolve/main/"
                                 "sdxl_lightning_4step.safetensors", "directory": "checkpoints"},
    SDXL_BASE_CKPT: {"url": "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/"
                            "sd_xl_base_1.0.safetensors", "directory": "checkpoints"},
    **{name: {"url": FACEID_REPO + name, "directory": "loras"} for name in FACEID_LORA.values()},
}


def model_metadata(*names: str) -> tuple[dict[str, str], ...]:
    """properties.models entries for public files (names without a public source are left out)."""
    return tuple({"name": n, **PUBLIC_MODELS[n]} for n in names if n in PUBLIC_MODELS)


CONTROLNET_OPENPOSE_SD15 = "control_v11p_sd15_openpose.safetensors"
POSE_PHOTO = "pose_reference.png"
PHOTO_FOLDER = "my_person"  # a sub-folder of ComfyUI's input/ with the photos of one person


# ----------------------------------------------------------------------------------------------------------------
# node specs


@dataclass(frozen=True)
class Widget:
    name: str
    kind: str  # INT FLOAT STRING BOOLEAN COMBO, or CONTROL / UPLOAD for the frontend's extra widgets
    options: dict = field(default_factory=dict, hash=False, compare=False)
    choices: tuple = ()

    @property
    def is_extra(self) -> bool:
        """A frontend-only widget: saved in widgets_values, never sent in the API prompt."""
        return self.kind in ("CONTROL", "UPLOAD")


@dataclass(frozen=True)
class Socket:
    name: str
    type: str
    required: bool


@dataclass(frozen=True)
class NodeSpec:
    """What a workflow file must agree with: sockets, widgets (in widgets_values order) and outputs."""

    class_type: str
    inputs: tuple[Socket, ...]
    widgets: tuple[Widget, ...]
    outputs: tuple[tuple[str, str], ...]  # (name, type)
    output_node: bool = False
    frontend_only: bool = False


def type_name(value: Any) -> Any:
    """ComfyUI types may be str enums; lists are combo choices."""
    if isinstance(value, (list, tuple)):
        return [type_name(v) for v in value]
    return str(getattr(value, "value", value))


def normalise_input_types(raw: dict) -> dict:
    """INPUT_TYPES() -> JSON-able {"required": {name: [type_or_choices, options]}, "optional": {...}}."""
    out: dict[str, dict] = {}
    for section in ("required", "optional"):
        entries = raw.get(section) or {}
        out[section] = {}
        for name, value in entries.items():
            kind = type_name(value[0])
            options = dict(value[1]) if len(value) > 1 and isinstance(value[1], dict) else {}
            out[section][name] = [kind, json.loads(json.dumps(options, default=str))]
    return out


def spec_from_definition(class_type: str, definition: dict) -> NodeSpec:
    """NodeSpec from {"input": normalised INPUT_TYPES, "output": [...], "output_name": [...], "output_node"}."""
    inputs: list[Socket] = []
    widgets: list[Widget] = []
    for section in ("required", "optional"):
        for name, entry in definition["input"].get(section, {}).items():
            kind, options = entry[0], (entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {})
            choices: tuple | None = None
            if isinstance(kind, list):
                choices = tuple(kind)
            elif kind == "COMBO":
                choices = tuple(options.get("options", []))
            if choices is not None and not options.get("forceInput"):
                widgets.append(Widget(name, "COMBO", options, choices))
                if options.get("control_after_generate"):
                    widgets.append(Widget(f"{name}:control_after_generate", "CONTROL"))
                if any(options.get(k) for k in UPLOAD_KEYS):
                    widgets.append(Widget("upload", "UPLOAD"))
            elif kind in WIDGET_TYPES and not options.get("forceInput"):
                widgets.append(Widget(name, kind, options))
                # the frontend adds a "control after generate" widget to these (legacy rule: seed/noise_seed)
                if kind == "INT" and (options.get("control_after_generate") or name in ("seed", "noise_seed")):
                    widgets.append(Widget(f"{name}:control_after_generate", "CONTROL"))
            else:
                inputs.append(Socket(name, kind if isinstance(kind, str) else "COMBO", section == "required"))
    outputs = tuple(zip(definition.get("output_name") or definition["output"], definition["output"], strict=True))
    return NodeSpec(class_type, tuple(inputs), tuple(widgets), outputs, bool(definition.get("output_node")))


def frontend_only_spec(class_type: str) -> NodeSpec:
    widgets = tuple(Widget(n, "STRING") for n in FRONTEND_ONLY[class_type])
    return NodeSpec(class_type, (), widgets, (), frontend_only=True)


def load_pack() -> types.ModuleType:
    """The repository as a package, loaded the way ComfyUI's custom-node loader does (shared with conftest)."""
    if PACK_MODULE_NAME in sys.modules:
        return sys.modules[PACK_MODULE_NAME]
    spec = importlib.util.spec_from_file_location(PACK_MODULE_NAME, REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE_NAME] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def stand_in_folder_paths():
    """A ``folder_paths`` with empty model folders for the duration (the real one, if imported, is restored)."""
    previous = sys.modules.get("folder_paths")
    with tempfile.TemporaryDirectory(prefix="bolid-spec-") as models:
        fp = types.ModuleType("folder_paths")
        fp.models_dir = models
        fp.folder_names_and_paths = {}
        fp.get_folder_paths = lambda name: list(fp.folder_names_and_paths.get(name, ([], set()))[0])
        fp.get_filename_list = lambda name: []
        fp.get_full_path = lambda name, filename: None
        fp.get_input_directory = lambda: str(Path(models) / "input")  # absent: folder lists are empty
        sys.modules["folder_paths"] = fp
        try:
            yield fp
        finally:
            if previous is None:
                sys.modules.pop("folder_paths", None)
            else:
                sys.modules["folder_paths"] = previous


def bolid_definitions() -> dict[str, dict]:
    """BoLID's node definitions in /object_info's shape, read from the classes (model-file lists empty)."""
    pack = load_pack()
    out = {}
    with stand_in_folder_paths():
        for class_type, cls in pack.NODE_CLASS_MAPPINGS.items():
            out[class_type] = {
                "input": normalise_input_types(cls.INPUT_TYPES()),
                "output": [type_name(t) for t in cls.RETURN_TYPES],
                "output_name": list(getattr(cls, "RETURN_NAMES", None) or [type_name(t) for t in cls.RETURN_TYPES]),
                "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
            }
    return out


def core_definitions() -> dict[str, dict]:
    return json.loads(CORE_SPEC.read_text())["nodes"]


def node_specs() -> dict[str, NodeSpec]:
    specs = {name: spec_from_definition(name, d) for name, d in core_definitions().items()}
    specs.update({name: spec_from_definition(name, d) for name, d in bolid_definitions().items()})
    specs.update({name: frontend_only_spec(name) for name in FRONTEND_ONLY})
    return specs


def core_node_class(class_type: str) -> type:
    """A core node's class in the ComfyUI on sys.path (nodes.py, or the comfy_extras module that defines it)."""
    module = importlib.import_module(CORE_EXTRA_MODULES.get(class_type, "nodes"))  # ComfyUI's nodes.py
    return module.NODE_CLASS_MAPPINGS[class_type]


def dump_core(comfyui: Path) -> dict:
    """The core nodes the workflows use, as a real ComfyUI defines them; file-list combos are stored empty."""
    sys.path.insert(0, str(comfyui))
    import comfy.cli_args  # type: ignore[import-not-found]

    comfy.cli_args.args.cpu = True
    import comfyui_version  # type: ignore[import-not-found]

    file_lists = {("CheckpointLoaderSimple", "ckpt_name"), ("LoadImage", "image"), ("LoraLoaderModelOnly", "lora_name"),
                  ("ControlNetLoader", "control_net_name")}
    out = {}
    for class_type in CORE_NODE_TYPES:
        cls = core_node_class(class_type)
        definition = {"input": normalise_input_types(cls.INPUT_TYPES()),
                      "output": [type_name(t) for t in cls.RETURN_TYPES],
                      "output_name": list(getattr(cls, "RETURN_NAMES", None) or
                                          [type_name(t) for t in cls.RETURN_TYPES]),
                      "output_node": bool(getattr(cls, "OUTPUT_NODE", False))}
        for section in definition["input"].values():
            for name, entry in section.items():
                if (class_type, name) in file_lists:
                    entry[0] = []
        out[class_type] = definition
    return {"comment": "ComfyUI core nodes used by BoLID's example workflows, as ComfyUI defines them. File-list "
                       "combos are stored empty (any value). Regenerate with: python workflows/build.py "
                       "--dump-core /path/to/ComfyUI",
            "comfyui_version": comfyui_version.__version__, "nodes": out}


# ----------------------------------------------------------------------------------------------------------------
# workflow description -> UI format / API format


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[int, int]
    widgets: dict[str, Any] = field(default_factory=dict)
    title: str | None = None
    size: tuple[int, int] | None = None
    color: str | None = None
    models: tuple[dict[str, str], ...] = ()  # public files the node loads: {name, url, directory}


@dataclass
class Workflow:
    name: str
    title: str
    nodes: list[Node]
    links: list[tuple[int, str, int, str]]  # (from node, output name, to node, input name)
    api: bool = True  # also written in API format


def default_widget_value(widget: Widget) -> Any:
    if widget.kind == "CONTROL":
        return "fixed"
    if widget.kind == "UPLOAD":
        return "image"
    if "default" in widget.options:
        return widget.options["default"]
    if widget.kind == "COMBO":
        return widget.choices[0] if widget.choices else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[widget.kind]


def _node_size(spec: NodeSpec, node: Node) -> list[int]:
    if node.size:
        return list(node.size)
    if node.type in FRONTEND_ONLY:
        return [360, 260]
    rows = max(len(spec.inputs), len(spec.outputs))
    multiline = sum(1 for w in spec.widgets if w.options.get("multiline"))
    height = 34 + 22 * rows + 26 * (len(spec.widgets) - multiline) + 110 * multiline
    if node.type in ("PreviewImage", "SaveImage", "LoadImage"):
        height = max(height, 320)
    return [420 if multiline else 320, height]


def _topological_order(workflow: Workflow) -> dict[int, int]:
    deps = {n.id: {src for src, _, dst, _ in workflow.links if dst == n.id} for n in workflow.nodes}
    order: dict[int, int] = {}
    while len(order) < len(deps):
        ready = sorted(i for i, d in deps.items() if i not in order and d <= set(order))
        if not ready:
            raise ValueError(f"{workflow.name}: the graph has a cycle")
        for i in ready:
            order[i] = len(order)
    return order


def to_ui(workflow: Workflow, specs: dict[str, NodeSpec]) -> dict:
    by_id = {n.id: n for n in workflow.nodes}
    links = []
    out_links: dict[tuple[int, int], list[int]] = {}
    in_links: dict[tuple[int, int], int] = {}
    for link_id, (src, out_name, dst, in_name) in enumerate(workflow.links, start=1):
        src_spec, dst_spec = specs[by_id[src].type], specs[by_id[dst].type]
        out_slot = [name for name, _ in src_spec.outputs].index(out_name)
        in_slot = [s.name for s in dst_spec.inputs].index(in_name)
        links.append([link_id, src, out_slot, dst, in_slot, src_spec.outputs[out_slot][1]])
        out_links.setdefault((src, out_slot), []).append(link_id)
        in_links[(dst, in_slot)] = link_id
    order = _topological_order(workflow)
    nodes = []
    for node in workflow.nodes:
        spec = specs[node.type]
        unknown = set(node.widgets) - {w.name for w in spec.widgets}
        if unknown:
            raise ValueError(f"{workflow.name}: node {node.id} ({node.type}) has no widget(s) {sorted(unknown)}")
        entry: dict[str, Any] = {"id": node.id, "type": node.type, "pos": list(node.pos),
                                 "size": _node_size(spec, node), "flags": {}, "order": order[node.id], "mode": 0,
                                 "inputs": [{"name": s.name, "type": s.type, "link": in_links.get((node.id, i))}
                                            for i, s in enumerate(spec.inputs)],
                                 "outputs": [{"name": name, "type": kind, "links": out_links.get((node.id, i), []),
                                              "slot_index": i} for i, (name, kind) in enumerate(spec.outputs)],
                                 "properties": {} if spec.frontend_only else {"Node name for S&R": node.type},
                                 "widgets_values": [node.widgets.get(w.name, default_widget_value(w))
                                                    for w in spec.widgets]}
        if node.models:
            entry["properties"]["models"] = [dict(m) for m in node.models]
        if node.title:
            entry["title"] = node.title
        if node.color:
            entry["color"], entry["bgcolor"] = node.color, _darker(node.color)
        nodes.append(entry)
    return {"last_node_id": max(by_id), "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {"ds": _fit_view(nodes)}, "version": 0.4}


def _fit_view(nodes: list[dict], width: int = 1440, height: int = 860, left: int = 90, top: int = 90) -> dict:
    """The canvas view (LiteGraph: screen = (graph + offset) * scale) that shows the whole graph on a
    ~1600x1000 window, right of the editor's side bar and below its top bar."""
    title = 32  # title bar above each node's pos
    x0 = min(n["pos"][0] for n in nodes)
    y0 = min(n["pos"][1] for n in nodes) - title
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes)
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes)
    scale = round(min(1.0, width / (x1 - x0), height / (y1 - y0)), 3)
    return {"scale": scale, "offset": [round(-x0 + left / scale, 1), round(-y0 + top / scale, 1)]}


def _darker(color: str) -> str:
    value = int(color.lstrip("#"), 16)
    r, g, b = (value >> 16) & 255, (value >> 8) & 255, value & 255
    return "#{:02x}{:02x}{:02x}".format(*(min(255, c + 0x22) for c in (r, g, b)))


def ui_to_api(ui: dict, specs: dict[str, NodeSpec]) -> dict:
    """What ComfyUI's frontend sends to POST /prompt for this UI workflow (frontend-only nodes left out)."""
    links = {link[0]: link for link in ui["links"]}
    prompt: dict[str, dict] = {}
    for node in sorted(ui["nodes"], key=lambda n: n["id"]):
        spec = specs[node["type"]]
        if spec.frontend_only or node.get("mode", 0) != 0:
            continue
        inputs: dict[str, Any] = {}
        for widget, value in zip(spec.widgets, node.get("widgets_values", []), strict=True):
            if not widget.is_extra:
                inputs[widget.name] = value
        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                link = links[socket["link"]]
                inputs[socket["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title") or node["type"]}}
    return prompt


# ----------------------------------------------------------------------------------------------------------------
# the workflows

BOLID = "#2a363b"
NOTE = "#432"
SD15_NEGATIVE = "lowres, blurry, deformed, bad anatomy, extra limbs, watermark, text"
PROMPT = "full-body photo of a person walking in a park, natural light, detailed"
FILES_NOTE = """**BoLID files** (see the README, "User guide"):

- `models/checkpoints/{ckpt}`
- `models/bolid/{adapter}`
{more}
Prompts describe the scene and clothing, not the person: identity comes from BoLID."""


def _note(node_id: int, pos: tuple[int, int], text: str, size=(380, 300)) -> Node:
    return Node(node_id, "MarkdownNote", pos, {"text": text}, title="Read me", size=size, color=NOTE)


def _sampler_part(ckpt: str, adapter: str, width: int, height: int, sampler: dict, negative: str,
                  positive: str = PROMPT) -> tuple[list[Node], list[tuple[int, str, int, str]]]:
    """Checkpoint, adapter, Apply (id 10), prompts, latent, KSampler, decode, save: ids 1-9 and 10."""
    nodes = [
        Node(1, "CheckpointLoaderSimple", (40, 60), {"ckpt_name": ckpt}, models=model_metadata(ckpt)),
        Node(2, "BoLIDLoadAdapter", (40, 220), {"adapter_name": adapter}, color=BOLID),
        Node(4, "CLIPTextEncode", (820, 60), {"text": positive}, title="Positive prompt"),
        Node(5, "CLIPTextEncode", (820, 300), {"text": negative}, title="Negative prompt"),
        Node(6, "EmptyLatentImage", (820, 540), {"width": width, "height": height, "batch_size": 1}),
        Node(7, "KSampler", (1280, 60), {"seed": 42, "seed:control_after_generate": "fixed", **sampler}),
        Node(8, "VAEDecode", (1640, 60)),
        Node(9, "SaveImage", (1640, 180), {"filename_prefix": "BoLID"}, size=(380, 420)),
    ]
    links = [
        (1, "CLIP", 4, "clip"), (1, "CLIP", 5, "clip"),
        (1, "MODEL", 10, "model"), (2, "bolid_adapter", 10, "bolid_adapter"),
        (10, "MODEL", 7, "model"), (4, "CONDITIONING", 7, "positive"), (5, "CONDITIONING", 7, "negative"),
        (6, "LATENT", 7, "latent_image"), (7, "LATENT", 8, "samples"), (1, "VAE", 8, "vae"),
        (8, "IMAGE", 9, "images"),
    ]
    return nodes, links


LIGHTNING_SAMPLER = {"steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "sgm_uniform", "denoise": 1.0}
SD15_SAMPLER = {"steps": 25, "cfg": 6.0, "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0}


def text_only_sdxl_lightning() -> Workflow:
    nodes, links = _sampler_part(SDXL_LIGHTNING_CKPT, ADAPTER_SDXL, 832, 1216, LIGHTNING_SAMPLER, negative="")
    nodes += [
        Node(3, "BoLIDLoadBodyID", (40, 340), {"body_id_name": f"{BODY_ID_NAME}.safetensors"}, color=BOLID),
        Node(10, "BoLIDApplyAdapter", (420, 60), {"weight_face": 0.0, "weight_body": 0.8, "start_at": 0.0,
                                                  "end_at": 1.0}, color=BOLID),
        _note(11, (40, 480), FILES_NOTE.format(
            ckpt=SDXL_LIGHTNING_CKPT, adapter=ADAPTER_SDXL,
            more=f"- `models/bolid_body_ids/{BODY_ID_NAME}.safetensors` (made by the photos_to_body_id workflow)\n\n"
                 "**Text-only mode**: no photo at run time; only the stored Body ID drives the body branch "
                 "(weight_face is 0, nothing is connected to face_embeds).\n\n"
                 "SDXL-Lightning 4-step: steps 4, cfg 1.0, euler + sgm_uniform (use the 8-step file with 8 steps).\n")),
    ]
    links += [(3, "body_id", 10, "body_id")]
    return Workflow("text_only_body_id_sdxl_lightning", "Text-only generation from a stored Body ID", nodes, links)


def _photo_face_body(name: str, title: str, ckpt: str, adapter: str, width: int, height: int, sampler: dict,
                     negative: str, notes: str) -> Workflow:
    nodes, links = _sampler_part(ckpt, adapter, width, height, sampler, negative=negative)
    nodes += [
        Node(10, "BoLIDApplyAdapter", (420, 60), {"weight_face": 0.8, "weight_body": 0.8, "start_at": 0.0,
                                                  "end_at": 1.0}, color=BOLID),
        Node(11, "LoadImage", (-420, 470), {"image": PHOTO}, title="Photo of the person", size=(340, 420)),
        Node(12, "BoLIDLoadInsightFace", (-420, 60), {"model_name": FACE_PACK, "provider": "auto"}, color=BOLID),
        Node(13, "BoLIDLoadPoseModel", (-420, 200), {"model_name": POSE_MODEL, "provider": "auto"}, color=BOLID),
        Node(14, "BoLIDLoadBodyEncoder", (-420, 320), {"encoder_name": BODY_ENCODER}, color=BOLID),
        Node(15, "BoLIDEncodeFace", (40, 360), {"no_face": "error"}, color=BOLID),
        Node(16, "BoLIDEncodeBodyFromImages", (40, 500), {"min_confidence": 0.3, "several_people": "use the largest"},
             color=BOLID),
        Node(17, "PreviewImage", (420, 420), title="Views used for the body", size=(340, 360)),
        _note(18, (40, 760), FILES_NOTE.format(
            ckpt=ckpt, adapter=adapter,
            more=f"- `models/bolid/{BODY_ENCODER}`\n- `models/bolid_pose/{POSE_MODEL}`\n"
                 f"- `models/insightface/models/{FACE_PACK}/` (detector + ArcFace .onnx)\n\n" + notes),
            size=(420, 330)),
    ]
    links += [
        (12, "face_analysis", 15, "face_analysis"), (11, "IMAGE", 15, "image"),
        (14, "body_encoder", 16, "body_encoder"), (13, "pose_model", 16, "pose_model"), (11, "IMAGE", 16, "images"),
        (15, "face_embeds", 10, "face_embeds"), (16, "body_id", 10, "body_id"),
        (16, "views_preview", 17, "images"),
    ]
    return Workflow(name, title, nodes, links)


def photo_face_body_sdxl_lightning() -> Workflow:
    return _photo_face_body(
        "photo_face_body_sdxl_lightning", "One photo -> face + body -> SDXL-Lightning", SDXL_LIGHTNING_CKPT,
        ADAPTER_SDXL, 832, 1216, LIGHTNING_SAMPLER, negative="",
        notes="SDXL-Lightning 4-step: steps 4, cfg 1.0, euler + sgm_uniform (the negative prompt has no effect at "
              "cfg 1.0). Lower weight_face / weight_body if the image over-saturates.")


def photo_face_body_sd15() -> Workflow:
    return _photo_face_body(
        "photo_face_body_sd15", "One photo -> face + body -> SD1.5", SD15_CKPT, ADAPTER_SD15, 512, 768,
        SD15_SAMPLER, negative=SD15_NEGATIVE,
        notes="SD1.5: 20-30 steps, cfg 5-7; the adapter must be the SD1.5 one (16 layers, context 768).")


def photos_to_body_id() -> Workflow:
    nodes = [
        Node(1, "BoLIDLoadImagesFromFolder", (40, 60), {"folder": PHOTO_FOLDER}, title="Photos of the person",
             color=BOLID),
        Node(6, "BoLIDLoadPoseModel", (40, 200), {"model_name": POSE_MODEL, "provider": "auto"}, color=BOLID),
        Node(7, "BoLIDLoadBodyEncoder", (40, 340), {"encoder_name": BODY_ENCODER}, color=BOLID),
        Node(2, "BoLIDDetectBodyPose", (420, 60), {"confidence": 0.25, "person": "largest"}, color=BOLID),
        Node(3, "PreviewImage", (420, 260), title="Detected poses", size=(340, 360)),
        Node(8, "BoLIDEncodeBodyFromImages", (820, 60), {"min_confidence": 0.3, "several_people": "use the largest"},
             color=BOLID),
        Node(9, "BoLIDSaveBodyID", (1220, 60), {"name": BODY_ID_NAME, "overwrite": False}, color=BOLID),
        Node(10, "PreviewImage", (1220, 240), title="Views used and their weights", size=(520, 360)),
        _note(11, (40, 480), f"""**Several photos -> one Body ID**, saved to `models/bolid_body_ids/{BODY_ID_NAME}.safetensors`.

Files: `models/bolid/{BODY_ENCODER}`, `models/bolid_pose/{POSE_MODEL}`; the photos in `input/{PHOTO_FOLDER}/`
(jpg, png, webp).

**Load Images From Folder** hands every photo on at its own size: portrait and landscape photos are used whole
(core Image Batch would resize and centre-crop them to the first one's size, cutting off heads or feet).
**Detect Body Pose** runs once; Encode Body uses its poses (several_people decides what a group photo gives).
Views whose body-joint confidence is below min_confidence are skipped; the preview shows the views used and their
weights. Then use the Body ID with the text-only workflow.""",
              size=(360, 360)),
    ]
    links = [(7, "body_encoder", 8, "body_encoder"), (6, "pose_model", 8, "pose_model"), (1, "images", 8, "images"),
             (6, "pose_model", 2, "pose_model"), (1, "images", 2, "image"), (2, "poses", 8, "poses"),
             (2, "preview", 3, "images"), (8, "body_id", 9, "body_id"), (8, "views_preview", 10, "images")]
    return Workflow("photos_to_body_id", "Photos of any size -> Body ID -> saved", nodes, links)


def pose_controlnet_body_id_sd15() -> Workflow:
    """Pose from a reference photo (ControlNet OpenPose), body identity from a stored Body ID (BoLID)."""
    nodes, links = _sampler_part(SD15_CKPT, ADAPTER_SD15, 512, 768, SD15_SAMPLER, negative=SD15_NEGATIVE,
                                 positive="full-body photo of a person in a park, natural light, detailed")
    links = [link for link in links if link[2:] not in ((7, "positive"), (7, "negative"))]
    nodes += [
        Node(3, "BoLIDLoadBodyID", (40, 340), {"body_id_name": f"{BODY_ID_NAME}.safetensors"}, color=BOLID),
        Node(10, "BoLIDApplyAdapter", (420, 60), {"weight_face": 0.0, "weight_body": 0.8, "start_at": 0.0,
                                                  "end_at": 1.0}, color=BOLID),
        Node(11, "LoadImage", (-780, 420), {"image": POSE_PHOTO}, title="Pose reference photo", size=(340, 420)),
        Node(12, "BoLIDLoadPoseModel", (-780, 260), {"model_name": POSE_MODEL, "provider": "auto"}, color=BOLID),
        Node(13, "BoLIDDetectBodyPose", (-400, 260), {"confidence": 0.25, "person": "largest"}, color=BOLID),
        Node(14, "BoLIDPosesToOpenPose", (-400, 460), {"min_confidence": 0.3, "people": "main person",
                                                       "width": 512, "height": 768}, color=BOLID),
        Node(15, "ControlNetLoader", (-400, 60), {"control_net_name": CONTROLNET_OPENPOSE_SD15}),
        Node(16, "ControlNetApplyAdvanced", (1240, 360), {"strength": 1.0, "start_percent": 0.0,
                                                          "end_percent": 1.0}),
        Node(17, "PreviewImage", (-20, 620), title="OpenPose control image", size=(340, 420)),
        _note(18, (420, 420), FILES_NOTE.format(
            ckpt=SD15_CKPT, adapter=ADAPTER_SD15,
            more=f"- `models/controlnet/{CONTROLNET_OPENPOSE_SD15}` (any SD1.5 OpenPose ControlNet)\n"
                 f"- `models/bolid_pose/{POSE_MODEL}`\n"
                 f"- `models/bolid_body_ids/{BODY_ID_NAME}.safetensors` (made by the photos_to_body_id workflow)\n\n"
                 "**Pose from ControlNet, body from BoLID**: Detect Body Pose finds the reference photo's pose, "
                 "Poses To OpenPose Image draws it in the OpenPose colours at the generated size (512x768, "
                 "fitted in, never cut), core Apply ControlNet conditions the prompts on it, and Apply Adapter "
                 "(BoLID) gives the stored body.\n"),
            size=(400, 360)),
    ]
    links += [
        (3, "body_id", 10, "body_id"),
        (12, "pose_model", 13, "pose_model"), (11, "IMAGE", 13, "image"), (13, "poses", 14, "poses"),
        (14, "image", 16, "image"), (14, "image", 17, "images"), (15, "CONTROL_NET", 16, "control_net"),
        (4, "CONDITIONING", 16, "positive"), (5, "CONDITIONING", 16, "negative"), (1, "VAE", 16, "vae"),
        (16, "positive", 7, "positive"), (16, "negative", 7, "negative"),
    ]
    return Workflow("pose_controlnet_body_id_sd15", "Pose from a photo (ControlNet) + stored Body ID -> SD1.5",
                    nodes, links)


SDXL_SAMPLER = {"steps": 30, "cfg": 6.0, "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0}
FACE_PROMPT = "portrait photo of a person in a park, natural light, detailed"


def _faceid_face_only(family: str) -> Workflow:
    """Face identity with no training: an IP-Adapter FaceID file imported as BoLID's face branch, its LoRA
    through core LoraLoaderModelOnly (as the FaceID authors recommend), the body branch absent (weight 0)."""
    sd15 = family == "sd15"
    ckpt = SD15_CKPT if sd15 else SDXL_BASE_CKPT
    adapter, lora = FACEID_ADAPTER[family], FACEID_LORA[family]
    nodes, links = _sampler_part(ckpt, adapter, *((512, 768) if sd15 else (1024, 1024)),
                                 SD15_SAMPLER if sd15 else SDXL_SAMPLER,
                                 negative=SD15_NEGATIVE, positive=FACE_PROMPT)
    links.remove((1, "MODEL", 10, "model"))
    nodes += [
        Node(3, "LoraLoaderModelOnly", (40, 340), {"lora_name": lora, "strength_model": 0.6},
             title="FaceID LoRA", models=model_metadata(lora)),
        Node(10, "BoLIDApplyAdapter", (420, 60), {"weight_face": 0.8, "weight_body": 0.0, "start_at": 0.0,
                                                  "end_at": 1.0}, color=BOLID),
        Node(11, "LoadImage", (-420, 200), {"image": PHOTO}, title="Photo of the face", size=(340, 420)),
        Node(12, "BoLIDLoadInsightFace", (-420, 60), {"model_name": FACE_PACK, "provider": "auto"}, color=BOLID),
        Node(13, "BoLIDEncodeFace", (420, 360), {"no_face": "error"}, color=BOLID),
        _note(14, (40, 500), f"""**Face identity from public files, no training.**

1. `models/checkpoints/{ckpt}`
2. FaceID: download `{FACEID_BIN[family]}` (h94/IP-Adapter-FaceID, the non-Plus file) and import it once:
   `python -m bolid.faceid import {FACEID_BIN[family]} --out ComfyUI/models/bolid` -> `models/bolid/{adapter}`
3. `models/loras/{lora}` (same repository)
4. `models/insightface/models/{FACE_PACK}/` (detector + ArcFace .onnx; buffalo_l works too)

The body branch is absent in an imported FaceID file (weight_body is ignored); stage-2 training adds it.
Prompts describe the scene, not the face.""", size=(440, 360)),
    ]
    links += [(1, "MODEL", 3, "model"), (3, "MODEL", 10, "model"), (12, "face_analysis", 13, "face_analysis"),
              (11, "IMAGE", 13, "image"), (13, "face_embeds", 10, "face_embeds")]
    label = "SD1.5" if sd15 else "SDXL"
    return Workflow(f"faceid_face_only_{family}", f"Face identity from IP-Adapter FaceID ({label}, no training)",
                    nodes, links)


def faceid_face_only_sd15() -> Workflow:
    return _faceid_face_only("sd15")


def faceid_face_only_sdxl() -> Workflow:
    return _faceid_face_only("sdxl")


PERSON_IDS = ("person_a", "person_b")  # Body ID and Face ID names of the two people (Save Body ID / Save Face ID)
TWO_PEOPLE_PROMPT = "full-body photo of two people standing side by side in a park, natural light, detailed"


def two_people_regional_sd15() -> Workflow:
    """Two people in one image: two Apply nodes on one model, each with its own stored Body ID and Face ID and a
    disjoint mask (left / right half, made with core mask nodes at the generated size)."""
    width, height = 768, 512
    nodes, links = _sampler_part(SD15_CKPT, ADAPTER_SD15, width, height, SD15_SAMPLER, negative=SD15_NEGATIVE,
                                 positive=TWO_PEOPLE_PROMPT)
    links.remove((10, "MODEL", 7, "model"))
    a, b = PERSON_IDS
    nodes += [
        Node(10, "BoLIDApplyAdapter", (420, 60), {"weight_face": 0.8, "weight_body": 0.8, "start_at": 0.0,
                                                  "end_at": 1.0}, title="Apply Adapter (BoLID): left person",
             color=BOLID),
        Node(11, "BoLIDApplyAdapter", (420, 420), {"weight_face": 0.8, "weight_body": 0.8, "start_at": 0.0,
                                                   "end_at": 1.0}, title="Apply Adapter (BoLID): right person",
             color=BOLID),
        Node(12, "BoLIDLoadBodyID", (-380, 60), {"body_id_name": f"{a}.safetensors"}, title="Body ID: left person",
             color=BOLID),
        Node(13, "BoLIDLoadFaceID", (-380, 180), {"face_id_name": f"{a}.safetensors"}, title="Face ID: left person",
             color=BOLID),
        Node(14, "BoLIDLoadBodyID", (-380, 420), {"body_id_name": f"{b}.safetensors"}, title="Body ID: right person",
             color=BOLID),
        Node(15, "BoLIDLoadFaceID", (-380, 540), {"face_id_name": f"{b}.safetensors"},
             title="Face ID: right person", color=BOLID),
        Node(16, "SolidMask", (-780, 60), {"value": 0.0, "width": width, "height": height}, title="Empty mask"),
        Node(17, "SolidMask", (-780, 240), {"value": 1.0, "width": width // 2, "height": height},
             title="Half-width mask"),
        Node(18, "MaskComposite", (-780, 420), {"x": 0, "y": 0, "operation": "add"}, title="Left half"),
        Node(19, "InvertMask", (-780, 620), title="Right half"),
        _note(20, (820, 740), FILES_NOTE.format(
            ckpt=SD15_CKPT, adapter=ADAPTER_SD15,
            more=f"- `models/bolid_body_ids/{a}.safetensors`, `{b}.safetensors` (photos_to_body_id, once per person)\n"
                 f"- `models/bolid_face_ids/{a}.safetensors`, `{b}.safetensors` (Encode Face -> Save Face ID)\n\n"
                 "**Two people, two identities**: each Apply Adapter (BoLID) adds one person's face and body "
                 "inside its attn_mask only; the second one patches the model the first one returned. The masks "
                 f"split the {width}x{height} image into left and right halves and must not overlap. Draw other "
                 "regions with the mask editor (Load Image -> MASK), and give a branch its own region with "
                 "attn_mask_face / attn_mask_body. The prompt describes both people's scene and clothing.\n"),
            size=(400, 380)),
    ]
    links += [
        (10, "MODEL", 11, "model"), (2, "bolid_adapter", 11, "bolid_adapter"), (11, "MODEL", 7, "model"),
        (12, "body_id", 10, "body_id"), (13, "face_embeds", 10, "face_embeds"), (18, "MASK", 10, "attn_mask"),
        (14, "body_id", 11, "body_id"), (15, "face_embeds", 11, "face_embeds"), (19, "MASK", 11, "attn_mask"),
        (16, "MASK", 18, "destination"), (17, "MASK", 18, "source"), (18, "MASK", 19, "mask"),
    ]
    return Workflow("two_people_regional_sd15", "Two people, two identities (regional masks) -> SD1.5", nodes, links)


WORKFLOW_BUILDERS = (text_only_sdxl_lightning, photo_face_body_sdxl_lightning, photos_to_body_id,
                     photo_face_body_sd15, pose_controlnet_body_id_sd15, faceid_face_only_sd15, faceid_face_only_sdxl,
                     two_people_regional_sd15)


def build_all(specs: dict[str, NodeSpec] | None = None) -> dict[Path, str]:
    """Every output file -> its content."""
    specs = specs or node_specs()
    files: dict[Path, str] = {}
    for builder in WORKFLOW_BUILDERS:
        workflow = builder()
        ui = to_ui(workflow, specs)
        text = json.dumps(ui, indent=2) + "\n"
        files[UI_DIR / f"{workflow.name}.json"] = text
        files[EXAMPLES / f"{workflow.name}.json"] = text
        if workflow.api:
            files[API_DIR / f"{workflow.name}.json"] = json.dumps(ui_to_api(ui, specs), indent=2) + "\n"
    return files


def update_widget_lock(specs: dict[str, NodeSpec]) -> list[str]:
    """Record each BoLID node's widget names; a change other than appending widgets/nodes is refused."""
    lock = json.loads(WIDGET_LOCK.read_text())["nodes"] if WIDGET_LOCK.is_file() else {}
    current = {name: [w.name for w in spec.widgets] for name, spec in specs.items() if name.startswith("BoLID")}
    refused = [f"{name}: {lock[name]} -> {current.get(name)}" for name in lock
               if current.get(name, [])[:len(lock[name])] != lock[name]]
    if not refused:
        WIDGET_LOCK.write_text(json.dumps({
            "comment": "Released widget order of BoLID's nodes (widgets_values is positional): append only. "
                       "Updated by python workflows/build.py --update-widget-lock",
            "nodes": dict(sorted(current.items()))}, indent=2) + "\n")
    return refused


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    parser.add_argument("--dump-core", metavar="COMFYUI", type=Path, help="refresh the core-node list from ComfyUI")
    parser.add_argument("--update-widget-lock", action="store_true", help="record BoLID's widget order")
    args = parser.parse_args(argv)
    if args.update_widget_lock:
        refused = update_widget_lock(node_specs())
        print("widget order changed, not only appended:\n  " + "\n  ".join(refused) if refused
              else f"wrote {WIDGET_LOCK}")
        return 1 if refused else 0
    if args.dump_core:
        CORE_SPEC.parent.mkdir(parents=True, exist_ok=True)
        CORE_SPEC.write_text(json.dumps(dump_core(args.dump_core), indent=2) + "\n")
        print(f"wrote {CORE_SPEC}")
        return 0
    stale = []
    for path, text in build_all().items():
        if not path.is_file() or path.read_text() != text:
            stale.append(path)
            if not args.check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    verb = "differ" if args.check else "written"
    print(f"{len(stale)} file(s) {verb}" + "".join(f"\n  {p.relative_to(REPO)}" for p in stale))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
