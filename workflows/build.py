"""Build BoLID's example workflows (workflows/definitions.py, compiled by workflows/graph.py) into the files
ComfyUI reads: the UI format in example_workflows/ (the folder ComfyUI's template browser lists) and the API format
(what POST /prompt takes) in workflows/api/.

    python workflows/build.py            write example_workflows/*.json and workflows/api/*.json
    python workflows/build.py --check    exit 1 if any of those files differs from what this script builds
    python workflows/build.py --dump-core /path/to/ComfyUI
                                         refresh workflows/spec/core_nodes.json from a real ComfyUI
    python workflows/build.py --update-widget-lock
                                         record BoLID's widget order (refuses anything but appending)

Widget values are positional in the UI format, so their order is taken from the nodes' own INPUT_TYPES (BoLID's
nodes from this repository, ComfyUI's core nodes from the checked-in workflows/spec/core_nodes.json): a workflow
here names widgets, never positions. The same spec functions are used by tests/test_workflows.py to validate
the files independently of how they were built.

Runs without ComfyUI: BoLID's INPUT_TYPES are read with the tests' stand-in ``folder_paths``
(tests/comfy_standin.py; model-file lists empty).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "tests"):  # workflows.* and the stand-in ComfyUI, also when run as a script
    if str(_path) not in sys.path:
        sys.path.append(str(_path))

import comfy_standin  # noqa: E402

from workflows.definitions import WORKFLOWS  # noqa: E402
from workflows.graph import (  # noqa: E402, F401 - re-exported for tests/test_workflows.py
    CONTROL_VALUES,
    FRONTEND_ONLY,
    NodeSpec,
    frontend_only_spec,
    normalise_input_types,
    spec_from_definition,
    to_ui,
    type_name,
    ui_to_api,
)

WORKFLOWS_DIR = REPO / "workflows"
API_DIR = WORKFLOWS_DIR / "api"
EXAMPLES = REPO / "example_workflows"  # the only UI copy: ComfyUI lists <pack>/example_workflows/*.json as templates
CORE_SPEC = WORKFLOWS_DIR / "spec" / "core_nodes.json"
WIDGET_LOCK = WORKFLOWS_DIR / "spec" / "bolid_widgets.json"

CORE_NODE_TYPES = ("CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode",
                   "SaveImage", "PreviewImage", "LoadImage", "ImageBatch", "LoraLoaderModelOnly",
                   "ControlNetLoader", "ControlNetApplyAdvanced", "SolidMask", "MaskComposite", "InvertMask")
# core nodes defined outside ComfyUI's nodes.py (its comfy_extras modules, loaded at start-up): type -> module
CORE_EXTRA_MODULES = {"SolidMask": "comfy_extras.nodes_mask", "MaskComposite": "comfy_extras.nodes_mask",
                      "InvertMask": "comfy_extras.nodes_mask"}


def bolid_definitions() -> dict[str, dict]:
    """BoLID's node definitions in /object_info's shape, read from the classes (model-file lists empty)."""
    pack = comfy_standin.load_pack()
    out = {}
    with tempfile.TemporaryDirectory(prefix="bolid-spec-") as base, \
            comfy_standin.installed(comfy_standin.folder_paths(Path(base) / "models")):
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


def build_all(specs: dict[str, NodeSpec] | None = None) -> dict[Path, str]:
    """Every output file -> its content."""
    specs = specs or node_specs()
    files: dict[Path, str] = {}
    for define in WORKFLOWS:
        workflow = define()
        ui = to_ui(workflow, specs)
        files[EXAMPLES / f"{workflow.name}.json"] = json.dumps(ui, indent=2) + "\n"
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
