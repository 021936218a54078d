"""The example workflows in ``workflows/`` (UI format) and ``workflows/api/`` (API format), checked node by node.

Core node schemas come from a real ComfyUI 0.8.0 ``/object_info`` (vendored in ``tests/data/comfyui-0.8.0``, read through
the ``comfyui_reference`` fixture); the pack's own from its classes, imported with ComfyUI's runtime stubbed. The rules of the frontend this file encodes:

* widgets are the INT/FLOAT/STRING/BOOLEAN/COMBO inputs without ``forceInput``, stored in ``widgets_values`` in
  ``input_order`` (required, then optional);
* an INT widget is followed by its ``control_after_generate`` value when its spec sets that option, or, when the
  option is absent, when it is named ``seed`` / ``noise_seed`` (KSampler's ``seed`` sets it to true);
* ``Note`` / ``MarkdownNote`` exist only in the frontend: they are in UI files and never in API files;
* the frontend's own extensions add widgets to some core nodes (PreviewAny: two text previews saved as null and a
  ``previewMode`` toggle), saved after the schema's widgets (``workflow_builder.FRONTEND_WIDGETS``);
* a node grows once it has run (an image preview, a report box) and never shrinks by itself: the layout leaves room
  for the grown size (``workflow_builder.grown_height``).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

import comfy_stubs
import workflow_builder

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
UI_FILES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
API_FILES = sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json"))
REQUIRED = {"crucible_dataset_preview", "crucible_sd15_lora_sweep", "crucible_sdxl_lora_grid",
            "crucible_full_finetune_sweep", "crucible_api_sweep", "crucible_ci_dataset_plan",
            "crucible_ci_train_tiny", "crucible_ci_strip"}
# File lists that are not empty on a server without files: Load VAE always offers the built-in "pixel_space".
CORE_FILE_COMBOS = {("VAELoader", "vae_name")}
VIRTUAL = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL = "control_after_generate"
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


# --- schemas -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pack_schemas(tmp_path_factory) -> tuple[dict, set[tuple[str, str]]]:
    """The pack's /object_info with empty model folders, and its file-list COMBOs: those whose choices change when
    the model folders gain files (found by adding a probe file to each)."""
    stub, restore = comfy_stubs.install(tmp_path_factory.mktemp("comfyui"))
    try:
        pack = comfy_stubs.load_pack()
        empty = comfy_stubs.pack_object_info(pack)
        for kind in ("checkpoints", "loras", "diffusion_models", "text_encoders", "vae"):
            probe = stub.model_dir(kind) / "probe" / "probe.safetensors"
            probe.parent.mkdir(parents=True)
            probe.write_bytes(b"")
        filled = comfy_stubs.pack_object_info(pack)
    finally:
        restore()
    dynamic = {(node, name) for node, info in empty.items() for section, specs in info["input"].items()
               for name, spec in specs.items() if spec != filled[node]["input"][section][name]}
    return empty, dynamic


@pytest.fixture(scope="module")
def core_schemas(comfyui_reference) -> dict:
    return comfyui_reference.object_info()


@pytest.fixture(scope="module")
def schemas(core_schemas, pack_schemas, comfyui_reference) -> dict:
    clash = comfyui_reference.core_node_names() & set(pack_schemas[0])
    assert not clash, f"pack node ids shadow core nodes: {sorted(clash)}"
    return {**core_schemas, **pack_schemas[0]}



@pytest.fixture(scope="module")
def file_combos(core_schemas, pack_schemas) -> set[tuple[str, str]]:
    """(node type, input) of COMBOs listing files: empty in object_info (the server had no files) or dynamic."""
    core = {(node, name) for node, info in core_schemas.items() for specs in info["input"].values()
            for name, spec in specs.items()
            if isinstance(spec, list) and ((isinstance(spec[0], list) and not spec[0]) or
                                           (spec[0] == "COMBO" and not _options(spec).get("options")))}
    return core | pack_schemas[1] | CORE_FILE_COMBOS


def _options(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def socket_type(spec) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def is_widget(spec) -> bool:
    return socket_type(spec) in WIDGET_TYPES and not _options(spec).get("forceInput")


def inputs_in_order(info: dict) -> list[tuple[str, list, bool]]:
    """(name, spec, required) of every required then optional input, in ``input_order``."""
    return [(name, info["input"][section][name], section == "required") for section in ("required", "optional")
            for name in info["input_order"].get(section, [])]


def widget_names(info: dict) -> list[str]:
    """The names behind ``widgets_values``, with ``control_after_generate`` after a seed-like INT widget."""
    names = []
    for name, spec, _ in inputs_in_order(info):
        if not is_widget(spec):
            continue
        names.append(name)
        options = _options(spec)
        control = options[CONTROL] if CONTROL in options else name in ("seed", "noise_seed")
        if socket_type(spec) == "INT" and control:
            names.append(CONTROL)
    return names


def frontend_widgets(node_type: str) -> tuple:
    return workflow_builder.FRONTEND_WIDGETS.get(node_type, ())


def compatible(output_type: str, input_type: str) -> bool:
    return output_type == input_type or "*" in (output_type, input_type)


def value_problems(where: str, node_type: str, name: str, spec, value, file_combos) -> list[str]:
    kind, options = socket_type(spec), _options(spec)
    if kind == "COMBO":
        if (node_type, name) in file_combos:
            return [] if isinstance(value, str) and value else [f"{where}: file name {value!r} must be a non-empty string"]
        choices = spec[0] if isinstance(spec[0], list) else options.get("options", [])
        return [] if value in choices else [f"{where}: {value!r} is not one of {choices[:8]}"]
    if kind in ("INT", "FLOAT"):
        number_ok = isinstance(value, int) if kind == "INT" else isinstance(value, (int, float))
        if isinstance(value, bool) or not number_ok or (isinstance(value, float) and not math.isfinite(value)):
            return [f"{where}: {value!r} is not a {kind}"]
        lo, hi = options.get("min", -math.inf), options.get("max", math.inf)
        return [] if lo <= value <= hi else [f"{where}: {value} outside [{lo}, {hi}]"]
    expected = {"STRING": str, "BOOLEAN": bool}[kind]
    return [] if isinstance(value, expected) else [f"{where}: {value!r} is not a {kind}"]


# --- files ---------------------------------------------------------------------------------------------------------
def load(rel: str) -> dict:
    return json.loads((WORKFLOWS / rel).read_text(encoding="utf-8"))


def test_the_expected_workflows_exist_with_api_twins():
    assert REQUIRED <= set(API_FILES), sorted(REQUIRED - set(API_FILES))
    assert set(UI_FILES) <= set(API_FILES), f"UI files without an API twin: {sorted(set(UI_FILES) - set(API_FILES))}"
    api_only = set(API_FILES) - set(UI_FILES)
    assert all(name.startswith("crucible_ci_") for name in api_only), \
        f"only CI workflows may be API-only (users load the UI files): {sorted(api_only)}"


def test_vendored_schemas_cover_every_core_node_the_workflows_use(comfyui_reference):
    used = {n["type"] for name in UI_FILES for n in load(f"{name}.json")["nodes"]}
    used |= {n["class_type"] for name in API_FILES for n in load(f"api/{name}.json").values()}
    core = used & comfyui_reference.core_node_names()
    missing = sorted(core - set(comfyui_reference.object_info()))
    assert not missing, f"run tests/data/regenerate_comfyui_reference.py: no vendored schema for {missing}"
    assert {"KSampler", "PreviewAny", "CheckpointLoaderSimple"} <= core


def test_files_are_what_the_builder_writes(schemas):
    built = workflow_builder.build_all(schemas)
    on_disk = {p.relative_to(WORKFLOWS).as_posix() for p in WORKFLOWS.rglob("*.json")}
    assert on_disk == set(built), f"run tests/workflow_builder.py; extra {sorted(on_disk - set(built))}, " \
                                  f"missing {sorted(set(built) - on_disk)}"
    stale = [rel for rel, data in built.items()
             if (WORKFLOWS / rel).read_text(encoding="utf-8") != workflow_builder.dumps(data)]
    assert not stale, f"out of date (run .venv/bin/python tests/workflow_builder.py): {stale}"


# --- UI format -----------------------------------------------------------------------------------------------------
def ui_node_problems(node: dict, schemas: dict, file_combos) -> list[str]:
    where = f"node {node.get('id')} ({node.get('type')})"
    if node["type"] in VIRTUAL:
        text = node.get("widgets_values", [""])[0]
        ok = isinstance(text, str) and text.strip() and not node.get("inputs") and not node.get("outputs")
        return [] if ok else [f"{where}: a note needs text and no sockets"]
    if node["type"] not in schemas:
        return [f"{where}: unknown node type"]
    info = schemas[node["type"]]
    problems = []
    names, values = widget_names(info), node.get("widgets_values", [])
    extra = frontend_widgets(node["type"])
    if len(values) != len(names) + len(extra):
        added = f" + the frontend's {[w.name for w in extra]}" if extra else ""
        problems.append(f"{where}: {len(values)} widgets_values for the {len(names) + len(extra)} widgets "
                        f"{names}{added}")
    for widget, value in zip(extra, values[len(names):]):
        if value is not widget.saved and not (widget.saved is not None and type(value) is type(widget.saved)):
            problems.append(f"{where}: the frontend saves its '{widget.name}' widget as {widget.saved!r}, not {value!r}")
    specs = {name: spec for name, spec, _ in inputs_in_order(info)}
    for name, value in zip(names, values):
        if name == CONTROL:
            if value not in CONTROL_VALUES:
                problems.append(f"{where}: control_after_generate {value!r} is not one of {sorted(CONTROL_VALUES)}")
        else:
            problems += value_problems(f"{where}.{name}", node["type"], name, specs[name], value, file_combos)
    slots = {slot["name"]: slot for slot in node.get("inputs", [])}
    for slot in node.get("inputs", []):
        spec = specs.get(slot["name"])
        if spec is None:
            problems.append(f"{where}: input slot '{slot['name']}' is not an input of {node['type']}")
            continue
        if slot.get("type") != socket_type(spec):
            problems.append(f"{where}.{slot['name']}: slot type {slot.get('type')} != {socket_type(spec)}")
        if is_widget(spec) and slot.get("widget", {}).get("name") != slot["name"]:
            problems.append(f"{where}.{slot['name']}: a widget input slot needs widget: {{name: '{slot['name']}'}}")
    for name, spec, required in inputs_in_order(info):
        if is_widget(spec):
            continue
        if name not in slots:
            problems.append(f"{where}: socket '{name}' is missing from inputs")
        elif required and slots[name].get("link") is None:
            problems.append(f"{where}: required input '{name}' is not connected")
    outputs = node.get("outputs", [])
    want = list(zip(info["output_name"], info["output"]))
    if [(o.get("name"), o.get("type")) for o in outputs] != want:
        problems.append(f"{where}: outputs {[(o.get('name'), o.get('type')) for o in outputs]} != {want}")
    return problems


def ui_link_problems(wf: dict) -> list[str]:
    nodes = {n["id"]: n for n in wf["nodes"]}
    problems, seen = [], set()
    for link in wf["links"]:
        if len(link) != 6:
            problems.append(f"link {link}: expected [id, from, from_slot, to, to_slot, type]")
            continue
        lid, src, src_slot, dst, dst_slot, type_ = link
        if lid in seen:
            problems.append(f"link id {lid} is used twice")
        seen.add(lid)
        if src not in nodes or dst not in nodes:
            problems.append(f"link {lid}: node {src if src not in nodes else dst} does not exist")
            continue
        outs, ins = nodes[src].get("outputs", []), nodes[dst].get("inputs", [])
        if not (0 <= src_slot < len(outs) and 0 <= dst_slot < len(ins)):
            problems.append(f"link {lid}: slot {src_slot} -> {dst_slot} does not exist")
            continue
        out, into = outs[src_slot], ins[dst_slot]
        if out["type"] != type_:
            problems.append(f"link {lid}: type {type_} but node {src} output {src_slot} is {out['type']}")
        if not compatible(out["type"], into["type"]):
            problems.append(f"link {lid}: {out['type']} output into {into['type']} input '{into['name']}' of node {dst}")
        if into.get("link") != lid:
            problems.append(f"link {lid}: node {dst} input '{into['name']}' says link {into.get('link')}")
        if lid not in (out.get("links") or []):
            problems.append(f"link {lid}: missing from node {src} output {src_slot} links")
    for node in wf["nodes"]:
        for slot in node.get("inputs", []):
            if slot.get("link") is not None and slot["link"] not in seen:
                problems.append(f"node {node['id']} input '{slot['name']}' refers to unknown link {slot['link']}")
        for out in node.get("outputs", []):
            problems += [f"node {node['id']} output '{out['name']}' refers to unknown link {lid}"
                         for lid in out.get("links") or [] if lid not in seen]
    return problems


@pytest.mark.parametrize("name", UI_FILES)
def test_ui_workflow_matches_the_node_schemas(name, schemas, file_combos):
    wf = load(f"{name}.json")
    assert wf.get("version") == 0.4 and isinstance(wf.get("config"), dict) and isinstance(wf.get("extra"), dict)
    ids = [n["id"] for n in wf["nodes"]]
    assert len(ids) == len(set(ids)), "node ids must be unique"
    assert wf["last_node_id"] >= max(ids) and wf["last_link_id"] >= max((l[0] for l in wf["links"]), default=0)
    problems = [p for node in wf["nodes"] for p in ui_node_problems(node, schemas, file_combos)]
    problems += ui_link_problems(wf)
    deprecated = sorted({n["type"] for n in wf["nodes"] if schemas.get(n["type"], {}).get("deprecated")})
    if deprecated:
        problems.append(f"user workflows should not use deprecated nodes: {deprecated}")
    assert not problems, "\n".join(problems)


def _box(node: dict) -> tuple[float, float, float, float]:
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - 30, x + w, y + h  # the title bar sits above pos


def _inside(box, bounding) -> bool:
    gx, gy, gw, gh = bounding
    return gx <= box[0] and gy <= box[1] and box[2] <= gx + gw and box[3] <= gy + gh


@pytest.mark.parametrize("name", UI_FILES)
def test_ui_workflow_is_grouped_with_a_note_per_stage(name):
    wf = load(f"{name}.json")
    groups, nodes = wf.get("groups", []), wf["nodes"]
    assert groups, "no groups"
    notes = [n for n in nodes if n["type"] in VIRTUAL]
    for group in groups:
        assert str(group.get("title", "")).strip() and len(group["bounding"]) == 4 and min(group["bounding"][2:]) > 0
        assert any(_inside(_box(n), group["bounding"]) for n in notes), f"group '{group['title']}' has no note"
    loose = [f"{n['id']} ({n['type']})" for n in nodes if not any(_inside(_box(n), g["bounding"]) for g in groups)]
    assert not loose, f"nodes outside every group: {loose}"
    boxes = [(n["id"], _box(n)) for n in nodes]
    overlaps = [(a, b) for i, (a, p) in enumerate(boxes) for b, q in boxes[i + 1:]
                if p[0] < q[2] and q[0] < p[2] and p[1] < q[3] and q[1] < p[3]]
    assert not overlaps, f"overlapping nodes: {overlaps}"


def grown_boxes(wf: dict, schemas: dict) -> dict[int, tuple[float, float, float, float]]:
    """Each node's box once every node has run: the frontend grows a node to fit an image preview or a report box."""
    boxes = {}
    for node in wf["nodes"]:
        x, top, right, bottom = _box(node)
        if node["type"] not in VIRTUAL:
            bottom = max(bottom, node["pos"][1] + workflow_builder.grown_height(node["type"], schemas[node["type"]]))
        boxes[node["id"]] = (x, top, right, bottom)
    return boxes


def grown_overlaps(wf: dict, schemas: dict) -> list[str]:
    boxes = sorted(grown_boxes(wf, schemas).items())
    return [f"nodes {a} and {b} overlap by {min(p[2], q[2]) - max(p[0], q[0]):.0f} x "
            f"{min(p[3], q[3]) - max(p[1], q[1]):.0f} px" for i, (a, p) in enumerate(boxes) for b, q in boxes[i + 1:]
            if p[0] < q[2] and q[0] < p[2] and p[1] < q[3] and q[1] < p[3]]


@pytest.mark.parametrize("name", UI_FILES)
def test_nodes_have_room_to_grow_after_a_run(name, schemas):
    """A run adds the Train node's live loss curve and report, a preview's image, a sampler's latent previews: the
    grown nodes overlap nothing and stay inside their groups."""
    wf = load(f"{name}.json")
    assert not grown_overlaps(wf, schemas)
    boxes = grown_boxes(wf, schemas)
    for group in wf["groups"]:
        members = [n["id"] for n in wf["nodes"] if _inside(_box(n), group["bounding"])]
        outside = [i for i in members if not _inside(boxes[i], group["bounding"])]
        assert not outside, f"group '{group['title']}': nodes {outside} grow out of it"


def test_room_to_grow_catches_the_train_node_covering_its_loss_curve(schemas):
    """The layout of d78f120: Crucible Train (saved 580 px high) with the loss-curve preview 70 px below it."""
    wf = load("crucible_sd15_lora_sweep.json")
    train, curve = _ui_node(wf, "CrucibleTrain"), _ui_node(wf, "PreviewImage")
    train["size"][1] = 580
    curve["pos"][1] = train["pos"][1] + 580 + 70
    static = [(a["id"], b["id"]) for a in wf["nodes"] for b in wf["nodes"] if a["id"] < b["id"]
              and _box(a)[1] < _box(b)[3] and _box(b)[1] < _box(a)[3] and _box(a)[0] < _box(b)[2] and _box(b)[0] < _box(a)[2]]
    assert not static  # the saved sizes alone look fine...
    problems = grown_overlaps(wf, schemas)  # ...until the node has run
    assert any(f"nodes {train['id']} and {curve['id']} overlap by 320 x" in p for p in problems), problems


def test_growing_nodes_match_the_packs_frontend_extension():
    """nodes/web/crucible.js adds the report box to its TEXT_NODES: exactly the pack nodes said to grow with text."""
    js = (ROOT / "nodes" / "web" / "crucible.js").read_text(encoding="utf-8")
    text_nodes = set(re.findall(r'"(Crucible\w+)"', re.search(r"TEXT_NODES = new Set\(\[(.*?)\]\)", js, re.S).group(1)))
    grows = {t for t, what in workflow_builder.GROWS_AFTER_RUN.items() if "text" in what}
    assert text_nodes == grows


def test_preview_any_is_saved_with_the_frontends_widgets(schemas, file_combos):
    wf = load("crucible_dataset_preview.json")
    previews = [n for n in wf["nodes"] if n["type"] == "PreviewAny"]
    assert previews and all(n["widgets_values"] == [None, None, False] for n in previews)
    previews[0]["widgets_values"] = []  # what the files held before: the frontend rewrites them on every save
    problems = ui_node_problems(previews[0], schemas, file_combos)
    assert any("0 widgets_values for the 3 widgets" in p and "previewMode" in p for p in problems), problems
    previews[0]["widgets_values"] = ["text", None, False]
    assert any("saves its 'preview' widget as None" in p for p in ui_node_problems(previews[0], schemas, file_combos))


# --- API format ----------------------------------------------------------------------------------------------------
def api_problems(prompt: dict, schemas: dict, file_combos) -> list[str]:
    problems = []
    for node_id, node in prompt.items():
        where = f"node {node_id} ({node.get('class_type')})"
        if node.get("class_type") not in schemas:
            problems.append(f"{where}: unknown class_type (notes and other frontend-only nodes do not belong here)")
            continue
        info = schemas[node["class_type"]]
        specs = {name: (spec, required) for name, spec, required in inputs_in_order(info)}
        if not isinstance(node.get("_meta", {}).get("title"), str):
            problems.append(f"{where}: no _meta.title")
        problems += [f"{where}: required input '{n}' is missing" for n, (_, req) in specs.items()
                     if req and n not in node["inputs"]]
        for name, value in node["inputs"].items():
            if name not in specs:
                problems.append(f"{where}: '{name}' is not an input of {node['class_type']}")
                continue
            spec = specs[name][0]
            if isinstance(value, list):
                if len(value) != 2 or not isinstance(value[0], str) or not isinstance(value[1], int):
                    problems.append(f"{where}.{name}: a link is [\"node id\", output index], got {value}")
                elif value[0] not in prompt:
                    problems.append(f"{where}.{name}: links to missing node {value[0]}")
                else:
                    outputs = schemas.get(prompt[value[0]]["class_type"], {}).get("output", [])
                    if not 0 <= value[1] < len(outputs):
                        problems.append(f"{where}.{name}: node {value[0]} has no output {value[1]}")
                    elif not compatible(outputs[value[1]], socket_type(spec)):
                        problems.append(f"{where}.{name}: {outputs[value[1]]} output into a {socket_type(spec)} input")
            elif not is_widget(spec):
                problems.append(f"{where}.{name}: a {socket_type(spec)} socket needs a link, got {value!r}")
            else:
                problems += value_problems(f"{where}.{name}", node["class_type"], name, spec, value, file_combos)
    return problems


@pytest.mark.parametrize("name", API_FILES)
def test_api_workflow_matches_the_node_schemas(name, schemas, file_combos):
    prompt = load(f"api/{name}.json")
    assert isinstance(prompt, dict) and prompt and all(k.isdigit() for k in prompt)
    problems = api_problems(prompt, schemas, file_combos)
    assert not problems, "\n".join(problems)


def twin_problems(ui: dict, api: dict, schemas: dict) -> list[str]:
    """How an API file differs from what the frontend's "Export (API)" makes of the UI file."""
    active = {str(n["id"]): n for n in ui["nodes"] if n["type"] not in VIRTUAL and n.get("mode", 0) == 0}
    if set(active) != set(api):
        return [f"node ids differ: UI {sorted(active)} API {sorted(api)}"]
    links = {l[0]: l for l in ui["links"]}
    problems = []
    for node_id, node in active.items():
        entry, info = api[node_id], schemas[node["type"]]
        if entry["class_type"] != node["type"]:
            problems.append(f"node {node_id}: {node['type']} in UI, {entry['class_type']} in API")
        title = node.get("title") or info["display_name"]
        if entry["_meta"]["title"] != title:
            problems.append(f"node {node_id}: title {title!r} in UI, {entry['_meta']['title']!r} in API")
        linked = {}
        for slot in node["inputs"]:
            if slot.get("link") is not None:
                link = links[slot["link"]]
                linked[slot["name"]] = [str(link[1]), link[2]]
        widgets = {n: v for n, v in zip(widget_names(info), node["widgets_values"]) if n != CONTROL}  # not FRONTEND_WIDGETS
        expected = {**{n: v for n, v in widgets.items() if n not in linked}, **linked}
        if entry["inputs"] != expected:
            problems.append(f"node {node_id} ({node['type']}): API inputs {entry['inputs']} != UI {expected}")
    return problems


@pytest.mark.parametrize("name", UI_FILES)
def test_ui_and_api_twins_are_the_same_graph(name, schemas):
    problems = twin_problems(load(f"{name}.json"), load(f"api/{name}.json"), schemas)
    assert not problems, "\n".join(problems)


def test_twin_check_catches_drift(schemas):
    ui, api = load("crucible_sd15_lora_sweep.json"), load("api/crucible_sd15_lora_sweep.json")
    _api_node(api, "KSampler")["inputs"]["steps"] = 21
    assert any("KSampler" in p for p in twin_problems(ui, api, schemas))
    api = load("api/crucible_sd15_lora_sweep.json")
    _api_node(api, "VAEDecode")["inputs"]["samples"][1] = 1
    assert any("VAEDecode" in p for p in twin_problems(ui, api, schemas))


# --- what particular workflows promise -----------------------------------------------------------------------------
def test_api_sweep_is_what_comfy_client_sweep_needs():
    from trainer.client import find_loader, positive_text_nodes, prepare_workflow, seed_nodes

    prompt = load("api/crucible_api_sweep.json")
    loader = find_loader(prompt)
    assert (prompt[loader.node_id]["class_type"], loader.input_name) == ("LoraLoader", "lora_name")
    assert loader.found_by == "title 'Crucible checkpoint'"
    assert len(positive_text_nodes(prompt)) == 1 and len(seed_nodes(prompt)) == 1
    patched = prepare_workflow(prompt, prompt_text="a test", seed=7)
    assert [patched[n]["inputs"]["text"] for n in positive_text_nodes(prompt)] == ["a test"]


def _nodes_of(prompt: dict, class_type: str) -> list[dict]:
    return [n for n in prompt.values() if n["class_type"] == class_type]


def test_ci_workflows_need_only_what_the_ci_stage_provides(file_combos):
    """The CI stage copies the demo data to input/crucible_demo and the tiny checkpoint to models/checkpoints."""
    for name in (n for n in API_FILES if n.startswith("crucible_ci_")):
        prompt = load(f"api/{name}.json")
        files = [v for n in prompt.values() for k, v in n["inputs"].items()
                 if (n["class_type"], k) in file_combos and v not in ("(none)", "(from run input)")]
        assert set(files) <= {workflow_builder.TINY_CKPT, workflow_builder.COMFY_CKPT}, (name, files)
        assert {n["inputs"]["path"] for n in _nodes_of(prompt, "CrucibleDataset")} <= {"crucible_demo"}, name
    tiny = load("api/crucible_ci_train_tiny.json")
    (train,) = _nodes_of(tiny, "CrucibleTrain")
    assert train["inputs"]["epochs"] <= 2 and _nodes_of(tiny, "CrucibleDataset")[0]["inputs"]["resolution"] == 64
    assert _nodes_of(tiny, "CrucibleModel")[0]["inputs"]["ckpt_name"] == workflow_builder.TINY_CKPT
    strip = load("api/crucible_ci_strip.json")
    colours = {n["inputs"]["color"] for n in _nodes_of(strip, "EmptyImage")}
    assert len(colours) == 3 and len(_nodes_of(strip, "CrucibleImageGrid")) == 1


def test_sweep_workflows_render_the_sweep_lists_with_stock_nodes():
    for name in ("crucible_sd15_lora_sweep", "crucible_sdxl_lora_grid", "crucible_full_finetune_sweep"):
        prompt = load(f"api/{name}.json")
        (sweep_id,) = [k for k, n in prompt.items() if n["class_type"] == "CrucibleCheckpointSweep"]
        (sampler,) = _nodes_of(prompt, "KSampler")
        (grid,) = _nodes_of(prompt, "CrucibleImageGrid")
        encoders = _nodes_of(prompt, "CLIPTextEncode")
        assert sampler["inputs"]["model"] == [sweep_id, 0] and sampler["inputs"]["seed"] == [sweep_id, 3], name
        assert [sweep_id, 2] in [e["inputs"]["text"] for e in encoders], name
        assert all(e["inputs"]["clip"] == [sweep_id, 1] for e in encoders), name
        assert [grid["inputs"][k] for k in ("labels", "columns", "rows", "row_labels")] == \
            [[sweep_id, 4], [sweep_id, 5], [sweep_id, 6], [sweep_id, 7]], name
        (loader_id,) = [k for k, n in prompt.items() if n["class_type"] == "CheckpointLoaderSimple"]
        assert prompt[sweep_id]["inputs"]["model"] == [loader_id, 0], name
        assert prompt[sweep_id]["inputs"]["run"][0] in prompt, name
    sdxl = load("api/crucible_sdxl_lora_grid.json")
    assert _nodes_of(sdxl, "CrucibleCheckpointSweep")[0]["inputs"]["strengths"] == "0.6, 0.8, 1.0"
    assert _nodes_of(sdxl, "CrucibleModel")[0]["inputs"]["family"] == "sdxl"
    full = load("api/crucible_full_finetune_sweep.json")
    assert _nodes_of(full, "CrucibleNetworkOptions")[0]["inputs"]["network_type"] == "full"


# --- the checks above must catch the usual ways a workflow file breaks ---------------------------------------------
def test_file_list_combos_are_recognised(file_combos):
    assert {("CrucibleModel", "ckpt_name"), ("CrucibleCheckpointSweep", "folder"),
            ("CheckpointLoaderSimple", "ckpt_name"), ("LoraLoader", "lora_name")} <= file_combos
    assert ("KSampler", "sampler_name") not in file_combos and ("CrucibleDataset", "crop_style") not in file_combos


def _ui_node(wf: dict, type_: str) -> dict:
    return next(n for n in wf["nodes"] if n["type"] == type_)


UI_BREAKAGES = {
    "seed control dropped": (lambda wf: _ui_node(wf, "KSampler")["widgets_values"].pop(1), "widgets_values"),
    "widgets swapped": (lambda wf: _ui_node(wf, "EmptyLatentImage")["widgets_values"].reverse(), None),
    "not a choice": (lambda wf: _ui_node(wf, "KSampler")["widgets_values"].__setitem__(4, "euler_x"), "not one of"),
    "out of range": (lambda wf: _ui_node(wf, "CrucibleTrain")["widgets_values"].__setitem__(1, 0), "outside"),
    "bad control": (lambda wf: _ui_node(wf, "KSampler")["widgets_values"].__setitem__(1, "sometimes"), "control"),
    "link type": (lambda wf: wf["links"][0].__setitem__(5, "LATENT"), "type"),
    "dangling link": (lambda wf: wf["links"].pop(), "unknown link"),
    "unconnected socket": (lambda wf: _ui_node(wf, "VAEDecode")["inputs"][1].__setitem__("link", None), None),
}


@pytest.mark.parametrize("breakage", sorted(UI_BREAKAGES))
def test_ui_checks_catch(breakage, schemas, file_combos):
    wf = load("crucible_sd15_lora_sweep.json")
    assert not [p for n in wf["nodes"] for p in ui_node_problems(n, schemas, file_combos)] + ui_link_problems(wf)
    mutate, expected = UI_BREAKAGES[breakage]
    mutate(wf)
    problems = [p for n in wf["nodes"] for p in ui_node_problems(n, schemas, file_combos)] + ui_link_problems(wf)
    assert problems and (expected is None or any(expected in p for p in problems)), problems


def _api_node(prompt: dict, class_type: str) -> dict:
    return next(n for n in prompt.values() if n["class_type"] == class_type)


API_BREAKAGES = {
    "missing required": (lambda p: _api_node(p, "KSampler")["inputs"].pop("steps"), "missing"),
    "unknown input": (lambda p: _api_node(p, "KSampler")["inputs"].__setitem__("sed", 1), "not an input"),
    "literal socket": (lambda p: _api_node(p, "VAEDecode")["inputs"].__setitem__("vae", "vae.pt"), "needs a link"),
    "wrong output type": (lambda p: _api_node(p, "VAEDecode")["inputs"].__setitem__(
        "samples", _api_node(p, "VAEDecode")["inputs"]["vae"]), "VAE output into a LATENT"),
    "missing node": (lambda p: p.pop(next(k for k, n in p.items() if n["class_type"] == "EmptyLatentImage")), "missing node"),
    "note in api": (lambda p: p.__setitem__("99", {"class_type": "Note", "inputs": {}}), "unknown class_type"),
}


@pytest.mark.parametrize("breakage", sorted(API_BREAKAGES))
def test_api_checks_catch(breakage, schemas, file_combos):
    prompt = load("api/crucible_api_sweep.json")
    mutate, expected = API_BREAKAGES[breakage]
    mutate(prompt)
    problems = api_problems(prompt, schemas, file_combos)
    assert any(expected in p for p in problems), problems


# --- the CI workflows, executed through the pack with ComfyUI stubbed ------------------------------------------------
class EmptyImage:
    """ComfyUI's EmptyImage: a batch of one solid 0xRRGGBB colour."""

    FUNCTION = "generate"

    def generate(self, width, height, batch_size=1, color=0):
        import torch

        rgb = torch.tensor([(color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF], dtype=torch.float32) / 255
        return (rgb.expand(batch_size, height, width, 3).clone(),)


class ImageBatch:
    """ComfyUI's ImageBatch for two images of one size."""

    FUNCTION = "batch"

    def batch(self, image1, image2):
        import torch

        return (torch.cat((image1, image2)),)


def execute(prompt: dict, classes: dict) -> dict[str, tuple]:
    """Run an API prompt the way ComfyUI's executor does for these graphs: in dependency order, calling IS_CHANGED,
    wrapping every input in a list for INPUT_IS_LIST nodes, and keeping list outputs as lists."""
    results: dict[str, tuple] = {}
    is_list: dict[tuple[str, int], bool] = {}
    pending = dict(prompt)
    while pending:
        ready = next(k for k, n in pending.items()
                     if all(v[0] in results for v in n["inputs"].values() if isinstance(v, list)))
        node = pending.pop(ready)
        cls = classes[node["class_type"]]
        kwargs, listed = {}, {}
        for name, value in node["inputs"].items():
            linked = isinstance(value, list)
            kwargs[name] = results[value[0]][value[1]] if linked else value
            listed[name] = linked and is_list[(value[0], value[1])]
        if getattr(cls, "INPUT_IS_LIST", False):
            kwargs = {k: v if listed[k] else [v] for k, v in kwargs.items()}
        if hasattr(cls, "IS_CHANGED"):
            cls.IS_CHANGED(**kwargs)
        out = getattr(cls(), cls.FUNCTION)(**kwargs)
        results[ready] = tuple(out["result"] if isinstance(out, dict) else out)
        for slot, flag in enumerate(getattr(cls, "OUTPUT_IS_LIST", [False] * len(results[ready]))):
            is_list[(ready, slot)] = flag
    return results


def _too_big_tokenizer(folder: Path) -> None:
    """A CLIP tokenizer with more tokens than the tiny model knows, standing in for ComfyUI's real one."""
    from trainer.tiny import build_tiny_tokenizer

    build_tiny_tokenizer(folder)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    vocab.update({f"zz{i}</w>": len(vocab) + i for i in range(500)})
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")


@pytest.fixture(scope="module")
def ci_comfy(tmp_path_factory, demo_dataset, tiny_sd15):
    """A stub ComfyUI laid out as .ci/comfyui_stage.sh lays out the real one."""
    import shutil

    from trainer.tiny import single_file_path

    stub, restore = comfy_stubs.install(tmp_path_factory.mktemp("ci-comfyui"))
    shutil.copytree(demo_dataset, stub.input_dir / "crucible_demo")
    ckpts = stub.model_dir("checkpoints")
    shutil.copy(single_file_path(tiny_sd15), ckpts / workflow_builder.TINY_CKPT)
    shutil.copytree(tiny_sd15.parent / f"{tiny_sd15.name}_tokenizer", ckpts / "crucible_tiny_sd15_tokenizer")
    _too_big_tokenizer(stub.tokenizer_dir)
    classes = {**comfy_stubs.load_pack().NODE_CLASS_MAPPINGS, "EmptyImage": EmptyImage, "ImageBatch": ImageBatch}
    yield stub, classes
    restore()


def test_ci_dataset_plan_runs(ci_comfy):
    _, classes = ci_comfy
    prompt = load("api/crucible_ci_dataset_plan.json")
    results = execute(prompt, classes)
    (preview,) = results[next(k for k, n in prompt.items() if n["class_type"] == "CrucibleCaptionPreview")]
    (plan,) = results[next(k for k, n in prompt.items() if n["class_type"] == "CrucibleStepPlan")]
    assert len([ln for ln in preview.splitlines() if ln.startswith("#")]) == 8 and "= 56 steps" in plan  # 110 samples (1 of 12 held out for validation) / batch 4 x 2 epochs


def test_ci_strip_runs(ci_comfy):
    stub, classes = ci_comfy
    prompt = load("api/crucible_ci_strip.json")
    results = execute(prompt, classes)
    (image,) = results[next(k for k, n in prompt.items() if n["class_type"] == "CrucibleImageGrid")]
    assert image.shape[0] == 1 and image.shape[2] > 3 * 64
    assert list(stub.output_dir.glob("crucible/ci_strip_*.png"))


@pytest.mark.slow
def test_ci_train_tiny_runs(ci_comfy):
    stub, classes = ci_comfy
    prompt = load("api/crucible_ci_train_tiny.json")
    results = execute(prompt, classes)
    (run_info, _curve, names, steps) = results[next(k for k, n in prompt.items() if n["class_type"] == "CrucibleTrain")]
    assert steps == [3, 6] and len(names) == 2 and run_info["kind"] == "lora"
    assert all((stub.model_dir("loras") / name).is_file() for name in names)
    assert list(stub.output_dir.glob("crucible/ci_train_tiny_*.png"))


def test_split_file_workflows_train_and_render_sd3_and_flux():
    """SD3/Flux: Crucible Split Model trains on the files the user's loaders load; the sweep feeds the stock chain."""
    loaders = {"crucible_sd3_full_finetune_sweep": "TripleCLIPLoader", "crucible_flux_lora_sweep": "DualCLIPLoader"}
    for name, clip_loader in loaders.items():
        prompt = load(f"api/{name}.json")
        ids = {n["class_type"]: k for k, n in prompt.items()}
        split, unet = _nodes_of(prompt, "CrucibleSplitModel")[0]["inputs"], _nodes_of(prompt, "UNETLoader")[0]["inputs"]
        clips = _nodes_of(prompt, clip_loader)[0]["inputs"]
        assert split["unet_name"] == unet["unet_name"], name
        encoders = [k for k in clips if k.startswith("clip_name")]
        assert [split[k] for k in encoders] == [clips[k] for k in encoders], name
        assert split["vae_name"] == _nodes_of(prompt, "VAELoader")[0]["inputs"]["vae_name"], name
        sweep = _nodes_of(prompt, "CrucibleCheckpointSweep")[0]["inputs"]
        assert (sweep["model"], sweep["clip"], sweep["run"]) == \
            ([ids["UNETLoader"], 0], [ids[clip_loader], 0], [ids["CrucibleTrain"], 0]), name
        (sampler,) = _nodes_of(prompt, "KSampler")
        assert sampler["inputs"]["seed"] == [ids["CrucibleCheckpointSweep"], 3], name
        assert prompt[sampler["inputs"]["latent_image"][0]]["class_type"] == "EmptySD3LatentImage", name
        assert _nodes_of(prompt, "VAEDecode")[0]["inputs"]["vae"] == [ids["VAELoader"], 0], name
    sd3 = load("api/crucible_sd3_full_finetune_sweep.json")
    assert _nodes_of(sd3, "CrucibleSplitModel")[0]["inputs"]["family"] == "sd3"
    assert _nodes_of(sd3, "CrucibleNetworkOptions")[0]["inputs"]["network_type"] == "full"
    assert _nodes_of(sd3, "CrucibleCaptionOptions")[0]["inputs"]["caption_dropout_rate"] == 0.25
    (sampler,) = _nodes_of(sd3, "KSampler")
    assert sd3[sampler["inputs"]["model"][0]]["class_type"] == "ModelSamplingSD3"
    train, plan = _nodes_of(sd3, "CrucibleTrain")[0]["inputs"], _nodes_of(sd3, "CrucibleStepPlan")[0]["inputs"]
    assert train["sample_every_n_steps"] == plan["sample_every_n_steps"] > 0
    flux = load("api/crucible_flux_lora_sweep.json")
    assert _nodes_of(flux, "DualCLIPLoader")[0]["inputs"]["type"] == "flux"
    (sampler,) = _nodes_of(flux, "KSampler")
    assert sampler["inputs"]["cfg"] == 1.0
    assert flux[sampler["inputs"]["positive"][0]]["class_type"] == "FluxGuidance"
