"""Tests for trainer.render: grid geometry, labels, letterboxing, placeholders, PNG metadata, conversions."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageColor

from trainer import render
from trainer.errors import CrucibleError
from trainer.render import Composite, GridStyle, arrange, compose_grid, compose_strip, save_png

BG = ImageColor.getrgb(GridStyle().background)


def solid(size: tuple[int, int], color: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", size, color)


def region(image: Image.Image, box) -> np.ndarray:
    return np.asarray(image.crop(tuple(box)))


def is_background(image: Image.Image, box, color=BG) -> bool:
    return bool((region(image, box) == np.array(color, dtype=np.uint8)).all())


# ------------------------------------------------------------------------------------------------- geometry

def test_grid_dimensions_without_labels():
    style = GridStyle(padding=6)
    cells = [[solid((40, 30), (255, 0, 0))] * 3 for _ in range(2)]
    comp = compose_grid(cells, style=style)
    assert comp.image.size == (6 + 3 * 40 + 2 * 6 + 6, 6 + 2 * 30 + 1 * 6 + 6)
    assert comp.layout["cell_size"] == [40, 30] and comp.layout["rows"] == 2 and comp.layout["cols"] == 3
    boxes = {(c["row"], c["col"]): c["box"] for c in comp.layout["cells"]}
    assert boxes[(0, 0)] == [6, 6, 46, 36]
    assert boxes[(1, 2)] == [6 + 2 * 46, 6 + 36, 6 + 2 * 46 + 40, 6 + 36 + 30]
    # every cell shows its image exactly, nothing else is painted
    for box in boxes.values():
        assert (region(comp.image, box) == [255, 0, 0]).all()


def test_labels_title_and_captions_grow_the_canvas_and_keep_cells_apart():
    tile = solid((64, 64), (0, 128, 0))
    plain = compose_grid([[tile, tile]])
    full = compose_grid([[tile, tile]], col_labels=["step 100", "step 200"], row_labels=["a prompt"],
                        title="My run", cell_captions=[["loss 0.0831", "loss 0.0712"]])
    assert full.image.width > plain.image.width  # row-label column
    assert full.image.height > plain.image.height  # title, column labels, captions
    boxes = [c["box"] for c in full.layout["cells"]]
    assert boxes[0][2] <= boxes[1][0]  # no overlap
    assert all(0 <= b[0] and 0 <= b[1] and b[2] <= full.image.width and b[3] <= full.image.height for b in boxes)
    assert full.layout["col_labels"] == ["step 100", "step 200"]
    assert full.layout["row_labels"] == ["a prompt"]
    assert [c["caption"] for c in full.layout["cells"]] == ["loss 0.0831", "loss 0.0712"]


def test_labels_are_drawn_in_their_bands():
    tile = solid((96, 96), (0, 0, 255))
    comp = compose_grid([[tile, tile], [tile, tile]], col_labels=["step 1", "step 2"],
                        row_labels=["red car", "blue car"], title="Sweep",
                        cell_captions=[["loss 0.1", "loss 0.2"], ["", ""]])
    cells = {(c["row"], c["col"]): c["box"] for c in comp.layout["cells"]}
    x0, y0, x1, _ = cells[(0, 0)]
    assert not is_background(comp.image, (x0, 0, x1, y0))  # title + column label above column 0
    assert not is_background(comp.image, (0, cells[(1, 0)][1], x0, cells[(1, 0)][3]))  # row label of row 1
    caption_band = (x0, cells[(0, 0)][3], x1, cells[(1, 0)][1])
    assert not is_background(comp.image, caption_band)
    empty_caption_band = (x0, cells[(1, 0)][3], x1, comp.image.height)
    assert is_background(comp.image, empty_caption_band)


def test_no_labels_leaves_margins_plain():
    tile = solid((50, 50), (200, 200, 0))
    comp = compose_grid([[tile]])
    x0, y0, x1, y1 = comp.layout["cells"][0]["box"]
    assert is_background(comp.image, (0, 0, comp.image.width, y0))
    assert is_background(comp.image, (0, 0, x0, comp.image.height))


def test_strip_is_one_labelled_row():
    images = [solid((32, 32), (i * 80, 0, 0)) for i in range(3)]
    comp = compose_strip(images, ["a", "b", "c"], title="t", captions=["x", "y", "z"])
    assert comp.layout["rows"] == 1 and comp.layout["cols"] == 3
    assert comp.layout["col_labels"] == ["a", "b", "c"]
    for i, cell in enumerate(comp.layout["cells"]):
        cx = (cell["box"][0] + cell["box"][2]) // 2
        cy = (cell["box"][1] + cell["box"][3]) // 2
        assert comp.image.getpixel((cx, cy)) == (i * 80, 0, 0)


# ----------------------------------------------------------------------------------------------- letterbox

def test_mixed_sizes_are_letterboxed_into_the_largest_cell():
    wide, tall = solid((100, 50), (255, 0, 0)), solid((40, 80), (0, 0, 255))
    comp = compose_strip([wide, tall], style=GridStyle(padding=4))
    assert comp.layout["cell_size"] == [100, 80]
    first, second = comp.layout["cells"]
    # the wide image fits the width: no resize, centred vertically with background above and below
    assert first["image_box"] == [4, 4 + 15, 104, 4 + 15 + 50]
    assert (region(comp.image, first["image_box"]) == [255, 0, 0]).all()
    assert is_background(comp.image, (4, 4, 104, 4 + 15))
    assert is_background(comp.image, (4, 4 + 65, 104, 4 + 80))
    # the tall image fits the height: centred horizontally
    bx = second["box"][0]
    assert second["image_box"] == [bx + 30, 4, bx + 70, 84]
    assert (region(comp.image, second["image_box"]) == [0, 0, 255]).all()
    assert is_background(comp.image, (bx, 4, bx + 30, 84))
    assert first["source_size"] == [100, 50] and second["source_size"] == [40, 80]


def test_small_images_are_scaled_up_keeping_aspect():
    comp = compose_strip([solid((100, 100), (0, 0, 0)), solid((25, 50), (0, 255, 0))])
    box = comp.layout["cells"][1]["image_box"]
    assert (box[2] - box[0], box[3] - box[1]) == (50, 100)
    assert (region(comp.image, box) == [0, 255, 0]).all()


def test_same_size_tiles_are_never_resized(monkeypatch):
    calls = []
    original = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    tile = solid((64, 64), (1, 2, 3))
    compose_grid([[tile] * 4] * 4, col_labels=list("abcd"))
    assert calls == []
    compose_strip([tile, solid((32, 64), (1, 2, 3))])  # letterboxed, but already fits: no resize
    assert calls == []
    compose_strip([tile, solid((32, 32), (1, 2, 3))])
    assert len(calls) == 1  # only the odd one is scaled


def test_alpha_and_grey_images_are_composited():
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))  # fully transparent → background shows
    grey = Image.new("L", (20, 20), 200)
    comp = compose_strip([rgba, grey])
    a, g = comp.layout["cells"]
    assert is_background(comp.image, a["image_box"])
    assert (region(comp.image, g["image_box"]) == [200, 200, 200]).all()


# ---------------------------------------------------------------------------------------------- placeholders

def test_none_cells_become_placeholders_and_ragged_rows_are_padded():
    style = GridStyle()
    tile = solid((60, 40), (9, 9, 9))
    comp = compose_grid([[tile, None], [tile]], style=style)
    cells = {(c["row"], c["col"]): c for c in comp.layout["cells"]}
    assert set(cells) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    placeholder = ImageColor.getrgb(style.placeholder_color)
    for key in [(0, 1), (1, 1)]:
        assert cells[key]["image_box"] is None and cells[key]["source_size"] is None
        x0, y0, _, _ = cells[key]["box"]
        assert comp.image.getpixel((x0 + 1, y0 + 1)) == placeholder


def test_all_none_grid_uses_the_empty_cell_size():
    comp = compose_grid([[None, None]], style=GridStyle(empty_cell_size=(30, 20), padding=0))
    assert comp.layout["cell_size"] == [30, 20]
    assert comp.image.size == (60, 20)


def test_label_count_mismatch_is_a_clear_error():
    tile = solid((10, 10), (0, 0, 0))
    with pytest.raises(CrucibleError, match="col_labels: 1 labels for 2 columns"):
        compose_grid([[tile, tile]], col_labels=["only one"])
    with pytest.raises(CrucibleError, match="row_labels"):
        compose_grid([[tile]], row_labels=["a", "b"])
    with pytest.raises(CrucibleError, match="cell_captions"):
        compose_grid([[tile]], cell_captions=[["a", "b"]])
    with pytest.raises(CrucibleError, match="no cells"):
        compose_grid([])


# ------------------------------------------------------------------------------------------------- arrange

def test_arrange_places_by_column_and_row_index():
    images = ["a", "b", "c", "d"]
    cells = arrange(images, col_keys=[0, 1, 2, 0], row_keys=[0, 0, 1, 2])
    assert cells == [["a", "b", None], [None, None, "c"], ["d", None, None]]
    assert arrange([], [], []) == []


@pytest.mark.parametrize("cols, rows, match", [
    ([0, 0], [1, 1], "already filled"),
    ([0], [0, 1], "give one column and one row index"),
    ([0, -1], [0, 0], "not a non-negative integer"),
    ([0, "x"], [0, 0], "not a non-negative integer"),
])
def test_arrange_rejects_bad_keys(cols, rows, match):
    with pytest.raises(CrucibleError, match=match):
        arrange(["a"] * len(cols), cols, rows)


# ----------------------------------------------------------------------------------------------------- text

def test_wrap_text_fits_width_and_ellipsizes():
    font = render.load_font(20)
    text = "a photo of a sks dog sitting on a red couch in a sunny living room"
    lines = render.wrap_text(text, font, 120, max_lines=3)
    assert len(lines) == 3 and lines[-1].endswith(font.ellipsis)
    assert all(font.width(line) <= 120 for line in lines)
    long_word = render.wrap_text("x" * 200, font, 60, max_lines=10)
    assert len(long_word) > 1 and all(font.width(line) <= 60 for line in long_word)
    assert render.wrap_text("  ", font, 100, 2) == []


def test_truncate_respects_label_max_chars():
    font = render.load_font(20)
    assert render.truncate("short", 48, font) == "short"
    cut = render.truncate("y" * 100, 48, font)
    assert len(cut) == 48 and cut.endswith(font.ellipsis)


def test_bitmap_font_fallback_draws_any_text(monkeypatch):
    from PIL import ImageFont

    bitmap = getattr(ImageFont, "load_default_imagefont", None)
    if bitmap is None:  # Pillow 10.1: load_default() gives the bitmap font only when FreeType's core is missing
        with_freetype = ImageFont.load_default

        def bitmap():
            with monkeypatch.context() as patch:
                patch.setattr(ImageFont, "core", object())
                return with_freetype()

    def no_size(size=None):  # what Pillow < 10.1, or a build without FreeType, offers
        if size is not None:
            raise TypeError("load_default() got an unexpected keyword argument 'size'")
        return bitmap()

    render.load_font.cache_clear()
    monkeypatch.setattr(ImageFont, "load_default", no_size)
    try:
        font = render.load_font(20)
        assert not font.scalable and font.ellipsis == "..."
        comp = compose_strip([solid((120, 40), (0, 0, 0))], ["日本語 prompt …"], title="t" * 500)
        assert comp.image.size[0] >= 120
    finally:
        render.load_font.cache_clear()


def test_light_style():
    style = GridStyle.light(font_size=12)
    comp = compose_strip([solid((20, 20), (0, 0, 0))], style=style)
    assert comp.image.getpixel((0, 0)) == (255, 255, 255) and style.font_size == 12


# ------------------------------------------------------------------------------------------------- save_png

def test_save_png_round_trips_layout_and_extra_metadata(tmp_path):
    comp = compose_strip([solid((16, 16), (1, 2, 3)), None], ["step 1", "step 2"], title="run")
    path = save_png(comp, tmp_path / "sub" / "strip.png", extra_metadata={"prompt": {"3": {"seed": 1}}, "note": "hi"})
    with Image.open(path) as image:
        assert image.size == comp.image.size
        assert json.loads(image.text["crucible_layout"]) == comp.layout
        assert json.loads(image.text["prompt"]) == {"3": {"seed": 1}} and image.text["note"] == "hi"
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(comp.image))
    assert render.read_layout(path) == comp.layout
    assert [p.name for p in path.parent.iterdir()] == ["strip.png"]  # no temp file left


def test_save_png_failure_leaves_neither_file_nor_temp(tmp_path):
    class Exploding:
        size = (1, 1)

        def save(self, fp, **_):
            Path(fp).write_bytes(b"partial")
            raise OSError(28, "No space left on device")

    with pytest.raises(CrucibleError, match="cannot write"):
        save_png(Composite(Exploding(), {}), tmp_path / "strip.png")
    assert list(tmp_path.iterdir()) == []


def test_save_png_refuses_reserved_key(tmp_path):
    comp = compose_strip([solid((4, 4), (0, 0, 0))])
    with pytest.raises(CrucibleError, match="reserved"):
        save_png(comp, tmp_path / "x.png", extra_metadata={"crucible_layout": "x"})


def test_read_layout_of_a_foreign_png(tmp_path):
    solid((4, 4), (0, 0, 0)).save(tmp_path / "plain.png")
    with pytest.raises(CrucibleError, match="no 'crucible_layout'"):
        render.read_layout(tmp_path / "plain.png")


# ---------------------------------------------------------------------------------------------- conversion

def test_to_pil_and_to_array_round_trip():
    rng = np.random.default_rng(0)
    array = rng.random((12, 10, 3), dtype=np.float32)
    image = render.to_pil(array)
    assert image.mode == "RGB" and image.size == (10, 12)
    back = render.to_array(image)
    assert back.dtype == np.float32 and back.shape == (12, 10, 3)
    assert np.abs(back - array).max() <= 0.5 / 255 + 1e-6
    assert render.to_pil(array[None]).size == (10, 12)  # a batch of one
    assert render.to_pil(array[..., :1]).mode == "L"
    assert render.to_pil(np.concatenate([array, array[..., :1]], -1)).mode == "RGBA"
    assert render.to_pil(np.full((2, 2, 3), 7.0)).getpixel((0, 0)) == (255, 255, 255)  # clipped
    assert render.to_pil(np.full((2, 2, 3), np.nan)).getpixel((0, 0)) == (0, 0, 0)
    assert render.to_pil(image) is image
    assert render.to_array(Image.new("RGBA", (3, 3), (255, 0, 0, 255)))[0, 0].tolist() == [1.0, 0.0, 0.0]


def test_to_pil_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    tensor = torch.zeros(1, 4, 6, 3)
    tensor[..., 1] = 1.0
    assert render.to_pil(tensor).getpixel((0, 0)) == (0, 255, 0)


@pytest.mark.parametrize("shape", [(2, 4, 4, 3), (4, 4, 2), (4,)])
def test_to_pil_rejects_bad_shapes(shape):
    with pytest.raises(CrucibleError, match="cannot make an image"):
        render.to_pil(np.zeros(shape, dtype=np.float32))


def test_grid_accepts_arrays_directly():
    comp = compose_strip([np.zeros((8, 8, 3), dtype=np.float32), np.ones((8, 8, 3), dtype=np.float32)])
    assert comp.image.getpixel(tuple(comp.layout["cells"][1]["box"][:2])) == (255, 255, 255)


# ------------------------------------------------------------------------------------------------ contract

def test_module_does_not_import_torch():
    code = "import sys, trainer.render; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"


def test_64_tiles_of_512_compose_into_an_8_by_8_grid():
    """Layout only: the speed is measured by benchmarks/bench_compositor.py, never asserted in a test."""
    rng = np.random.default_rng(1)
    tiles = [Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)) for _ in range(8)]
    cells = [[tiles[(r + c) % 8] for c in range(8)] for r in range(8)]
    comp = compose_grid(cells, col_labels=[f"step {i}" for i in range(8)],
                        row_labels=[f"prompt number {i}, strength 1.0" for i in range(8)], title="bench")
    assert comp.layout["cell_size"] == [512, 512]
    assert (comp.layout["rows"], comp.layout["cols"], len(comp.layout["cells"])) == (8, 8, 64)
