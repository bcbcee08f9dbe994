"""The graph compiler behind BoLID's example workflows: node specs from node definitions, and a workflow
described in Python (nodes and named links, no ids) compiled to ComfyUI's UI format and to the API format.

Node ids are derived: the n-th node added to a graph gets id n, link ids follow the order links were made.
Widget values are positional in the UI format, so their order comes from the node definitions (NodeSpec), never
from the workflow: a workflow names widgets. tests/test_workflows.py validates the files with its own reader and
shares only spec_from_definition with this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
UPLOAD_KEYS = ("image_upload", "video_upload", "animated_image_upload")
# Nodes that exist only in ComfyUI's frontend (never sent to the server): type -> widget names.
FRONTEND_ONLY = {"MarkdownNote": ("text",), "Note": ("text",)}


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


# ----------------------------------------------------------------------------------------------------------------
# a workflow: nodes and named links


@dataclass(eq=False)  # compared by identity: two nodes with equal settings are still two nodes
class Node:
    type: str
    pos: tuple[int, int]
    widgets: dict[str, Any] = field(default_factory=dict)
    title: str | None = None
    size: tuple[int, int] | None = None
    color: str | None = None
    models: tuple[dict[str, str], ...] = ()  # public files the node loads: {name, url, directory}


@dataclass(frozen=True)
class Link:
    src: Node
    output: str  # output name of src
    dst: Node
    input: str  # input socket name of dst


@dataclass
class Workflow:
    """A graph under construction: add() nodes, link() them; ids are given when it is compiled."""

    name: str
    title: str
    nodes: list[Node] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)
    api: bool = True  # also written in API format

    def add(self, type_: str, pos: tuple[int, int], widgets: dict[str, Any] | None = None, **kwargs: Any) -> Node:
        node = Node(type_, pos, dict(widgets or {}), **kwargs)
        self.nodes.append(node)
        return node

    def link(self, src: Node, output: str, dst: Node, input_: str) -> None:
        if any(link.dst is dst and link.input == input_ for link in self.links):
            raise ValueError(f"{self.name}: input {input_!r} of a {dst.type} is already connected")
        self.links.append(Link(src, output, dst, input_))

    def ids(self) -> dict[int, int]:
        """id(node) -> the node's id in the files: its position in the order nodes were added, from 1."""
        return {id(node): i for i, node in enumerate(self.nodes, start=1)}


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


def _topological_order(workflow: Workflow, ids: dict[int, int]) -> dict[int, int]:
    deps = {ids[id(n)]: {ids[id(link.src)] for link in workflow.links if link.dst is n} for n in workflow.nodes}
    order: dict[int, int] = {}
    while len(order) < len(deps):
        ready = sorted(i for i, d in deps.items() if i not in order and d <= set(order))
        if not ready:
            raise ValueError(f"{workflow.name}: the graph has a cycle")
        for i in ready:
            order[i] = len(order)
    return order


def to_ui(workflow: Workflow, specs: dict[str, NodeSpec]) -> dict:
    """The workflow in ComfyUI's UI format (what the graph editor saves)."""
    ids = workflow.ids()
    if len(ids) != len(workflow.nodes):
        raise ValueError(f"{workflow.name}: a node was added twice")
    links = []
    out_links: dict[tuple[int, int], list[int]] = {}
    in_links: dict[tuple[int, int], int] = {}
    for link_id, link in enumerate(workflow.links, start=1):
        src, dst = ids.get(id(link.src)), ids.get(id(link.dst))
        if src is None or dst is None:
            raise ValueError(f"{workflow.name}: a link joins a node that was never added ({link.src.type} -> "
                             f"{link.dst.type})")
        src_spec, dst_spec = specs[link.src.type], specs[link.dst.type]
        out_slot = [name for name, _ in src_spec.outputs].index(link.output)
        in_slot = [s.name for s in dst_spec.inputs].index(link.input)
        links.append([link_id, src, out_slot, dst, in_slot, src_spec.outputs[out_slot][1]])
        out_links.setdefault((src, out_slot), []).append(link_id)
        in_links[(dst, in_slot)] = link_id
    order = _topological_order(workflow, ids)
    nodes = []
    for node in workflow.nodes:
        node_id, spec = ids[id(node)], specs[node.type]
        unknown = set(node.widgets) - {w.name for w in spec.widgets}
        if unknown:
            raise ValueError(f"{workflow.name}: node {node_id} ({node.type}) has no widget(s) {sorted(unknown)}")
        entry: dict[str, Any] = {"id": node_id, "type": node.type, "pos": list(node.pos),
                                 "size": _node_size(spec, node), "flags": {}, "order": order[node_id], "mode": 0,
                                 "inputs": [{"name": s.name, "type": s.type, "link": in_links.get((node_id, i))}
                                            for i, s in enumerate(spec.inputs)],
                                 "outputs": [{"name": name, "type": kind, "links": out_links.get((node_id, i), []),
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
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
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
