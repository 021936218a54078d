"""Builds the example workflows: ``workflows/<name>.json`` (UI format) and ``workflows/api/<name>.json`` (API format).

Each workflow is described once, below, as nodes, links and groups; both files are generated from that description,
so the UI file and its API twin cannot drift apart. Widget values are filled in ``input_order`` from the node
schemas: ComfyUI 0.8.0's ``object_info`` (vendored in ``tests/data/comfyui-0.8.0``) for core nodes, the pack's own ``INPUT_TYPES`` (loaded
with stubbed ComfyUI modules) for Crucible nodes. After changing a workflow below or a Crucible node's inputs, run::

    .venv/bin/python tests/workflow_builder.py          # rewrite the files
    .venv/bin/python tests/workflow_builder.py --check  # exit 1 when a committed file is out of date

``tests/test_workflows.py`` validates the committed files on their own and fails while they differ from this build.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = ("seed", "noise_seed")  # the frontend adds a control_after_generate widget to these INT inputs
NOTE_COLOR, NOTE_BGCOLOR = "#432", "#653"
GROUP_COLORS = ("#3f789e", "#8A8", "#b58b2a", "#a1309b", "#88A", "#b06634")
TITLE_HEIGHT, SLOT_HEIGHT, WIDGET_HEIGHT, MULTILINE_HEIGHT = 30, 22, 26, 90
GAP = 40
# Room below the widgets for a comfortable view of what a node shows after it ran (an image, a text box); never less
# than the frontend grows the node to (``grown_height``).
DISPLAY_HEIGHT = {"PreviewImage": 280, "SaveImage": 280, "CrucibleImageGrid": 360, "PreviewAny": 140}

# --- the frontend ComfyUI 0.8.0 ships (comfyui-frontend-package 1.35.9) ------------------------------------------------
# LiteGraph's LGraphNode.computeSize: NODE_SLOT_HEIGHT per row (rows = max(socket inputs, outputs, 1)), then per
# visible widget its height + 4 (NODE_WIDGET_HEIGHT 20; a DOM widget its computeLayoutSize minHeight: a textarea 50,
# the "$$canvas-image-preview" widget 220), then 8.
FE_SLOT_HEIGHT, FE_WIDGET_HEIGHT, FE_TEXTAREA_HEIGHT, FE_IMAGE_PREVIEW_HEIGHT = 20, 20, 50, 220


@dataclass(frozen=True)
class FrontendWidget:
    """A widget the frontend's own extension adds to every node of a type, after the schema's widgets."""

    name: str
    saved: Any  # what LGraphNode.serialize writes into widgets_values (None: the widget has serialize = false)
    height: int  # its computeSize share (0: hidden)


# Comfy.PreviewAny (onNodeCreated) adds a read-only markdown preview (hidden), a read-only text preview (both
# serialize = false, so saved as null) and a "previewMode" toggle (Markdown / Plaintext, default false). They are not
# node inputs: the API twins leave them out (the server ignores unknown inputs).
FRONTEND_WIDGETS: dict[str, tuple[FrontendWidget, ...]] = {
    "PreviewAny": (FrontendWidget("preview", None, 0), FrontendWidget("preview", None, FE_TEXTAREA_HEIGHT),
                   FrontendWidget("previewMode", False, FE_WIDGET_HEIGHT)),
}
# What a node gains once it has run: "image" = an image preview (ui images, or previews sent through the progress bar:
# Crucible Train's live loss curve and samples, a sampler's latent previews when the preview method is on); "text" =
# the report box of nodes/web/crucible.js (TEXT_NODES there). The node grows to fit; it never shrinks by itself.
GROWS_AFTER_RUN: dict[str, tuple[str, ...]] = {
    "PreviewImage": ("image",), "SaveImage": ("image",), "CrucibleImageGrid": ("image",), "KSampler": ("image",),
    "CrucibleTrain": ("image", "text"), "CrucibleDataset": ("text",), "CrucibleCaptionPreview": ("text",),
    "CrucibleStepPlan": ("text",),
}

SD15_CKPT = "v1-5-pruned-emaonly-fp16.safetensors"
SDXL_CKPT = "sd_xl_base_1.0.safetensors"
TINY_CKPT = "crucible_tiny_sd15.safetensors"
COMFY_CKPT = "crucible_comfy_sd15.safetensors"  # tests/comfy_sd15.py: small, but Load Checkpoint takes it
DEMO_FOLDER = "crucible_demo"
DEMO_PROMPTS = "crucible, red circle, black background\ncrucible, blue square, black background"
NEGATIVE = "blurry, low quality, watermark, text"


# --- schemas -------------------------------------------------------------------------------------------------------
def core_object_info() -> dict[str, dict]:
    sys.path[:0] = [p for p in (str(ROOT), str(Path(__file__).parent)) if p not in sys.path]
    from comfyui_reference import REFERENCE

    return REFERENCE.object_info()


def pack_object_info() -> dict[str, dict]:
    """The pack's ``/object_info`` entries, read from its classes with ComfyUI's runtime stubbed (empty folders)."""
    sys.path[:0] = [p for p in (str(ROOT), str(Path(__file__).parent)) if p not in sys.path]
    import comfy_stubs

    with tempfile.TemporaryDirectory(prefix="crucible-schemas-") as base:
        _, restore = comfy_stubs.install(Path(base))
        try:
            return comfy_stubs.pack_object_info(comfy_stubs.load_pack())
        finally:
            restore()


def load_schemas() -> dict[str, dict]:
    return {**core_object_info(), **pack_object_info()}


def ordered_inputs(info: dict) -> list[tuple[str, list | tuple]]:
    """``(name, spec)`` of the required then optional inputs, in ``input_order``."""
    order = info.get("input_order") or {s: list(v) for s, v in info["input"].items()}
    return [(name, info["input"][section][name]) for section in ("required", "optional")
            for name in order.get(section, [])]


def spec_options(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def socket_type(spec) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def is_widget(spec) -> bool:
    return socket_type(spec) in WIDGET_TYPES and not spec_options(spec).get("forceInput")


def has_control(name: str, spec) -> bool:
    """True when the frontend puts a control_after_generate widget right after this one."""
    options = spec_options(spec)
    if socket_type(spec) != "INT":
        return False
    return bool(options["control_after_generate"]) if "control_after_generate" in options else name in SEED_NAMES


def default_value(name: str, spec) -> Any:
    options = spec_options(spec)
    if "default" in options:
        return options["default"]
    choices = spec[0] if isinstance(spec[0], list) else options.get("options")
    if choices:
        return choices[0]
    if socket_type(spec) == "COMBO":
        raise ValueError(f"'{name}' is a file list; give its value explicitly")
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[socket_type(spec)]


# --- graph description -----------------------------------------------------------------------------------------------
@dataclass
class Node:
    id: int
    type: str
    pos: tuple[int, int]
    size: tuple[int, int]
    title: str | None
    widgets: dict[str, Any]  # widget name -> value (every widget, in order)
    controls: dict[str, str]  # seed widget name -> control_after_generate value
    info: dict | None  # None for a Note
    mode: int = 0
    note: str = ""

    @property
    def box(self) -> tuple[int, int, int, int]:
        x, y = self.pos
        return x, y - TITLE_HEIGHT, x + self.size[0], y + self.size[1]


@dataclass
class Link:
    id: int
    src: Node
    src_slot: int
    dst: Node
    input: str
    type: str


@dataclass
class Group:
    title: str
    members: list[Node]
    color: str


@dataclass
class Workflow:
    """One example workflow under construction."""

    name: str
    schemas: dict[str, dict]
    nodes: list[Node] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)

    def add(self, type_: str, pos: tuple[int, int], *, title: str | None = None, node_width: int = 320,
            **values: Any) -> Node:
        """A node with every widget at its default, overridden by ``values`` (a seed's control: ``<name>_control``).

        A node whose own widget is called ``title`` (Crucible Image Grid) gets ``title`` as that widget's value too."""
        info = self.schemas[type_]
        if title is not None and "title" not in values and any(n == "title" for n, _ in ordered_inputs(info)):
            values["title"] = title
        widgets, controls = {}, {}
        for name, spec in ordered_inputs(info):
            if is_widget(spec):
                widgets[name] = values.pop(name) if name in values else default_value(name, spec)
                if has_control(name, spec):
                    controls[name] = values.pop(f"{name}_control", "fixed")
        if values:
            raise ValueError(f"{self.name}: {type_} has no widget(s) {sorted(values)}")
        size = (node_width, max(_height(info) + DISPLAY_HEIGHT.get(type_, 0), grown_height(type_, info)))
        node = Node(len(self.nodes) + 1, type_, pos, size, title, widgets, controls, info)
        self.nodes.append(node)
        return node

    def note(self, pos: tuple[int, int], text: str, width: int = 320) -> Node:
        lines = sum(1 + len(line) // 44 for line in text.splitlines())
        node = Node(len(self.nodes) + 1, "Note", pos, (width, 24 + 17 * lines), None, {}, {}, None, note=text)
        self.nodes.append(node)
        return node

    def connect(self, src: Node, output: str | int, dst: Node, input_name: str) -> Link:
        outputs = src.info["output_name"]
        slot = output if isinstance(output, int) else outputs.index(output)
        specs = dict(ordered_inputs(dst.info))
        if input_name not in specs:
            raise ValueError(f"{self.name}: {dst.type} has no input '{input_name}'")
        if any(link.dst is dst and link.input == input_name for link in self.links):
            raise ValueError(f"{self.name}: {dst.type}.{input_name} is already connected")
        link = Link(len(self.links) + 1, src, slot, dst, input_name, src.info["output"][slot])
        self.links.append(link)
        return link

    def group(self, title: str, *members: Node) -> Group:
        group = Group(title, list(members), GROUP_COLORS[len(self.groups) % len(GROUP_COLORS)])
        self.groups.append(group)
        return group

    # --- serialisation -------------------------------------------------------------------------------------------
    def linked(self, node: Node) -> dict[str, Link]:
        return {link.input: link for link in self.links if link.dst is node}

    def ui_inputs(self, node: Node) -> list[dict]:
        """Sockets in input order, then the widgets that a link drives (``widget: {name}``)."""
        if node.info is None:
            return []
        links = self.linked(node)
        specs = ordered_inputs(node.info)
        sockets = [(n, s) for n, s in specs if not is_widget(s)] + [(n, s) for n, s in specs if is_widget(s) and n in links]
        out = []
        for name, spec in sockets:
            entry = {"name": name, "type": socket_type(spec), "link": links[name].id if name in links else None}
            if is_widget(spec):
                entry["widget"] = {"name": name}
            out.append(entry)
        return out

    def ui_outputs(self, node: Node) -> list[dict]:
        if node.info is None:
            return []
        out = []
        for slot, (name, type_) in enumerate(zip(node.info["output_name"], node.info["output"])):
            entry = {"name": name, "type": type_,
                     "links": [l.id for l in self.links if l.src is node and l.src_slot == slot], "slot_index": slot}
            if node.info["output_is_list"][slot]:
                entry["shape"] = 6  # the frontend draws list outputs with a grid-shaped dot
            out.append(entry)
        return out

    def ui_node(self, node: Node, order: int) -> dict:
        data: dict[str, Any] = {"id": node.id, "type": node.type, "pos": list(node.pos), "size": list(node.size),
                                "flags": {}, "order": order, "mode": node.mode, "inputs": [], "outputs": []}
        if node.title:
            data["title"] = node.title
        if node.info is None:
            data.update(properties={}, widgets_values=[node.note], color=NOTE_COLOR, bgcolor=NOTE_BGCOLOR)
            return data
        slots = self.ui_inputs(node)
        data.update(inputs=slots, outputs=self.ui_outputs(node))
        data["properties"] = {"Node name for S&R": node.type}
        values = []
        for name, value in node.widgets.items():
            values.append(value)
            if name in node.controls:
                values.append(node.controls[name])
        data["widgets_values"] = values + [w.saved for w in FRONTEND_WIDGETS.get(node.type, ())]
        return data

    def ui(self) -> dict:
        order = {node.id: i for i, node in enumerate(self.execution_order())}
        nodes = [self.ui_node(n, order[n.id]) for n in self.nodes]
        slot_of = {n["id"]: {s["name"]: i for i, s in enumerate(n["inputs"])} for n in nodes}
        links = [[l.id, l.src.id, l.src_slot, l.dst.id, slot_of[l.dst.id][l.input], l.type] for l in self.links]
        groups = [{"id": i + 1, "title": g.title, "bounding": _bounding(g.members), "color": g.color,
                   "font_size": 24, "flags": {}} for i, g in enumerate(self.groups)]
        return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"crucible/workflows/{self.name}")), "revision": 0,
                "last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": nodes, "links": links,
                "groups": groups, "config": {}, "extra": {"ds": {"scale": 0.6, "offset": [60, 120]}},
                "version": 0.4}

    def api(self) -> dict:
        prompt = {}
        for node in self.nodes:
            if node.info is None or node.mode != 0:
                continue  # notes live in the UI only; muted nodes are not sent
            links, inputs = self.linked(node), {}
            for name, spec in ordered_inputs(node.info):
                if name in links:
                    inputs[name] = [str(links[name].src.id), links[name].src_slot]
                elif name in node.widgets:
                    inputs[name] = node.widgets[name]
            prompt[str(node.id)] = {"inputs": inputs, "class_type": node.type,
                                    "_meta": {"title": node.title or node.info["display_name"]}}
        return prompt

    def execution_order(self) -> list[Node]:
        """Notes first, then a topological order of the linked nodes (ties by id), like the frontend's ``order``."""
        pending = {n.id: {l.src.id for l in self.links if l.dst is n} for n in self.nodes}
        done: list[Node] = []
        while pending:
            ready = sorted((i for i, deps in pending.items() if not deps - {n.id for n in done}),
                           key=lambda i: (self.nodes[i - 1].info is not None, i))
            if not ready:
                raise ValueError(f"{self.name}: the links form a cycle")
            done.append(self.nodes[ready[0] - 1])
            del pending[ready[0]]
        return done


def _height(info: dict) -> int:
    specs = ordered_inputs(info)
    sockets = sum(1 for _, s in specs if not is_widget(s))
    widgets = sum(1 + has_control(n, s) for n, s in specs if is_widget(s))
    multiline = sum(1 for _, s in specs if is_widget(s) and spec_options(s).get("multiline"))
    return 16 + SLOT_HEIGHT * max(sockets, len(info["output"]), 1) + WIDGET_HEIGHT * widgets + MULTILINE_HEIGHT * multiline


def grown_height(type_: str, info: dict) -> int:
    """The height the frontend gives a node of this type once it has run (LGraphNode.computeSize, see above)."""
    specs = ordered_inputs(info)
    rows = max(sum(1 for _, s in specs if not is_widget(s)), len(info["output"]), 1)
    widgets = []
    for name, spec in specs:
        if is_widget(spec):
            widgets.append(FE_TEXTAREA_HEIGHT if spec_options(spec).get("multiline") else FE_WIDGET_HEIGHT)
            if has_control(name, spec):
                widgets.append(FE_WIDGET_HEIGHT)
    widgets += [w.height for w in FRONTEND_WIDGETS.get(type_, ()) if w.height]
    grows = GROWS_AFTER_RUN.get(type_, ())
    widgets += [FE_IMAGE_PREVIEW_HEIGHT] * ("image" in grows) + [FE_TEXTAREA_HEIGHT] * ("text" in grows)
    return FE_SLOT_HEIGHT * rows + sum(h + 4 for h in widgets) + 8


def _bounding(members: list[Node]) -> list[int]:
    boxes = [m.box for m in members]
    x0, y0 = min(b[0] for b in boxes) - 20, min(b[1] for b in boxes) - 50
    x1, y1 = max(b[2] for b in boxes) + 20, max(b[3] for b in boxes) + 20
    return [x0, y0, x1 - x0, y1 - y0]


class Column:
    """Places nodes top to bottom at one x, leaving a gap below each."""

    def __init__(self, wf: Workflow, x: int, y: int = 0):
        self.wf, self.x, self.y = wf, x, y

    def add(self, type_: str, **values: Any) -> Node:
        node = self.wf.add(type_, (self.x, self.y), **values)
        self.y += node.size[1] + TITLE_HEIGHT + GAP
        return node

    def note(self, text: str, width: int = 320) -> Node:
        node = self.wf.note((self.x, self.y), text, width)
        self.y += node.size[1] + TITLE_HEIGHT + GAP
        return node


# --- shared stages ---------------------------------------------------------------------------------------------------
NOTES = {
    "base": "Your base model: the checkpoint you train on. The sweep renders every saved LoRA on top of this "
            "MODEL/CLIP, exactly as a stock Load LoRA node would.",
    "dataset": "Put images with same-name .txt captions in ComfyUI/input/<folder>/10_<concept>/ (kohya layout: the "
               "number is the repeats). Relative paths are inside ComfyUI/input; other folders must be listed in "
               "CRUCIBLE_ALLOWED_DIRS. The bundled demo: copy custom_nodes/<this pack>/trainer/demo_data to "
               "ComfyUI/input/crucible_demo.",
    "train": "Crucible Model reads the same checkpoint file. Train shows progress and the loss curve; Cancel saves a "
             "checkpoint and the training state, and queueing again with resume on continues exactly. LoRAs are "
             "saved to models/loras/<run_name>/.",
    "sweep": "One MODEL/CLIP/prompt/seed per checkpoint x strength x prompt x seed, as lists: the stock "
             "CLIPTextEncode -> KSampler -> VAE Decode chain below renders each of them in this one queue item.",
    "grid": "Columns are checkpoints (base first), rows are prompts x seeds x strengths. The grid is saved to "
            "ComfyUI/output/crucible/ with its layout in the PNG metadata.",
}


def base_model_stage(wf: Workflow, col: Column, ckpt: str, text: str = NOTES["base"]) -> Node:
    note = col.note(text)
    loader = col.add("CheckpointLoaderSimple", ckpt_name=ckpt)
    wf.group("1. Base model", note, loader)
    return loader


def dataset_stage(wf: Workflow, col: Column, *, title: str = "2. Dataset", resolution: int = 512,
                  path: str = DEMO_FOLDER, note: str = NOTES["dataset"], **dataset_values: Any) -> Node:
    n = col.note(note)
    captions = col.add("CrucibleCaptionOptions", trigger_word="crucible", keep_tokens=1, shuffle_caption=True)
    data = col.add("CrucibleDataset", path=path, resolution=resolution, **dataset_values)
    wf.connect(captions, "captions", data, "captions")
    wf.group(title, n, captions, data)
    return data


def render_stage(wf: Workflow, x: int, sweep: Node, loader: Node, group: Group | str, *, size: int, steps: int,
                 cfg: float, sampler: str = "euler", scheduler: str = "normal", note: str | None = None) -> Node:
    """The user's own text-encode -> sample -> decode chain, fed by the sweep's lists; returns VAE Decode.

    Its nodes join ``group``, or a new group of that title."""
    left, right = Column(wf, x), Column(wf, x + 360)
    notes = [left.note(note)] if note else []
    positive = left.add("CLIPTextEncode", title="Prompt (from the sweep)", text="")
    negative = left.add("CLIPTextEncode", title="Negative prompt", text=NEGATIVE)
    latent = left.add("EmptyLatentImage", width=size, height=size, batch_size=1)
    sampler_node = right.add("KSampler", seed=1234, steps=steps, cfg=cfg, sampler_name=sampler, scheduler=scheduler)
    decode = right.add("VAEDecode")
    for dst in (positive, negative):
        wf.connect(sweep, "clip", dst, "clip")
    wf.connect(sweep, "prompt", positive, "text")
    wf.connect(sweep, "model", sampler_node, "model")
    wf.connect(sweep, "seed", sampler_node, "seed")
    wf.connect(positive, 0, sampler_node, "positive")
    wf.connect(negative, 0, sampler_node, "negative")
    wf.connect(latent, 0, sampler_node, "latent_image")
    wf.connect(sampler_node, 0, decode, "samples")
    wf.connect(loader, "VAE", decode, "vae")
    members = [*notes, positive, negative, latent, sampler_node, decode]
    if isinstance(group, Group):
        group.members += members
    else:
        wf.group(group, *members)
    return decode


def grid_stage(wf: Workflow, x: int, decode: Node, sweep: Node, *, title: str, prefix: str,
               group_title: str = "5. Grid") -> Node:
    col = Column(wf, x)
    n = col.note(NOTES["grid"])
    grid = col.add("CrucibleImageGrid", title=title, filename_prefix=prefix)
    wf.connect(decode, 0, grid, "images")
    for output, input_name in (("label", "labels"), ("column", "columns"), ("row", "rows"), ("row_label", "row_labels")):
        wf.connect(sweep, output, grid, input_name)
    wf.group(group_title, n, grid)
    return grid


def sweep_node(wf: Workflow, col: Column, loader: Node, *, run: Node | None, group_title: str,
               note: str | None = None, **values: Any) -> tuple[Node, Group]:
    members = [col.note(note)] if note else []
    sweep = col.add("CrucibleCheckpointSweep", **values)
    wf.connect(loader, "MODEL", sweep, "model")
    wf.connect(loader, "CLIP", sweep, "clip")
    if run is not None:
        wf.connect(run, "run", sweep, "run")
    return sweep, wf.group(group_title, *members, sweep)


def train_and_sweep(name: str, schemas: dict, *, family: str, ckpt: str, resolution: int, run_name: str,
                    network: dict, optimizer: dict, training: dict | None, train: dict, sweep: dict,
                    render: dict, grid_title: str, train_note: str = NOTES["train"],
                    sweep_note: str = NOTES["sweep"]) -> Workflow:
    """Base model + dataset + training options + Train, then the sweep rendered by stock nodes into a grid."""
    wf = Workflow(name, schemas)
    loader = base_model_stage(wf, Column(wf, 0), ckpt)
    data = dataset_stage(wf, Column(wf, 400), resolution=resolution)
    left, right = Column(wf, 800), Column(wf, 1160)
    n = left.note(train_note)
    model = left.add("CrucibleModel", family=family, ckpt_name=ckpt)
    net = left.add("CrucibleNetworkOptions", **network)
    opt = left.add("CrucibleOptimizerOptions", **optimizer)
    members = [n, model, net, opt]
    trainer = right.add("CrucibleTrain", run_name=run_name, **train)
    wf.connect(model, "model", trainer, "model")
    wf.connect(data, "dataset", trainer, "dataset")
    wf.connect(net, "network", trainer, "network")
    wf.connect(opt, "optimizer", trainer, "optimizer")
    if training is not None:
        options = right.add("CrucibleTrainingOptions", **training)
        wf.connect(options, "training", trainer, "training")
        members.append(options)
    preview = right.add("PreviewImage", title="Loss curve")
    wf.connect(trainer, "loss_curve", preview, "images")
    wf.group("3. Train", *members, trainer, preview)
    sweep_col = Column(wf, 1600)
    sweeper, group = sweep_node(wf, sweep_col, loader, run=trainer, group_title="4. Sweep and render",
                                note=sweep_note, **sweep)
    decode = render_stage(wf, 1960, sweeper, loader, group, **render)
    grid_stage(wf, 2720, decode, sweeper, title=grid_title, prefix=f"crucible/{run_name}")
    return wf


# --- the workflows ---------------------------------------------------------------------------------------------------
def dataset_preview(schemas: dict) -> Workflow:
    wf = Workflow("crucible_dataset_preview", schemas)
    data = dataset_stage(wf, Column(wf, 0), title="1. Dataset", resolution=512)
    col = Column(wf, 400)
    n = col.note("Check the data before training: the report lists concepts, repeats and caption problems; the "
                 "preview shows the exact captions training will use (same code, same seed); the plan counts "
                 "steps and says which ones save a checkpoint.")
    report = col.add("PreviewAny", title="Dataset report")
    preview = col.add("CrucibleCaptionPreview", images="0-3", epochs=2, seed=42)
    plan = col.add("CrucibleStepPlan", batch_size=2, epochs=10, save_every_n_epochs=2, seed=42)
    texts = Column(wf, 760)
    shown = [texts.add("PreviewAny", title=t) for t in ("Captions", "Step plan")]
    wf.connect(data, "report", report, "source")
    for node, output, view in ((preview, "preview", shown[0]), (plan, "plan", shown[1])):
        wf.connect(data, "dataset", node, "dataset")
        wf.connect(node, output, view, "source")
    wf.group("2. Check", n, report, preview, plan, *shown)
    return wf


def sd15_lora_sweep(schemas: dict) -> Workflow:
    return train_and_sweep(
        "crucible_sd15_lora_sweep", schemas, family="sd15", ckpt=SD15_CKPT, resolution=512, run_name="sd15-lora",
        network=dict(network_dim=16, network_alpha=8.0), optimizer=dict(learning_rate=1e-4, lr_warmup_ratio=0.05),
        training=None, train=dict(epochs=10, batch_size=2, save_every_n_epochs=2),
        sweep=dict(prompts=DEMO_PROMPTS, seeds="1234", strengths="1.0", include_base=True),
        render=dict(size=512, steps=20, cfg=7.0), grid_title="sd15-lora: every checkpoint")


def sdxl_lora_grid(schemas: dict) -> Workflow:
    return train_and_sweep(
        "crucible_sdxl_lora_grid", schemas, family="sdxl", ckpt=SDXL_CKPT, resolution=1024, run_name="sdxl-lora",
        network=dict(network_dim=16, network_alpha=16.0, target_preset="attn"),
        optimizer=dict(learning_rate=1e-4, lr_warmup_ratio=0.05),
        training=dict(mixed_precision="bf16", gradient_checkpointing=True),
        train=dict(epochs=10, batch_size=1, save_every_n_epochs=2, checkpoint_limit=5),
        sweep=dict(prompts="crucible, red circle, black background", seeds="1234", strengths="0.6, 0.8, 1.0",
                   include_base=False),
        render=dict(size=1024, steps=25, cfg=6.0, sampler="dpmpp_2m", scheduler="karras"),
        grid_title="sdxl-lora: strength x checkpoint",
        sweep_note="Strengths 0.6, 0.8 and 1.0 make three rows per prompt, one column per checkpoint: the "
                   "strength x checkpoint grid for picking both. " + NOTES["sweep"])


def full_finetune_sweep(schemas: dict) -> Workflow:
    return train_and_sweep(
        "crucible_full_finetune_sweep", schemas, family="sd15", ckpt=SD15_CKPT, resolution=512, run_name="sd15-full",
        network=dict(network_type="full"), optimizer=dict(learning_rate=5e-6, lr_scheduler="constant"),
        training=dict(mixed_precision="bf16", gradient_checkpointing=True),
        train=dict(epochs=4, batch_size=1, save_every_n_epochs=1, checkpoint_limit=3),
        sweep=dict(prompts=DEMO_PROMPTS, seeds="1234", strengths="1.0", include_base=True),
        render=dict(size=512, steps=20, cfg=7.0), grid_title="sd15-full: every checkpoint",
        train_note="network_type full trains the whole UNet (a full fine-tune, no LoRA). Each checkpoint is a "
                   "complete UNet saved to models/diffusion_models/<run_name>/ (checkpoint_limit keeps the "
                   "newest 3). Cancel saves the state; resume continues.",
        sweep_note="The sweep loads each checkpoint of models/diffusion_models/<run_name>/ with ComfyUI's own "
                   "diffusion-model loader (CLIP and VAE stay the base model's). To re-sweep later without "
                   "training, disconnect run and pick diffusion_models/<run_name> in folder. " + NOTES["sweep"])


def sweep_saved_run(schemas: dict) -> Workflow:
    wf = Workflow("crucible_sweep_saved_run", schemas)
    loader = base_model_stage(wf, Column(wf, 0), SD15_CKPT)
    note = ("Re-sweep a finished run without training: pick its folder (loras/<run_name> or "
            "diffusion_models/<run_name>). every_nth and name_filter thin out long runs.")
    sweep, _ = sweep_node(wf, Column(wf, 400), loader, run=None, group_title="2. Sweep a saved run", note=note,
                          folder="loras/sd15-lora", prompts=DEMO_PROMPTS, seeds="1234, 5678", strengths="1.0",
                          include_base=True, every_nth=2)
    decode = render_stage(wf, 760, sweep, loader, "3. Render", size=512, steps=20, cfg=7.0, note=NOTES["sweep"])
    grid_stage(wf, 1520, decode, sweep, title="sd15-lora: saved checkpoints", prefix="crucible/sd15-lora-resweep",
               group_title="4. Grid")
    return wf


def api_sweep(schemas: dict) -> Workflow:
    """For ``python -m trainer.comfy_client sweep``: it patches the loader titled "Crucible checkpoint"."""
    wf = Workflow("crucible_api_sweep", schemas)
    col, right = Column(wf, 0), Column(wf, 400)
    n = col.note("For python -m trainer.comfy_client sweep --workflow workflows/api/crucible_api_sweep.json: the "
                 "client queues this once per checkpoint, setting lora_name of the node titled 'Crucible "
                 "checkpoint', and composes the results into one labelled strip.")
    loader = col.add("CheckpointLoaderSimple", ckpt_name=SD15_CKPT)
    lora = col.add("LoraLoader", title="Crucible checkpoint", lora_name="sd15-lora/sd15-lora-e0010-s000600.safetensors",
                   strength_model=1.0, strength_clip=1.0)
    positive = right.add("CLIPTextEncode", title="Prompt", text="crucible, red circle, black background")
    negative = right.add("CLIPTextEncode", title="Negative prompt", text=NEGATIVE)
    latent = right.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    out = Column(wf, 800)
    sampler = out.add("KSampler", seed=1234, steps=20, cfg=7.0, sampler_name="euler", scheduler="normal")
    decode = out.add("VAEDecode")
    save = out.add("SaveImage", filename_prefix="crucible/sweep")
    wf.connect(loader, "MODEL", lora, "model")
    wf.connect(loader, "CLIP", lora, "clip")
    for dst in (positive, negative):
        wf.connect(lora, "CLIP", dst, "clip")
    wf.connect(lora, "MODEL", sampler, "model")
    wf.connect(positive, 0, sampler, "positive")
    wf.connect(negative, 0, sampler, "negative")
    wf.connect(latent, 0, sampler, "latent_image")
    wf.connect(sampler, 0, decode, "samples")
    wf.connect(loader, "VAE", decode, "vae")
    wf.connect(decode, 0, save, "images")
    wf.group("Render one checkpoint", n, loader, lora, positive, negative, latent, sampler, decode, save)
    return wf


# --- SD3 / Flux: split-file models (transformer, text encoders and VAE in separate files) -----------------------------
SD3_FILES = dict(unet_name="sd3_medium.safetensors", clip_name1="clip_l.safetensors", clip_name2="clip_g.safetensors",
                 clip_name3="t5xxl_fp16.safetensors", vae_name="sd3_vae.safetensors")
FLUX_FILES = dict(unet_name="flux1-dev.safetensors", clip_name1="clip_l.safetensors",
                  clip_name2="t5xxl_fp16.safetensors", vae_name="ae.safetensors")
DEMO_STEPS_PER_EPOCH = 120  # the demo dataset: 12 images x 10 repeats at batch size 1


@dataclass
class SplitLoaders:
    """The user's own loaders of a split-file model: MODEL, CLIP and VAE come from three nodes."""

    model: Node
    clip: Node
    vae: Node


def split_loader_stage(wf: Workflow, col: Column, files: dict[str, str], *, note: str) -> SplitLoaders:
    """Load Diffusion Model + Triple (three encoders: SD3) or Dual (Flux) CLIP loader + Load VAE, on ``files``."""
    n = col.note(note)
    model = col.add("UNETLoader", unet_name=files["unet_name"], weight_dtype="default")
    encoders = {k: v for k, v in files.items() if k.startswith("clip_name")}
    if len(encoders) == 3:
        clip = col.add("TripleCLIPLoader", title="TripleCLIPLoader (clip_l, clip_g, t5xxl)", **encoders)
    else:
        clip = col.add("DualCLIPLoader", type="flux", **encoders)
    vae = col.add("VAELoader", vae_name=files["vae_name"])
    wf.group("1. Your loaders", n, model, clip, vae)
    return SplitLoaders(model, clip, vae)


def captioned_dataset_stage(wf: Workflow, col: Column, *, note: str, captions: dict[str, Any],
                            **dataset_values: Any) -> tuple[Node, Group]:
    """Caption Options (the recipe's ``captions``) -> Crucible Dataset, grouped; returns the dataset and its group."""
    n = col.note(note)
    options = col.add("CrucibleCaptionOptions", **captions)
    data = col.add("CrucibleDataset", path=DEMO_FOLDER, **dataset_values)
    wf.connect(options, "captions", data, "captions")
    return data, wf.group("2. Dataset", n, options, data)


def split_train_stage(wf: Workflow, x: int, data: Node, *, family: str, files: dict[str, str], note: str,
                      network: dict, optimizer: dict, training: dict, train: dict) -> Node:
    """Crucible Split Model (the loaders' files) + network/optimizer/training options -> Crucible Train."""
    left, right = Column(wf, x), Column(wf, x + 360)
    n = left.note(note)
    model = left.add("CrucibleSplitModel", family=family, **files)
    net = left.add("CrucibleNetworkOptions", **network)
    opt = left.add("CrucibleOptimizerOptions", **optimizer)
    trainer = right.add("CrucibleTrain", **train)
    options = right.add("CrucibleTrainingOptions", **training)
    preview = right.add("PreviewImage", title="Loss curve")
    for src, name in ((model, "model"), (data, "dataset"), (net, "network"), (opt, "optimizer"), (options, "training")):
        wf.connect(src, name, trainer, name)
    wf.connect(trainer, "loss_curve", preview, "images")
    wf.group("3. Train", n, model, net, opt, trainer, options, preview)
    return trainer


def split_sweep_stage(wf: Workflow, x: int, loaders: SplitLoaders, trainer: Node, *, note: str,
                      **values: Any) -> tuple[Node, Group]:
    """Crucible Checkpoint Sweep over the run, on the MODEL and CLIP of the user's loaders."""
    col = Column(wf, x)
    n = col.note(note)
    sweep = col.add("CrucibleCheckpointSweep", **values)
    wf.connect(loaders.model, "MODEL", sweep, "model")
    wf.connect(loaders.clip, "CLIP", sweep, "clip")
    wf.connect(trainer, "run", sweep, "run")
    return sweep, wf.group("4. Sweep and render", n, sweep)


def flow_render_stage(wf: Workflow, x: int, sweep: Node, vae: Node, group: Group, *, size: int, steps: int,
                      cfg: float, sampler: str, scheduler: str, negative: str, shift: float | None = None,
                      guidance: float | None = None) -> Node:
    """The stock SD3/Flux text-encode -> sample -> decode chain fed by the sweep's lists; its nodes join ``group``.

    ``shift`` puts ModelSamplingSD3 before KSampler, ``guidance`` FluxGuidance after the prompt. Returns VAE Decode."""
    left, right = Column(wf, x), Column(wf, x + 360)
    positive = left.add("CLIPTextEncode", title="Prompt (from the sweep)", text="")
    conditioning = positive
    members = [positive]
    if guidance is not None:
        conditioning = left.add("FluxGuidance", title="FluxGuidance", guidance=guidance)
        wf.connect(positive, 0, conditioning, "conditioning")
        members.append(conditioning)
    negative_node = left.add("CLIPTextEncode", title="Negative prompt" if negative else "Negative (unused at cfg 1)",
                             text=negative)
    latent = left.add("EmptySD3LatentImage", title="EmptySD3LatentImage", width=size, height=size, batch_size=1)
    members += [negative_node, latent]
    model = sweep
    if shift is not None:
        model = right.add("ModelSamplingSD3", shift=shift)
        wf.connect(sweep, "model", model, "model")
        members.append(model)
    sampler_node = right.add("KSampler", seed=1234, steps=steps, cfg=cfg, sampler_name=sampler, scheduler=scheduler)
    decode = right.add("VAEDecode")
    for dst in (positive, negative_node):
        wf.connect(sweep, "clip", dst, "clip")
    wf.connect(sweep, "prompt", positive, "text")
    wf.connect(model, 0, sampler_node, "model")
    wf.connect(sweep, "seed", sampler_node, "seed")
    wf.connect(conditioning, 0, sampler_node, "positive")
    wf.connect(negative_node, 0, sampler_node, "negative")
    wf.connect(latent, 0, sampler_node, "latent_image")
    wf.connect(sampler_node, 0, decode, "samples")
    wf.connect(vae, "VAE", decode, "vae")
    group.members += [*members, sampler_node, decode]
    return decode


def sd3_full_finetune_sweep(schemas: dict) -> Workflow:
    """The SD3-Medium full fine-tune recipe, then every epoch's transformer rendered side by side."""
    wf = Workflow("crucible_sd3_full_finetune_sweep", schemas)
    loader_col = Column(wf, 0)
    loaders = split_loader_stage(
        wf, loader_col, SD3_FILES,
        note="Your SD3 loaders, as for any SD3 render: the transformer (models/diffusion_models), clip_l + clip_g + "
             "t5xxl (models/text_encoders) and the SD3 VAE (models/vae). The sweep renders every checkpoint with "
             "them; Crucible Split Model trains on the same files.")
    data, _ = captioned_dataset_stage(
        wf, Column(wf, 400), resolution=1024, repeats=10,
        captions=dict(trigger_word="crucible", caption_dropout_rate=0.25),
        note="The SD3 recipe: 1024 px, 10 repeats, and 25% of the captions dropped (caption_dropout_rate 0.25) so "
             "the model keeps its unconditional prediction for CFG. " + NOTES["dataset"])
    quarter = DEMO_STEPS_PER_EPOCH // 4
    col = Column(wf, 0, loader_col.y + 80)  # below the loaders' group
    plan_note = col.note(f"Validation every quarter epoch = sample_every_n_steps of steps per epoch / 4. The step "
                         f"plan shows steps per epoch: the demo's 12 images x 10 repeats at batch 1 are "
                         f"{DEMO_STEPS_PER_EPOCH}, so Train samples every {quarter} steps. Redo this for your data.")
    plan = col.add("CrucibleStepPlan", batch_size=1, epochs=4, save_every_n_epochs=1, sample_every_n_steps=quarter,
                   lr_warmup_ratio=0.1, seed=42)
    shown = col.add("PreviewAny", title="Step plan")
    wf.connect(data, "dataset", plan, "dataset")
    wf.connect(plan, "plan", shown, "source")
    wf.group("2b. Step plan", plan_note, plan, shown)
    trainer = split_train_stage(
        wf, 800, data, family="sd3", files=SD3_FILES,
        note="network_type full trains the whole MMDiT: AdamW 1.5e-5, cosine with 10% warmup, bf16 + gradient "
             "checkpointing, logit-normal timesteps with shift 3. Each epoch saves a complete transformer to "
             "models/diffusion_models/<run_name>/. Cancel saves the state; resume continues.",
        network=dict(network_type="full"),
        optimizer=dict(learning_rate=1.5e-5, lr_scheduler="cosine", lr_warmup_ratio=0.1),
        training=dict(mixed_precision="bf16", gradient_checkpointing=True, timestep_sampling="logit_normal",
                      flow_shift=3.0),
        train=dict(run_name="sd3-full", epochs=4, batch_size=1, save_every_n_epochs=1, save_precision="bf16",
                   sample_prompts="crucible, red circle, black background", sample_every_n_steps=quarter))
    sweep, group = split_sweep_stage(
        wf, 1600, loaders, trainer, prompts=DEMO_PROMPTS, seeds="1234", strengths="1.0", include_base=True,
        note="Full checkpoints: the sweep loads each one with ComfyUI's own diffusion-model loader (CLIP and VAE "
             "stay your loaders'); the base model is the first column. Rendered like any SD3 image: "
             "ModelSamplingSD3 shift 3, cfg 4.5, 28 steps dpmpp_2m / sgm_uniform, 1024 x 1024.")
    decode = flow_render_stage(wf, 1960, sweep, loaders.vae, group, size=1024, steps=28, cfg=4.5, sampler="dpmpp_2m",
                               scheduler="sgm_uniform", negative=NEGATIVE, shift=3.0)
    grid_stage(wf, 2720, decode, sweep, title="sd3-full: every epoch", prefix="crucible/sd3-full")
    return wf


def flux_lora_sweep(schemas: dict) -> Workflow:
    """A Flux.1-dev LoRA from the split files, then every checkpoint rendered with FluxGuidance."""
    wf = Workflow("crucible_flux_lora_sweep", schemas)
    loaders = split_loader_stage(
        wf, Column(wf, 0), FLUX_FILES,
        note="Your Flux loaders, as for any Flux render: the transformer (models/diffusion_models), clip_l + t5xxl "
             "(DualCLIPLoader type flux) and ae.safetensors (models/vae). The sweep applies each LoRA to them.")
    data, _ = captioned_dataset_stage(wf, Column(wf, 400), resolution=1024,
                                      captions=dict(trigger_word="crucible", keep_tokens=1), note=NOTES["dataset"])
    trainer = split_train_stage(
        wf, 800, data, family="flux", files=FLUX_FILES,
        note="Crucible Split Model reads the loaders' files. A LoRA (dim 16) of the transformer, AdamW 1e-4, bf16 "
             "+ gradient checkpointing; flow_shift 0 = Flux dev's resolution-dependent shift. LoRAs are saved to "
             "models/loras/<run_name>/; Cancel saves the state, resume continues.",
        network=dict(network_dim=16, network_alpha=16.0),
        optimizer=dict(learning_rate=1e-4, lr_warmup_ratio=0.05),
        training=dict(mixed_precision="bf16", gradient_checkpointing=True),
        train=dict(run_name="flux-lora", epochs=10, batch_size=1, save_every_n_epochs=2))
    sweep, group = split_sweep_stage(
        wf, 1600, loaders, trainer, prompts=DEMO_PROMPTS, seeds="1234", strengths="1.0", include_base=True,
        note="Flux dev is guidance-distilled: FluxGuidance 3.5 on the prompt, KSampler cfg 1.0 (the negative is "
             "not used), euler / simple, 20 steps, 1024 x 1024. " + NOTES["sweep"])
    decode = flow_render_stage(wf, 1960, sweep, loaders.vae, group, size=1024, steps=20, cfg=1.0, sampler="euler",
                               scheduler="simple", negative="", guidance=3.5)
    grid_stage(wf, 2720, decode, sweep, title="flux-lora: every checkpoint", prefix="crucible/flux-lora")
    return wf


def ci_dataset_plan(schemas: dict) -> Workflow:
    wf = Workflow("crucible_ci_dataset_plan", schemas)
    col = Column(wf, 0)
    data = dataset_stage(wf, col, title="Dataset", resolution=64, note="CI: the demo dataset in input/crucible_demo.")
    preview = col.add("CrucibleCaptionPreview", images="0-3", epochs=2, seed=42)
    plan = col.add("CrucibleStepPlan", batch_size=4, epochs=2, save_every_n_epochs=1, seed=42)
    for node in (preview, plan):
        wf.connect(data, "dataset", node, "dataset")
    wf.groups[-1].members += [preview, plan]
    return wf


def ci_train_tiny(schemas: dict) -> Workflow:
    wf = Workflow("crucible_ci_train_tiny", schemas)
    col = Column(wf, 0)
    n = col.note("CI: train the tiny SD1.5 checkpoint the stage puts in models/checkpoints for 2 epochs at 64 px "
                 "(12 images / batch 4 = 6 steps), then lay out the loss curve.")
    model = col.add("CrucibleModel", family="sd15", ckpt_name=TINY_CKPT)
    data = col.add("CrucibleDataset", path=DEMO_FOLDER, resolution=64, repeats=1)
    net = col.add("CrucibleNetworkOptions", network_dim=4, network_alpha=4.0)
    trainer = col.add("CrucibleTrain", run_name="crucible-ci-tiny", epochs=2, batch_size=4, save_every_n_epochs=1,
                      save_precision="fp32")
    grid = col.add("CrucibleImageGrid", title="crucible-ci-tiny loss", filename_prefix="crucible/ci_train_tiny")
    wf.connect(model, "model", trainer, "model")
    wf.connect(data, "dataset", trainer, "dataset")
    wf.connect(net, "network", trainer, "network")
    wf.connect(trainer, "loss_curve", grid, "images")
    wf.group("Train tiny", n, model, data, net, trainer, grid)
    return wf


def ci_lora_sweep(schemas: dict) -> Workflow:
    """CI: the pack's signature loop in one queue item on a checkpoint ComfyUI itself loads: train a LoRA, then
    render the base model and every epoch's LoRA with ComfyUI's own loader, sampler and decoder into one grid."""
    wf = Workflow("crucible_ci_lora_sweep", schemas)
    col = Column(wf, 0)
    n = col.note("CI: Load Checkpoint and Crucible Model read the same small SD1.5 the stage builds. Two epochs at "
                 "64 px (12 images / batch 4 = 6 steps) with a high learning rate save two LoRAs; the sweep renders "
                 "base + both with the stock nodes, so each column must differ from the base one.")
    loader = col.add("CheckpointLoaderSimple", ckpt_name=COMFY_CKPT)
    model = col.add("CrucibleModel", family="sd15", ckpt_name=COMFY_CKPT)
    data = col.add("CrucibleDataset", path=DEMO_FOLDER, resolution=64, repeats=1)
    net = col.add("CrucibleNetworkOptions", network_dim=4, network_alpha=4.0)
    opt = col.add("CrucibleOptimizerOptions", learning_rate=1e-2, lr_scheduler="constant")
    trainer = col.add("CrucibleTrain", run_name="ci_sweep", epochs=2, batch_size=4, save_every_n_epochs=1)
    for src, name in ((model, "model"), (data, "dataset"), (net, "network"), (opt, "optimizer")):
        wf.connect(src, name, trainer, name)
    wf.group("Train", n, loader, model, data, net, opt, trainer)
    sweep, group = sweep_node(wf, Column(wf, 400), loader, run=trainer, group_title="Sweep and render",
                              prompts="crucible, red circle, black background", seeds="1234", strengths="1.0",
                              include_base=True)
    decode = render_stage(wf, 760, sweep, loader, group, size=64, steps=2, cfg=7.0)
    grid_stage(wf, 1520, decode, sweep, title="ci_sweep: base + every epoch", prefix="crucible/ci_lora_sweep",
               group_title="Grid")
    return wf


def ci_strip(schemas: dict) -> Workflow:
    wf = Workflow("crucible_ci_strip", schemas)
    col = Column(wf, 0)
    n = col.note("CI: three solid colours batched into one IMAGE -> a three-column strip (no model, no files).")
    colours = [col.add("EmptyImage", width=64, height=64, batch_size=1, color=c) for c in (0xE04040, 0x40C040, 0x4060E0)]
    first = col.add("ImageBatch")
    second = col.add("ImageBatch")
    grid = col.add("CrucibleImageGrid", title="CI strip", filename_prefix="crucible/ci_strip")
    wf.connect(colours[0], 0, first, "image1")
    wf.connect(colours[1], 0, first, "image2")
    wf.connect(first, 0, second, "image1")
    wf.connect(colours[2], 0, second, "image2")
    wf.connect(second, 0, grid, "images")
    wf.group("Strip", n, *colours, first, second, grid)
    return wf


# name -> (builder, write the UI file too); CI workflows are API-only (they would clutter the template browser).
BUILDERS: dict[str, tuple[Callable[[dict], Workflow], bool]] = {
    "crucible_dataset_preview": (dataset_preview, True),
    "crucible_sd15_lora_sweep": (sd15_lora_sweep, True),
    "crucible_sdxl_lora_grid": (sdxl_lora_grid, True),
    "crucible_full_finetune_sweep": (full_finetune_sweep, True),
    "crucible_sweep_saved_run": (sweep_saved_run, True),
    "crucible_api_sweep": (api_sweep, True),
    "crucible_sd3_full_finetune_sweep": (sd3_full_finetune_sweep, True),
    "crucible_flux_lora_sweep": (flux_lora_sweep, True),
    "crucible_ci_dataset_plan": (ci_dataset_plan, False),
    "crucible_ci_train_tiny": (ci_train_tiny, False),
    "crucible_ci_lora_sweep": (ci_lora_sweep, False),
    "crucible_ci_strip": (ci_strip, False),
}


def build_all(schemas: dict | None = None) -> dict[str, dict]:
    """Every file this script writes: path relative to ``workflows/`` -> JSON content."""
    schemas = schemas or load_schemas()
    files = {}
    for name, (builder, with_ui) in BUILDERS.items():
        wf = builder(schemas)
        assert wf.name == name, (wf.name, name)
        files[f"api/{name}.json"] = wf.api()
        if with_ui:
            files[f"{name}.json"] = wf.ui()
    return files


def dumps(data: dict) -> str:
    """The on-disk text: 2-space indented like the ComfyUI frontend's own saves, UTF-8, final newline."""
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report files that differ; exit 1 if any")
    args = parser.parse_args(argv)
    stale = []
    for rel, data in build_all().items():
        path = WORKFLOWS / rel
        text = dumps(data)
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(rel)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    verb = "out of date" if args.check else "written"
    print(f"{len(stale)} workflow file(s) {verb}" + (": " + ", ".join(stale) if stale else ""))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
