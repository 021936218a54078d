"""Pictures of the example workflows: ``docs/images/workflow_<name>.png`` for every UI-format ``workflows/*.json``.

Each picture is drawn from the workflow file alone, the way ComfyUI's canvas shows it: groups as tinted boxes with
their titles, nodes at their ``pos``/``size`` with a title bar, input slots on the left and output slots on the right,
one row per widget (name and shortened value), notes with their text, and links as curves between the slots,
coloured by type. Widget names come from the node schemas the workflow builder uses (ComfyUI's ``object_info.json``
in ``../shared/comfyui`` and the pack's own nodes); without them the rows show the values alone.

The workflow JSON is stored in the PNG's ``workflow`` text chunk, as ComfyUI's Save Image does, so dropping a
picture onto ComfyUI opens that workflow. Regenerate after changing a workflow::

    python docs/gallery.py                      # every workflow
    python docs/gallery.py crucible_sd15_lora_sweep --width 1600
"""
from __future__ import annotations

import argparse
import colorsys
import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
IMAGES = ROOT / "docs" / "images"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from PIL import Image, ImageDraw  # noqa: E402

from trainer.fileio import atomic_write  # noqa: E402
from trainer.render import load_font, wrap_text  # noqa: E402

# Canvas geometry, in workflow units (the same numbers tests/workflow_builder.py lays nodes out with).
TITLE_HEIGHT, SLOT_HEIGHT, WIDGET_HEIGHT, MULTILINE_EXTRA, BODY_PAD = 30, 22, 26, 90, 8
MARGIN = 30
SUPERSAMPLE = 2  # drawn at twice the size, then scaled down: smooth curves and text
# Type sizes in workflow units, and the smallest size in output pixels that stays readable when scaled down.
FONT_SIZES = {"group": (26, 15), "title": (18, 11), "text": (15, 10)}

BACKGROUND = "#1e1e1e"
NODE_COLOR, NODE_BGCOLOR = "#2f2f2f", "#3a3a3a"  # title bar and body of a node without its own colours
WIDGET_BG, WIDGET_TEXT, WIDGET_NAME = "#252525", "#dddddd", "#9a9a9a"
TITLE_TEXT, SLOT_TEXT, NOTE_TEXT = "#e8e8e8", "#bdbdbd", "#e6dccb"
OUTLINE = "#151515"
# ComfyUI's dark palette for link and slot colours; other types get a stable colour from their name.
LINK_COLORS = {
    "CLIP": "#FFD500", "CLIP_VISION": "#A8DADC", "CLIP_VISION_OUTPUT": "#ad7452", "CONDITIONING": "#FFA931",
    "CONTROL_NET": "#6EE7B7", "IMAGE": "#64B5F6", "LATENT": "#FF9CF9", "MASK": "#81C784", "MODEL": "#B39DDB",
    "STYLE_MODEL": "#C2FFAE", "VAE": "#FF6E6E", "NOISE": "#B0B0B0", "GUIDER": "#66FFFF", "SAMPLER": "#ECB4B4",
    "SIGMAS": "#CDFFCD", "TAESD": "#DCC274",
    # not in ComfyUI's palette (it draws them in its default link colour); distinct colours read better here
    "STRING": "#7fd1a6", "INT": "#d8a47f", "FLOAT": "#9fc9e6", "BOOLEAN": "#c9a6e6",
}
MODE_TINT = {2: ("#000000", 0.45), 4: ("#7a2a8a", 0.35)}  # muted, bypassed
VIRTUAL = {"Note", "MarkdownNote"}
Point = tuple[float, float]


# --- colours -------------------------------------------------------------------------------------------------------
def rgb(color: str) -> tuple[int, int, int]:
    """``#rgb`` or ``#rrggbb`` as an RGB tuple (LiteGraph stores both forms)."""
    hexpart = color.lstrip("#")
    if len(hexpart) == 3:
        hexpart = "".join(c * 2 for c in hexpart)
    if len(hexpart) != 6:
        raise ValueError(f"not a colour: {color!r}")
    return tuple(int(hexpart[i:i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]


def mix(a: str | tuple, b: str | tuple, t: float) -> tuple[int, int, int]:
    """``a`` blended towards ``b`` by ``t`` (0 = a, 1 = b)."""
    ca, cb = (rgb(c) if isinstance(c, str) else c for c in (a, b))
    return tuple(round(x + (y - x) * t) for x, y in zip(ca, cb))  # type: ignore[return-value]


def type_color(type_: str) -> tuple[int, int, int]:
    """The link colour of a socket type: ComfyUI's palette, else a light hue derived from the type name."""
    if type_ in LINK_COLORS:
        return rgb(LINK_COLORS[type_])
    hue = int(hashlib.sha1(type_.encode()).hexdigest()[:6], 16) / 0xFFFFFF
    return tuple(round(c * 255) for c in colorsys.hls_to_rgb(hue, 0.68, 0.45))  # type: ignore[return-value]


# --- schemas -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WidgetSpec:
    name: str
    multiline: bool = False


def load_schemas() -> dict[str, dict]:
    """The node schemas the workflow builder uses, or ``{}`` (values without names) when they cannot be read."""
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    try:
        import workflow_builder

        return workflow_builder.load_schemas()
    except Exception as exc:  # noqa: BLE001 - the pictures still work without widget names
        print(f"gallery: no node schemas ({exc}); widgets show their values only", file=sys.stderr)
        return {}


def widget_specs(info: dict | None) -> list[WidgetSpec] | None:
    """The widgets behind ``widgets_values``, in order (with a seed's ``control_after_generate``); None = unknown."""
    if not info:
        return None
    import workflow_builder

    specs = []
    for name, spec in workflow_builder.ordered_inputs(info):
        if workflow_builder.is_widget(spec):
            specs.append(WidgetSpec(name, bool(workflow_builder.spec_options(spec).get("multiline"))))
            if workflow_builder.has_control(name, spec):
                specs.append(WidgetSpec("control_after_generate"))
    return specs


def display_title(node: dict, schemas: dict[str, dict]) -> str:
    """The title ComfyUI shows: the node's own, else its display name, else its type."""
    info = schemas.get(node["type"]) or {}
    return node.get("title") or info.get("display_name") or node["type"]


def short_value(value: Any) -> str:
    """A widget value as one short line: numbers without noise, booleans as ComfyUI writes them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    return " / ".join(line.strip() for line in str(value).splitlines() if line.strip())


def wrap_paragraphs(text: str, font, max_width: float, max_lines: int) -> list[str]:
    """``text`` wrapped line by line (its own line breaks kept), at most ``max_lines`` lines, overflow ellipsized."""
    lines: list[str] = []
    for paragraph in (line for line in text.splitlines() if line.strip()):
        lines += wrap_text(paragraph, font, max_width, max_lines + 1)
    if len(lines) <= max_lines:
        return lines
    last = lines[max_lines - 1]
    while last and font.width(last + font.ellipsis) > max_width:
        last = last[:-1]
    return lines[:max_lines - 1] + [last.rstrip() + font.ellipsis]


# --- geometry ------------------------------------------------------------------------------------------------------
def node_box(node: dict) -> tuple[float, float, float, float]:
    """The node's outline in workflow units, title bar included (it sits above ``pos``)."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_HEIGHT, x + w, y + h


def canvas_bounds(wf: dict) -> tuple[float, float, float, float]:
    boxes = [node_box(n) for n in wf["nodes"]]
    boxes += [(gx, gy, gx + gw, gy + gh) for gx, gy, gw, gh in (g["bounding"] for g in wf.get("groups", []))]
    if not boxes:
        raise ValueError("the workflow has no nodes")
    return (min(b[0] for b in boxes) - MARGIN, min(b[1] for b in boxes) - MARGIN,
            max(b[2] for b in boxes) + MARGIN, max(b[3] for b in boxes) + MARGIN)


def input_slot(node: dict, index: int) -> Point:
    x, y = node["pos"]
    return x + 10, y + BODY_PAD + SLOT_HEIGHT * (index + 0.5)


def output_slot(node: dict, index: int) -> Point:
    x, y = node["pos"]
    return x + node["size"][0] - 10, y + BODY_PAD + SLOT_HEIGHT * (index + 0.5)


def bezier(p0: Point, p3: Point, steps: int = 40) -> list[Point]:
    """LiteGraph's spline link: horizontal tangents at both slots, a quarter of the distance long."""
    d = max(math.dist(p0, p3) * 0.25, 20.0)
    p1, p2 = (p0[0] + d, p0[1]), (p3[0] - d, p3[1])
    points = []
    for i in range(steps + 1):
        t = i / steps
        a, b, c, e = (1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3
        points.append((a * p0[0] + b * p1[0] + c * p2[0] + e * p3[0], a * p0[1] + b * p1[1] + c * p2[1] + e * p3[1]))
    return points


def normalized_links(wf: dict) -> list[tuple[int, int, int, int, str]]:
    """``(from node, from slot, to node, to slot, type)`` from either link format (arrays or objects)."""
    out = []
    for link in wf.get("links", []):
        if isinstance(link, dict):
            out.append((link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"], link["type"]))
        else:
            out.append((link[1], link[2], link[3], link[4], link[5]))
    return out


# --- drawing -------------------------------------------------------------------------------------------------------
class Painter:
    """Draws in workflow units on a supersampled canvas; ``scale`` is output pixels per workflow unit."""

    def __init__(self, bounds: tuple[float, float, float, float], scale: float):
        self.x0, self.y0 = bounds[0], bounds[1]
        self.scale = scale
        self.k = scale * SUPERSAMPLE  # canvas pixels per workflow unit
        size = (round((bounds[2] - bounds[0]) * self.k), round((bounds[3] - bounds[1]) * self.k))
        self.image = Image.new("RGB", size, BACKGROUND)
        self.draw = ImageDraw.Draw(self.image)
        self.fonts = {role: load_font(self.font_px(role)) for role in FONT_SIZES}

    def font_px(self, role: str) -> int:
        """Canvas pixels of a type role: its workflow size scaled, but never below its readable minimum."""
        units, minimum = FONT_SIZES[role]
        return round(max(units * self.scale, minimum) * SUPERSAMPLE)

    def px(self, point: Point) -> Point:
        return (point[0] - self.x0) * self.k, (point[1] - self.y0) * self.k

    def rect(self, box: Sequence[float], fill, radius: float = 0, outline=None, width: float = 1) -> None:
        (a, b), (c, d) = self.px(box[:2]), self.px(box[2:])
        self.draw.rounded_rectangle((a, b, c, d), radius=radius * self.k, fill=fill, outline=outline,
                                    width=max(1, round(width * self.k)))

    def text(self, point: Point, text: str, role: str, fill, max_width: float, anchor: str = "lm") -> None:
        """One line at ``point`` (workflow units), ellipsized to ``max_width`` workflow units."""
        if max_width <= 0 or not text:
            return
        font = self.fonts[role]
        lines = wrap_text(text, font, max_width * self.k, 1)
        if lines:
            self.draw.text(self.px(point), lines[0], font=font.font, fill=fill, anchor=anchor)

    def text_width(self, text: str, role: str) -> float:
        """Width in workflow units."""
        return self.fonts[role].width(text) / self.k

    def line_height(self, role: str) -> float:
        return self.fonts[role].line_height / self.k

    def curve(self, points: Iterable[Point], fill, width: float) -> None:
        self.draw.line([self.px(p) for p in points], fill=fill, width=max(1, round(width * self.k)), joint="curve")

    def dot(self, center: Point, radius: float, fill, square: bool = False) -> None:
        cx, cy = self.px(center)
        r = radius * self.k
        box = (cx - r, cy - r, cx + r, cy + r)
        if square:  # list outputs: ComfyUI draws a grid-shaped slot
            self.draw.rectangle(box, fill=fill)
        else:
            self.draw.ellipse(box, fill=fill, outline=OUTLINE)

    def result(self, width: int) -> Image.Image:
        height = round(self.image.height * width / self.image.width)
        return self.image.resize((width, height), Image.Resampling.LANCZOS)


def draw_group(p: Painter, group: dict) -> None:
    gx, gy, gw, gh = group["bounding"]
    color = group.get("color") or "#3f789e"
    p.rect((gx, gy, gx + gw, gy + gh), fill=mix(BACKGROUND, color, 0.28), radius=6, outline=mix(BACKGROUND, color, 0.6))
    title_h = max(group.get("font_size", 24) * 1.4, p.line_height("group") + 8)
    p.text((gx + 10, gy + title_h / 2), str(group.get("title", "")), "group", mix(color, "#ffffff", 0.55), gw - 20)


def draw_link(p: Painter, nodes: dict[int, dict], link: tuple[int, int, int, int, str]) -> None:
    src, src_slot, dst, dst_slot, type_ = link
    if src not in nodes or dst not in nodes:
        return
    points = bezier(output_slot(nodes[src], src_slot), input_slot(nodes[dst], dst_slot))
    width = max(3.0, 2.2 / p.scale)  # at least about 2 output pixels
    p.curve(points, OUTLINE, width + 2 / p.scale)
    p.curve(points, type_color(type_), width)


def draw_frame(p: Painter, node: dict, title: str) -> None:
    """Body, title bar and title of any node."""
    x0, y0, x1, y1 = node_box(node)
    body = node.get("bgcolor") or NODE_BGCOLOR
    bar = node.get("color") or NODE_COLOR
    p.rect((x0, y0, x1, y1), fill=body, radius=8, outline=OUTLINE, width=1.5)
    p.rect((x0, y0, x1, y0 + TITLE_HEIGHT), fill=bar, radius=8)
    p.rect((x0, y0 + TITLE_HEIGHT - 8, x1, y0 + TITLE_HEIGHT), fill=bar)  # square off the bar's lower corners
    p.dot((x0 + 15, y0 + TITLE_HEIGHT / 2), 5, mix(bar, "#ffffff", 0.45))
    p.text((x0 + 28, y0 + TITLE_HEIGHT / 2), title, "title", TITLE_TEXT, x1 - x0 - 36)


def draw_note(p: Painter, node: dict, title: str) -> None:
    draw_frame(p, node, title)
    (x, y), (w, h) = node["pos"], node["size"]
    values = node.get("widgets_values") or [""]
    line_h = p.line_height("text")
    max_lines = max(1, int((h - 2 * BODY_PAD) // line_h))
    lines = wrap_paragraphs(str(values[0]), p.fonts["text"], (w - 2 * BODY_PAD - 4) * p.k, max_lines)
    for i, line in enumerate(lines):
        p.text((x + BODY_PAD + 2, y + BODY_PAD + line_h * (i + 0.5)), line, "text", NOTE_TEXT, w - 2 * BODY_PAD)


def draw_slots(p: Painter, node: dict) -> int:
    """Input slots left, output slots right; returns the number of slot rows."""
    w = node["size"][0]
    inputs, outputs = node.get("inputs") or [], node.get("outputs") or []
    half = w / 2 - 18
    for i, slot in enumerate(inputs):
        cx, cy = input_slot(node, i)
        linked = slot.get("link") is not None
        p.dot((cx, cy), 5, type_color(slot.get("type", "*")) if linked else mix(NODE_BGCOLOR, "#ffffff", 0.25))
        label = slot.get("label") or slot["name"]
        p.text((cx + 10, cy), label, "text", SLOT_TEXT, half if outputs else w - 30)
    for i, slot in enumerate(outputs):
        cx, cy = output_slot(node, i)
        p.dot((cx, cy), 5, type_color(slot.get("type", "*")), square=slot.get("shape") == 6)
        label = slot.get("label") or slot["name"]
        p.text((cx - 10, cy), label, "text", SLOT_TEXT, min(half, w - 40), anchor="rm")
    return max(len(inputs), len(outputs))


def draw_widgets(p: Painter, node: dict, specs: list[WidgetSpec] | None, first_row_y: float) -> None:
    """One rounded row per widget not driven by a link, ``name … value``, while they fit in the body."""
    (x, y), (w, h) = node["pos"], node["size"]
    values = node.get("widgets_values") or []
    if isinstance(values, dict):  # some frontends save named widget values
        specs, values = [WidgetSpec(k) for k in values], list(values.values())
    if specs is None or len(specs) != len(values):
        specs = [WidgetSpec("") for _ in values]
    linked = {s.get("widget", {}).get("name") for s in node.get("inputs") or [] if s.get("link") is not None}
    row_y, bottom = first_row_y, y + h - 4
    skip_control = False
    for spec, value in zip(specs, values):
        if spec.name == "control_after_generate" and skip_control:
            continue
        skip_control = spec.name in linked
        if spec.name and spec.name in linked:
            continue
        height = WIDGET_HEIGHT - 6 + (MULTILINE_EXTRA if spec.multiline else 0)
        if row_y + height > bottom:
            break
        box = (x + 12, row_y, x + w - 12, row_y + height)
        p.rect(box, fill=WIDGET_BG, radius=min(9, height / 2))
        mid = row_y + (WIDGET_HEIGHT - 6) / 2
        inner = w - 24 - 20
        if spec.multiline:
            p.text((x + 22, mid), spec.name, "text", WIDGET_NAME, inner)
            text_lines = wrap_paragraphs(str(value), p.fonts["text"], inner * p.k,
                                         max(1, int((height - (WIDGET_HEIGHT - 6)) // p.line_height("text"))))
            for i, line in enumerate(text_lines):
                p.text((x + 22, mid + p.line_height("text") * (i + 1)), line, "text", WIDGET_TEXT, inner)
        else:
            shown = short_value(value)
            value_w = min(p.text_width(shown, "text"), inner * (0.45 if spec.name else 1.0))
            p.text((x + w - 22, mid), shown, "text", WIDGET_TEXT, value_w + 1, anchor="rm")
            p.text((x + 22, mid), spec.name, "text", WIDGET_NAME, inner - value_w - 8)
        row_y += height + 6


def draw_node(p: Painter, node: dict, schemas: dict[str, dict]) -> None:
    title = display_title(node, schemas)
    if node["type"] in VIRTUAL:
        draw_note(p, node, title)
    else:
        draw_frame(p, node, title)
        rows = draw_slots(p, node)
        first_widget_y = node["pos"][1] + BODY_PAD * 1.5 + SLOT_HEIGHT * max(rows, 1)
        draw_widgets(p, node, widget_specs(schemas.get(node["type"])) if schemas else None, first_widget_y)
    tint = MODE_TINT.get(node.get("mode", 0))
    if tint:
        box = [round(v) for v in (*p.px(node_box(node)[:2]), *p.px(node_box(node)[2:]))]
        region = p.image.crop(box)
        p.image.paste(Image.blend(region, Image.new("RGB", region.size, tint[0]), tint[1]), box[:2])


def render_workflow(wf: dict, schemas: dict[str, dict], width: int = 1600) -> Image.Image:
    """A picture of a UI-format workflow, at most ``width`` pixels wide (small graphs are not enlarged)."""
    bounds = canvas_bounds(wf)
    scale = min(1.0, width / (bounds[2] - bounds[0]))
    p = Painter(bounds, scale)
    nodes = {n["id"]: n for n in wf["nodes"]}
    for group in wf.get("groups", []):
        draw_group(p, group)
    for link in normalized_links(wf):
        draw_link(p, nodes, link)
    for node in sorted(wf["nodes"], key=lambda n: n.get("order", 0)):
        draw_node(p, node, schemas)
    return p.result(round((bounds[2] - bounds[0]) * scale))


def save_picture(image: Image.Image, path: Path, workflow: dict) -> Path:
    """Write a 256-colour PNG (flat UI colours survive it; the file stays small) carrying the workflow JSON."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("workflow", json.dumps(workflow, ensure_ascii=True, separators=(",", ":")))
    small = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    return atomic_write(path, lambda tmp: small.save(tmp, format="PNG", pnginfo=info, optimize=True))


def ui_workflows(names: Sequence[str] = ()) -> list[Path]:
    """The UI-format files in ``workflows/`` (all, or those ``names``)."""
    files = sorted(WORKFLOWS.glob("*.json"))
    if names:
        known = {f.stem: f for f in files}
        missing = [n for n in names if n not in known]
        if missing:
            raise SystemExit(f"no UI workflow named {', '.join(missing)} in {WORKFLOWS} (have: {', '.join(known)})")
        files = [known[n] for n in names]
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="workflow names (file stems); default: every UI workflow")
    parser.add_argument("--width", type=int, default=1600, help="largest picture width in pixels (default 1600)")
    parser.add_argument("--out", type=Path, default=IMAGES, help="output folder (default docs/images)")
    args = parser.parse_args(argv)
    schemas = load_schemas()
    for path in ui_workflows(args.names):
        wf = json.loads(path.read_text(encoding="utf-8"))
        out = save_picture(render_workflow(wf, schemas, args.width), args.out / f"workflow_{path.stem}.png", wf)
        print(f"{out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}  {out.stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
