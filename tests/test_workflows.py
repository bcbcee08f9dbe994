"""The example workflows against the node definitions: node types, widget counts/order/values, sockets, links.

Runs without ComfyUI: BoLID's definitions come from the pack's INPUT_TYPES, ComfyUI's core nodes from the
checked-in workflows/spec/core_nodes.json, which the last test cross-checks against a real ComfyUI when
COMFYUI_PATH is set. The validator here reads the files as ComfyUI's frontend would; it shares only the
definition-to-widget rules (build.spec_from_definition) with the generator.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

WORKFLOW_DIR = REPO_ROOT / "workflows"
EXAMPLES_DIR = REPO_ROOT / "example_workflows"
UI_DIR = EXAMPLES_DIR  # the one UI copy of each workflow: the folder ComfyUI's template browser reads
API_DIR = WORKFLOW_DIR / "api"
WIDGET_LOCK = WORKFLOW_DIR / "spec" / "bolid_widgets.json"
EXPECTED = ("faceid_face_only_sd15", "faceid_face_only_sdxl", "photo_face_body_sd15", "photo_face_body_sdxl_lightning",
            "photos_to_body_id", "pose_controlnet_body_id_sd15", "text_only_body_id_sdxl_lightning",
            "two_people_regional_sd15")


def _load_build():
    name = "bolid_workflows_build"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, WORKFLOW_DIR / "build.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


build = _load_build()


@pytest.fixture(scope="module")
def specs(pack):
    return build.node_specs()


def ui_files() -> list[Path]:
    return sorted(UI_DIR.glob("*.json"))


def types_compatible(output_type: str, input_type: str) -> bool:
    """ComfyUI's rule: equal, "*" on either side (the frontend's and IO.ANY's wildcard), or an overlap of
    comma-separated unions (comfy_execution.validation.validate_node_input, non-strict)."""
    if output_type == input_type or "*" in (output_type, input_type):
        return True
    return bool({t.strip() for t in output_type.split(",")} & {t.strip() for t in input_type.split(",")})


def widget_value_problem(widget, value) -> str | None:
    kind, opts = widget.kind, widget.options
    if kind == "CONTROL":
        return None if value in build.CONTROL_VALUES else f"control value {value!r}"
    if kind == "UPLOAD":
        return None if value == "image" else f"upload widget value {value!r}"
    if kind == "INT":
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{value!r} is not an INT"
    elif kind == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"{value!r} is not a FLOAT"
    elif kind == "STRING":
        return None if isinstance(value, str) else f"{value!r} is not a STRING"
    elif kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{value!r} is not a BOOLEAN"
    elif kind == "COMBO":
        if not isinstance(value, str) or (widget.choices and value not in widget.choices):
            return f"{value!r} is not one of {list(widget.choices)}"
        return None
    if "min" in opts and value < opts["min"] or "max" in opts and value > opts["max"]:
        return f"{value} is outside [{opts.get('min')}, {opts.get('max')}]"
    return None


def validate_ui(ui: dict, specs: dict) -> list[str]:
    """Everything that would make ComfyUI's frontend load the workflow wrongly or the server reject it."""
    problems = []
    for key in ("nodes", "links", "last_node_id", "last_link_id", "version"):
        if key not in ui:
            problems.append(f"missing top-level key {key!r}")
    if problems:
        return problems
    nodes = {}
    for node in ui["nodes"]:
        if node["id"] in nodes:
            problems.append(f"node id {node['id']} used twice")
        nodes[node["id"]] = node
    links = {}
    for link in ui["links"]:
        if len(link) != 6 or link[0] in links:
            problems.append(f"bad or duplicate link {link}")
            continue
        links[link[0]] = link
    if nodes and ui["last_node_id"] < max(nodes):
        problems.append(f"last_node_id {ui['last_node_id']} < largest node id {max(nodes)}")
    if links and ui["last_link_id"] < max(links):
        problems.append(f"last_link_id {ui['last_link_id']} < largest link id {max(links)}")

    for node in nodes.values():
        where = f"node {node['id']} ({node['type']})"
        spec = specs.get(node["type"])
        if spec is None:
            problems.append(f"{where}: unknown node type")
            continue
        values = node.get("widgets_values", [])
        if len(values) != len(spec.widgets):
            problems.append(f"{where}: {len(values)} widget values, the node has {len(spec.widgets)} widgets "
                            f"{[w.name for w in spec.widgets]}")
        else:
            for widget, value in zip(spec.widgets, values, strict=True):
                problem = widget_value_problem(widget, value)
                if problem:
                    problems.append(f"{where}: widget {widget.name}: {problem}")
        sockets = [(i["name"], i["type"]) for i in node.get("inputs", [])]
        if sockets != [(s.name, s.type) for s in spec.inputs]:
            problems.append(f"{where}: inputs {sockets} != node definition {[(s.name, s.type) for s in spec.inputs]}")
        outputs = [(o["name"], o["type"]) for o in node.get("outputs", [])]
        if outputs != list(spec.outputs):
            problems.append(f"{where}: outputs {outputs} != node definition {list(spec.outputs)}")
        for slot, socket in enumerate(node.get("inputs", [])):
            link_id = socket.get("link")
            if link_id is None:
                if slot < len(spec.inputs) and spec.inputs[slot].required and not spec.frontend_only:
                    problems.append(f"{where}: required input {socket['name']} is not connected")
            elif link_id not in links or links[link_id][3] != node["id"] or links[link_id][4] != slot:
                problems.append(f"{where}: input {socket['name']} names link {link_id}, which does not end here")
        for slot, output in enumerate(node.get("outputs", [])):
            for link_id in output.get("links") or []:
                if link_id not in links or links[link_id][1] != node["id"] or links[link_id][2] != slot:
                    problems.append(f"{where}: output {output['name']} names link {link_id}, which does not start here")

    for link_id, origin, out_slot, target, in_slot, link_type in links.values():
        src, dst = nodes.get(origin), nodes.get(target)
        if src is None or dst is None:
            problems.append(f"link {link_id}: joins missing node {origin if src is None else target}")
            continue
        if out_slot >= len(src.get("outputs", [])) or in_slot >= len(dst.get("inputs", [])):
            problems.append(f"link {link_id}: slot out of range")
            continue
        out_type, in_socket = src["outputs"][out_slot]["type"], dst["inputs"][in_slot]
        if link_type != out_type:
            problems.append(f"link {link_id}: type {link_type} but the output is {out_type}")
        if not types_compatible(out_type, in_socket["type"]):
            problems.append(f"link {link_id}: {src['type']}.{src['outputs'][out_slot]['name']} ({out_type}) -> "
                            f"{dst['type']}.{in_socket['name']} ({in_socket['type']})")
        if in_socket.get("link") != link_id or link_id not in (src["outputs"][out_slot].get("links") or []):
            problems.append(f"link {link_id}: not listed on both of its nodes")

    # no cycles (ComfyUI refuses them)
    deps = {i: {links[n["link"]][1] for n in node.get("inputs", []) if n.get("link") in links}
            for i, node in nodes.items()}
    done: set[int] = set()
    while len(done) < len(deps):
        ready = {i for i, d in deps.items() if i not in done and d <= done}
        if not ready:
            problems.append(f"cycle among nodes {sorted(set(deps) - done)}")
            break
        done |= ready
    return problems


def validate_api(prompt: dict, specs: dict) -> list[str]:
    problems = []
    for node_id, node in prompt.items():
        spec = specs.get(node["class_type"])
        where = f"api node {node_id} ({node['class_type']})"
        if spec is None or spec.frontend_only:
            problems.append(f"{where}: not a server node")
            continue
        widgets = {w.name: w for w in spec.widgets if not w.is_extra}
        sockets = {s.name: s for s in spec.inputs}
        for name, value in node["inputs"].items():
            if name in widgets:
                problem = widget_value_problem(widgets[name], value)
                if problem:
                    problems.append(f"{where}: {name}: {problem}")
            elif name in sockets:
                src = prompt.get(value[0]) if isinstance(value, list) and len(value) == 2 else None
                if src is None:
                    problems.append(f"{where}: {name} links to a missing node {value}")
                    continue
                src_spec = specs[src["class_type"]]
                if value[1] >= len(src_spec.outputs) or not types_compatible(src_spec.outputs[value[1]][1],
                                                                            sockets[name].type):
                    problems.append(f"{where}: {name} ({sockets[name].type}) from {src['class_type']} slot {value[1]}")
            else:
                problems.append(f"{where}: unknown input {name!r}")
        missing = [n for n in list(widgets) + [s.name for s in spec.inputs if s.required] if n not in node["inputs"]]
        if missing:
            problems.append(f"{where}: missing inputs {missing}")
    return problems


# ---------------------------------------------------------------------------------------------------- tests


def test_each_workflow_has_one_ui_copy_an_api_file_and_a_picture():
    names = tuple(p.stem for p in ui_files())
    assert names == EXPECTED
    for name in names:
        assert (API_DIR / f"{name}.json").is_file()
        # a real file (symlinks are not carried by every install path)
        assert not (UI_DIR / f"{name}.json").is_symlink()
        assert (EXAMPLES_DIR / f"{name}.jpg").is_file(), "template picture: python workflows/screenshot.py --thumbnails"
    # ComfyUI's template list globs <pack>/{example_workflows,example,examples,workflow,workflows}/*.json:
    # only example_workflows/ may hold top-level .json files, or every template is listed twice
    for folder in ("example", "examples", "workflow", "workflows"):
        assert not list((REPO_ROOT / folder).glob("*.json")), f"{folder}/*.json would duplicate the templates"
    # no second UI copy anywhere in the repository (the API files are another format, what POST /prompt takes)
    copies = [p for folder in ("workflows", "docs", "example_workflows") for p in (REPO_ROOT / folder).rglob("*.json")
              if p.stem in EXPECTED and p.parent not in (UI_DIR, API_DIR)]
    assert not copies, copies


def test_files_are_what_build_py_writes(specs):
    stale = [str(p.relative_to(REPO_ROOT)) for p, text in build.build_all(specs).items()
             if not p.is_file() or p.read_text() != text]
    assert not stale, f"run `python workflows/build.py` and commit: {stale}"


@pytest.mark.parametrize("name", EXPECTED)
def test_ui_workflow_is_valid(name, specs):
    ui = json.loads((UI_DIR / f"{name}.json").read_text())
    assert validate_ui(ui, specs) == []
    assert any(n["type"].startswith("BoLID") for n in ui["nodes"])


@pytest.mark.parametrize("name", EXPECTED)
def test_api_workflow_is_valid_and_equals_the_ui_workflow(name, specs):
    ui = json.loads((UI_DIR / f"{name}.json").read_text())
    api = json.loads((API_DIR / f"{name}.json").read_text())
    assert validate_api(api, specs) == []
    # the prompt the frontend would send: widget values by name, links as [node id, output slot]
    expected = {}
    links = {link[0]: link for link in ui["links"]}
    for node in ui["nodes"]:
        spec = specs[node["type"]]
        if spec.frontend_only:
            continue
        inputs = {w.name: v for w, v in zip(spec.widgets, node["widgets_values"], strict=True) if not w.is_extra}
        inputs.update({i["name"]: [str(links[i["link"]][1]), links[i["link"]][2]]
                       for i in node["inputs"] if i["link"] is not None})
        expected[str(node["id"])] = (node["type"], inputs)
    assert {k: (v["class_type"], v["inputs"]) for k, v in api.items()} == expected


def test_lightning_and_sd15_sampler_settings():
    def sampler(name):
        api = json.loads((API_DIR / f"{name}.json").read_text())
        return next(n["inputs"] for n in api.values() if n["class_type"] == "KSampler")

    for name in ("text_only_body_id_sdxl_lightning", "photo_face_body_sdxl_lightning"):
        ks = sampler(name)
        assert 4 <= ks["steps"] <= 8 and ks["cfg"] <= 2.0
        assert (ks["sampler_name"], ks["scheduler"]) == ("euler", "sgm_uniform")
    ks = sampler("photo_face_body_sd15")
    assert ks["steps"] >= 20 and ks["cfg"] > 2.0
    text_only = json.loads((API_DIR / "text_only_body_id_sdxl_lightning.json").read_text())
    assert not any(n["class_type"] in ("LoadImage", "BoLIDEncodeFace", "BoLIDEncodeBodyFromImages")
                   for n in text_only.values()), "text-only mode must not need a photo"


def _mutations(ui):
    def by_type(d, t):
        return next(n for n in d["nodes"] if n["type"] == t)

    def swap_widgets(d):
        values = by_type(d, "KSampler")["widgets_values"]
        values[4], values[5] = values[5], values[4]  # sampler_name <-> scheduler

    def string_for_float(d):
        by_type(d, "BoLIDApplyAdapter")["widgets_values"][1] = "0.8"

    def drop_widget(d):
        by_type(d, "KSampler")["widgets_values"].pop(1)  # the control_after_generate value

    def wrong_link_type(d):
        link = next(lk for lk in d["links"] if lk[5] == "BOLID_BODY_ID")
        link[5] = "BOLID_FACE_EMBEDS"

    def retarget(d):
        apply = by_type(d, "BoLIDApplyAdapter")
        body = next(i for i in apply["inputs"] if i["name"] == "body_id")
        model = next(i for i in apply["inputs"] if i["name"] == "model")
        link = next(lk for lk in d["links"] if lk[0] == body["link"])
        link[4] = 0  # BOLID_BODY_ID into the MODEL socket
        model["link"], body["link"] = link[0], None

    def unknown_type(d):
        by_type(d, "BoLIDLoadBodyID")["type"] = "BoLIDLoadBodyIdentity"

    def bad_combo(d):
        by_type(d, "KSampler")["widgets_values"][4] = "euler_lightning"

    return {"swap_widgets": swap_widgets, "string_for_float": string_for_float, "drop_widget": drop_widget, "wrong_link_type": wrong_link_type,
            "retarget": retarget, "unknown_type": unknown_type, "bad_combo": bad_combo}


@pytest.mark.parametrize("mutation", ["swap_widgets", "string_for_float", "drop_widget", "wrong_link_type", "retarget", "unknown_type",
                                      "bad_combo"])
def test_validator_catches_broken_workflows(mutation, specs):
    ui = json.loads((UI_DIR / "text_only_body_id_sdxl_lightning.json").read_text())
    broken = copy.deepcopy(ui)
    _mutations(broken)[mutation](broken)
    assert validate_ui(broken, specs), f"{mutation} went unnoticed"


def test_bolid_widget_order_is_append_only(specs):
    """widgets_values are positional: a BoLID node may gain widgets at the end, never reorder or lose them.
    After appending a widget or adding a node, run `python workflows/build.py --update-widget-lock`."""
    lock = json.loads(WIDGET_LOCK.read_text())["nodes"]
    current = {name: [w.name for w in spec.widgets] for name, spec in specs.items() if name.startswith("BoLID")}
    for name, locked in lock.items():
        assert name in current, f"node {name} was removed or renamed: saved workflows using it break"
        assert current[name][:len(locked)] == locked, (
            f"{name}: widgets {current[name]} must start with the released order {locked}")
    assert set(current) <= set(lock), f"new node(s) {sorted(set(current) - set(lock))}: update the widget lock"


@pytest.mark.comfyui
def test_core_node_list_matches_real_comfyui(comfyui, specs):
    """The checked-in core-node definitions are what this ComfyUI defines; every value used is accepted."""
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    from comfy_execution.validation import validate_node_input

    stored = build.core_definitions()
    classes = {n: build.core_node_class(n) for n in stored}  # nodes.py, or the comfy_extras module defining it
    real = {name: spec_def for name, spec_def in ((n, {
        "input": build.normalise_input_types(classes[n].INPUT_TYPES()),
        "output": [build.type_name(t) for t in classes[n].RETURN_TYPES],
        "output_name": list(getattr(classes[n], "RETURN_NAMES", None)
                            or [build.type_name(t) for t in classes[n].RETURN_TYPES]),
        "output_node": bool(getattr(classes[n], "OUTPUT_NODE", False)),
    }) for n in stored)}
    for name, definition in stored.items():
        ours, theirs = build.spec_from_definition(name, definition), build.spec_from_definition(name, real[name])
        assert ours.inputs == theirs.inputs and ours.outputs == theirs.outputs and ours.output_node == theirs.output_node
        assert [(w.name, w.kind) for w in ours.widgets] == [(w.name, w.kind) for w in theirs.widgets], name
        for a, b in zip(ours.widgets, theirs.widgets, strict=True):
            assert set(a.choices) <= set(b.choices), f"{name}.{a.name}: choices missing in this ComfyUI"
    # every value and link of every API workflow passes ComfyUI's own type rule and combo lists
    for path in sorted(API_DIR.glob("*.json")):
        prompt = json.loads(path.read_text())
        for node in prompt.values():
            if node["class_type"] not in real:
                continue
            real_spec = build.spec_from_definition(node["class_type"], real[node["class_type"]])
            for w in real_spec.widgets:
                if w.kind == "COMBO" and w.choices and node["class_type"] != "LoadImage":
                    assert node["inputs"][w.name] in w.choices, (path.name, w.name)
        for node in prompt.values():
            spec = specs[node["class_type"]]
            for socket in spec.inputs:
                value = node["inputs"].get(socket.name)
                if isinstance(value, list):
                    out_type = specs[prompt[value[0]]["class_type"]].outputs[value[1]][1]
                    assert validate_node_input(out_type, socket.type), (path.name, socket.name)
