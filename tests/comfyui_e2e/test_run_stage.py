"""Unit tests for the real-ComfyUI stage driver's pure logic (no server, no ComfyUI).

The stage itself (``.ci/comfyui_stage.sh``) is exercised by ``make test-comfyui``; these tests keep the parts that
decide PASS/FAIL honest: the CI list's validation, input overrides, the negative-check value picker, the log scans
and the saved-grid check (grids composed with the pack's own ``trainer.render``).
"""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
_spec = importlib.util.spec_from_file_location("crucible_run_stage", HERE / "run_stage.py")
rs = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = rs  # dataclasses look the module up by name
_spec.loader.exec_module(rs)

OBJECT_INFO = {
    "Train": {"input": {"required": {"steps": ["INT", {"min": 1, "max": 100}],
                                     "lr": ["FLOAT", {"min": 0.0}],
                                     "family": [["sd15", "sdxl"], {}],
                                     "name": ["STRING", {}]},
                        "optional": {"note": ["STRING", {}]}},
              "output": ["STRING"], "output_node": True, "display_name": "Train"},
    "SaveImage": {"input": {"required": {"images": ["IMAGE"], "filename_prefix": ["STRING", {}]}},
                  "output": [], "output_node": True, "display_name": "Save Image"},
}
WORKFLOW = {"1": {"class_type": "Train", "inputs": {"steps": 50, "lr": 1e-4, "family": "sd15", "name": "x"}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "ci"}}}


def write_sidecar(tmp_path: Path, entries) -> Path:
    path = tmp_path / "ci_workflows.json"
    path.write_text(json.dumps(entries))
    return path


def test_readme_example_is_a_valid_ci_list(tmp_path):
    readme = (HERE / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## `ci_workflows.json`.*?```json\n(.*?)```", readme, re.S).group(1)
    entries = rs.load_sidecar(write_sidecar(tmp_path, json.loads(block)))
    assert [e.name for e in entries] == ["train a tiny LoRA", "learning_rate 0 is refused"]
    assert entries[0].expect["12"]["text"] == {"min": 1} and entries[1].expect_error == ["learning_rate"]


def test_repo_ci_list_is_valid_and_points_at_existing_api_workflows():
    path = HERE / "ci_workflows.json"
    entries = rs.load_sidecar(path)
    stage = (REPO / ".ci" / "comfyui_stage.sh").read_text(encoding="utf-8")
    resources = set(re.findall(r"RES\[(\w+)\]=", stage)) | set(re.findall(r"^build_checkpoint (\w+) ", stage, re.M))
    assert resources >= {"demo_data", "tiny_sd15", "comfy_sd15"}
    for entry in entries:
        rs.load_api_workflow(REPO / entry.file)  # exists and is API format
        assert set(entry.needs) <= resources, (entry.name, entry.needs)


@pytest.mark.parametrize("entry, message", [
    ({"file": "w.json", "expct": {}}, "unknown key(s) ['expct']"),
    ({"file": "/etc/passwd"}, "relative to the pack root"),
    ({"file": "../outside.json"}, "relative to the pack root"),
    ({"name": "no file"}, "at least \"file\""),
    ({"file": "w.json", "expect": {"2": {"images": -1}}}, "expect.2.images"),
    ({"file": "w.json", "expect": {"2": {"images": {"least": 1}}}}, "expect.2.images"),
    ({"file": "w.json", "expect": {"2": {"images": True}}}, "expect.2.images"),
    ({"file": "w.json", "needs": "demo_data"}, ".needs"),
    ({"file": "w.json", "expect": {"2": {"images": 1}}, "expect_error": ["x"]}, "exclude each other"),
    ({"file": "w.json", "expect_grid": {"2": {"cols": 3}}, "expect_error": ["x"]}, "exclude each other"),
    ({"file": "w.json", "expect_grid": {"2": {"colums": 3}}}, "expect_grid.2: give some of"),
    ({"file": "w.json", "expect_grid": {"2": {}}}, "expect_grid.2: give some of"),
    ({"file": "w.json", "expect_grid": {"2": {"cols": -1}}}, "expect_grid.2.cols"),
    ({"file": "w.json", "expect_grid": {"2": {"columns_differ": "yes"}}}, "expect_grid.2.columns_differ"),
    ({"file": "w.json", "expect_grid": {"2": 3}}, ".expect_grid: an object"),
    ({"file": "w.json", "log_forbids": "lora key not loaded"}, ".log_forbids"),
    ({"file": "w.json", "log_forbids": ["ok", " "]}, ".log_forbids"),
])
def test_malformed_ci_entries_are_refused_naming_the_key(tmp_path, entry, message):
    with pytest.raises(rs.SidecarError, match=re.escape(message)):
        rs.load_sidecar(write_sidecar(tmp_path, [entry]))


def test_missing_ci_list_means_no_entries_but_a_non_list_is_an_error(tmp_path):
    assert rs.load_sidecar(tmp_path / "absent.json") == []
    with pytest.raises(rs.SidecarError, match="JSON list"):
        rs.load_sidecar(write_sidecar(tmp_path, {"file": "w.json"}))


def test_build_prompt_applies_overrides_with_placeholders_and_leaves_the_workflow_alone():
    entry = rs.Entry(file="w.json", name="w", inputs={"1": {"steps": 4, "name": "${demo_data}/run"}})
    prompt = rs.build_prompt(entry, WORKFLOW, OBJECT_INFO, {"demo_data": "crucible_demo"})
    assert prompt["1"]["inputs"]["steps"] == 4 and prompt["1"]["inputs"]["name"] == "crucible_demo/run"
    assert WORKFLOW["1"]["inputs"]["steps"] == 50


@pytest.mark.parametrize("inputs, expect, workflow, message", [
    ({"9": {"steps": 1}}, {}, WORKFLOW, "node '9' is not in"),
    ({"1": {"stpes": 1}}, {}, WORKFLOW, "has no input 'stpes'"),
    ({}, {"7": {"images": 1}}, WORKFLOW, "expect: node '7'"),
    ({}, {}, WORKFLOW, "expect_grid: node '8'"),
    ({}, {}, {"1": {"class_type": "NoSuchNode", "inputs": {}}}, "not on this server: ['NoSuchNode']"),
])
def test_build_prompt_refuses_what_cannot_work(inputs, expect, workflow, message):
    grid = {"8": {"cols": 1}} if "expect_grid" in message else {}
    entry = rs.Entry(file="w.json", name="w", inputs=inputs, expect=expect, expect_grid=grid)
    with pytest.raises(ValueError, match=re.escape(message)):
        rs.build_prompt(entry, workflow, OBJECT_INFO, {})


def test_unknown_placeholder_is_named():
    with pytest.raises(KeyError, match=r"\$\{nope\}"):
        rs.substitute({"a": ["${nope}"]}, {"demo_data": "x"})
    assert rs.substitute(["${a}-${a}", 3], {"a": "z"}) == ["z-z", 3]


def test_ui_format_workflow_is_rejected_with_a_hint(tmp_path):
    path = tmp_path / "ui.json"
    path.write_text(json.dumps({"nodes": [], "links": [], "version": 0.4}))
    with pytest.raises(ValueError, match="Save \\(API Format\\)"):
        rs.load_api_workflow(path)


@pytest.mark.parametrize("spec, bad", [
    (["INT", {"min": 1, "max": 100}], 101),
    (["FLOAT", {"min": 0.0}], -1.0),
    ([["sd15", "sdxl"], {}], rs.NOT_A_CHOICE),
    (["STRING", {}], None),
    (["INT", {}], None),
    ([[], {}], None),
])
def test_out_of_range_breaks_the_spec(spec, bad):
    assert rs.out_of_range(spec) == bad


def test_bad_widget_picks_a_literal_input_of_a_pack_node_only():
    assert rs.bad_widget(WORKFLOW, {"Train"}, OBJECT_INFO) == ("1", "steps", 101)
    assert rs.bad_widget(WORKFLOW, {"SaveImage"}, OBJECT_INFO) is None  # its only limited inputs are links/strings


def test_bad_widget_skips_nodes_this_comfyui_never_validates():
    info = {**OBJECT_INFO,
            "Options": {"input": {"required": {"k": ["INT", {"max": 64}]}}, "output_node": False},
            "Data": {"input": {"required": {"n": ["INT", {"max": 9}]}, "optional": {"opts": ["OPTS", {}]}},
                     "output_node": False},
            "Show": {"input": {"required": {"data": ["DATA", {}]}}, "output_node": True}}
    prompt = {"1": {"class_type": "Options", "inputs": {"k": 1}},  # only reachable through an optional link
              "2": {"class_type": "Data", "inputs": {"n": 1, "opts": ["1", 0]}},
              "3": {"class_type": "Show", "inputs": {"data": ["2", 0]}},
              "4": {"class_type": "Options", "inputs": {"k": 2}}}  # not connected at all
    assert rs.validated_nodes(prompt, info) == ["2", "3"]
    assert rs.bad_widget(prompt, {"Options", "Data"}, info) == ("2", "n", 10)
    assert rs.bad_widget(prompt, {"Options"}, info) is None


def test_compare_node_reports_each_difference():
    want = {"required": ["family", "lr", "name", "steps"], "optional": ["note"], "hidden": [], "output": ["STRING"],
            "output_node": True, "display_name": "Train"}
    assert rs.compare_node("Train", want, OBJECT_INFO["Train"]) == []
    problems = rs.compare_node("Train", dict(want, optional=[], output_node=False), OBJECT_INFO["Train"])
    assert len(problems) == 2 and "Train.optional" in problems[0] and "Train.output_node" in problems[1]
    assert "not in /object_info" in rs.compare_node("Gone", want, None)[0]


def test_import_failures_quote_the_traceback_and_the_failure_lines():
    pack = Path("/c/custom_nodes/crucible")
    log = "\n".join(["boot", "Traceback (most recent call last):", '  File "x.py", line 1', "ImportError: no foo", "",
                     f"Cannot import {pack} module for custom nodes: no foo", "Import times for custom nodes:",
                     "   0.0 seconds: /c/custom_nodes/other", f"   0.0 seconds (IMPORT FAILED): {pack}"])
    (report,) = rs.import_failures(log, pack)
    assert report.startswith("Traceback") and "ImportError: no foo" in report and "IMPORT FAILED" in report
    assert "other" not in report
    assert rs.import_failures(log.replace(str(pack), "/c/custom_nodes/elsewhere"), pack) == []


def test_run_error_text_and_success_cover_partial_validation():
    partial = rs.Run(200, {"prompt_id": "p", "node_errors": {"2": {"errors": [{"details": "steps: 101"}]}}},
                     history={"status": {"status_str": "success", "completed": True, "messages": []}})
    assert not partial.succeeded and "steps: 101" in partial.error_text()
    clean = rs.Run(200, {"prompt_id": "p", "node_errors": {}}, history=partial.history)
    assert clean.succeeded and clean.error_text() == ""
    failed = rs.Run(200, {"prompt_id": "p"}, history={"status": {"status_str": "error", "completed": False, "messages": [
        ["execution_error", {"node_id": "1", "node_type": "Train", "exception_message": "lr must be > 0",
                             "traceback": ["tb line\n"]}]]}})
    assert not failed.succeeded and "lr must be > 0" in failed.error_text() and "tb line" in failed.error_text()


@pytest.mark.parametrize("n, spec, ok", [(3, 3, True), (2, 3, False), (2, {"min": 1}, True), (0, {"min": 1}, False),
                                         (5, {"max": 4}, False), (4, {"min": 4, "max": 4}, True)])
def test_count_specs(n, spec, ok):
    assert rs._count_ok(n, spec) is ok


def test_entry_with_grid_and_log_checks_parses(tmp_path):
    (entry,) = rs.load_sidecar(write_sidecar(tmp_path, [{
        "file": "w.json", "expect": {"2": {"images": 1}}, "expect_grid": {"2": {"cols": 3, "rows": {"min": 1},
                                                                               "columns_differ": True}},
        "log_forbids": ["lora key not loaded", "NOT LOADED"]}]))
    assert entry.expect_grid == {"2": {"cols": 3, "rows": {"min": 1}, "columns_differ": True}}
    assert entry.log_forbids == ["lora key not loaded", "NOT LOADED"]


# --- server log -------------------------------------------------------------------------------------------------------
def test_forbidden_lines_find_both_comfyui_lora_warnings_case_insensitively():
    log = "\n".join(["got prompt", "lora key not loaded: lora_unet_down_blocks_0_attentions_0_proj_in.alpha",
                     "NOT LOADED diffusion_model.input_blocks.1.1.proj_in.weight", "Requested to load BaseModel",
                     "lora key not loaded: lora_unet_down_blocks_0_attentions_0_proj_in.alpha",
                     "Loading 1 new model", "Prompt executed in 59.16 seconds"])
    found = rs.forbidden_lines(log, ["LoRA key not loaded", "not loaded "])
    assert found == ["lora key not loaded: lora_unet_down_blocks_0_attentions_0_proj_in.alpha",
                     "NOT LOADED diffusion_model.input_blocks.1.1.proj_in.weight"]
    assert rs.forbidden_lines(log, ["IMPORT FAILED"]) == [] and rs.forbidden_lines(log, []) == []


def test_log_since_reads_only_what_the_run_added(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("before: lora key not loaded: x\n")
    start = rs.log_size(log)
    with open(log, "a") as fh:
        fh.write("during\n")
    assert rs.log_since(log, start) == "during\n"
    assert rs.log_size(tmp_path / "absent.log") == 0 and rs.log_since(None, 0) == ""


# --- saved grids ------------------------------------------------------------------------------------------------------
def grid_png(tmp_path: Path, shades: list[list[int | None]], labels=("base", "e1", "e2")) -> bytes:
    """A grid PNG as Crucible Image Grid saves it: one solid 16x16 cell per shade (None = no image)."""
    from PIL import Image

    from trainer.render import compose_grid, save_png

    cells = [[None if v is None else Image.new("RGB", (16, 16), (v, v, v)) for v in row] for row in shades]
    path = save_png(compose_grid(cells, col_labels=list(labels[:len(shades[0])])), tmp_path / "grid.png")
    return path.read_bytes()


def test_grid_check_passes_when_every_checkpoint_column_differs_from_the_base(tmp_path):
    png = grid_png(tmp_path, [[100, 110, 140], [50, 52, 60]])
    problems, summary = rs.grid_problems(png, {"cols": 3, "rows": 2, "columns_differ": True}, REPO)
    assert problems == []
    assert "2x3 grid" in summary and "r0 column 1 ('e1') 10.0" in summary and "r1 column 2 ('e2') 10.0" in summary


def test_grid_check_names_a_column_equal_to_the_base_and_wrong_counts(tmp_path):
    png = grid_png(tmp_path, [[100, 100, 140]])
    problems, _ = rs.grid_problems(png, {"cols": 2, "rows": {"min": 1}, "columns_differ": True}, REPO, where="g")
    assert problems[0] == "g: 3 cols, expected 2"
    assert len(problems) == 2 and "row 0 column 1 ('e1') differs from column 0 ('base') by only 0.00/255" in problems[1]
    assert rs.grid_problems(png, {"cols": 3}, REPO)[0] == []  # equal columns are fine unless columns_differ


def test_grid_check_refuses_placeholders_and_pngs_without_a_layout(tmp_path):
    from PIL import Image

    problems, _ = rs.grid_problems(grid_png(tmp_path, [[100, None]]), {"columns_differ": True}, REPO, where="g")
    assert problems == ["g: cell row 0 column 1 has no image (a placeholder)"]
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    problems, _ = rs.grid_problems(plain.read_bytes(), {"cols": 1}, REPO, where="g")
    assert len(problems) == 1 and problems[0].startswith("g: no readable layout") and "crucible_layout" in problems[0]


class FakeServer:
    """``Server.raw`` over a dict of /view paths."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files

    def raw(self, path: str, timeout: float = 60.0) -> tuple[int, bytes]:
        return (200, self.files[path]) if path in self.files else (404, b"")


def test_check_grids_fetches_each_saved_grid_and_reports_a_missing_one(tmp_path):
    png = grid_png(tmp_path, [[100, 120, 130]])
    item = {"filename": "g.png", "subfolder": "crucible", "type": "output"}
    server = FakeServer({"/view?" + rs._view_query(item): png})
    history = {"outputs": {"15": {"images": [item]}}, "status": {"status_str": "success", "completed": True}}
    run = rs.Run(200, {"prompt_id": "p"}, history=history)
    entry = rs.Entry(file="w.json", name="w", expect_grid={"15": {"cols": 3, "columns_differ": True}})
    problems, findings = rs.check_grids(server, entry, run, REPO)
    assert problems == [] and len(findings) == 1 and "1x3 grid" in findings[0]
    entry.expect_grid = {"15": {"cols": 3}, "16": {"cols": 1}}
    problems, _ = rs.check_grids(FakeServer({}), entry, run, REPO)
    assert problems[0].startswith("node 15: /view?") and problems[0].endswith("-> 404")
    assert problems[1] == "node 16: saved no grid image to check (turn its 'save' on)"
