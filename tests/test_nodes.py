"""The pack's ComfyUI nodes, imported the way ComfyUI imports a custom-node pack and run for real.

ComfyUI's runtime modules are stubbed (:mod:`tests.comfy_stubs`): folder_paths points at a temporary ComfyUI tree,
``comfy.utils.ProgressBar`` and the interrupt flag record what the pack does with them, and ``comfy.sd``'s loaders
return tagged objects. Everything else is the real code on a tiny SD1.5-architecture model at 64 px.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

import comfy_stubs
from comfy_stubs import node_defaults as defaults  # every widget at its default, as a fresh node
from trainer.errors import CrucibleError, UnsafePathError

SUBMODULES = ("dataset_nodes", "train_nodes", "sweep_nodes", "image_nodes", "tagging_nodes")
DEMO = "crucible_demo"
SMALL = "crucible_small"
FROM_RUN = "(from run input)"


# --- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    stub, restore = comfy_stubs.install(tmp_path_factory.mktemp("comfyui"))
    yield stub
    restore()


@pytest.fixture(scope="module")
def pack(comfy):
    return comfy_stubs.load_pack()


@pytest.fixture(scope="module")
def nodes(pack) -> dict:
    return pack.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def demo_input(comfy, demo_dataset) -> str:
    shutil.copytree(demo_dataset, comfy.input_dir / DEMO)
    return DEMO


@pytest.fixture(scope="module")
def small_input(comfy, demo_dataset) -> str:
    """The first four demo images (training stays quick: 2 steps of batch 2 per epoch)."""
    concept = next(demo_dataset.iterdir())
    target = comfy.input_dir / SMALL / concept.name
    target.mkdir(parents=True)
    for image in sorted(concept.glob("*.png"))[:4]:
        shutil.copy(image, target)
        shutil.copy(image.with_suffix(".txt"), target)
    return SMALL


def run(nodes, node_id: str, **inputs):
    """Call a node's FUNCTION with its defaults overridden by ``inputs``; returns the output tuple and the UI dict."""
    cls = nodes[node_id]
    out = getattr(cls(), cls.FUNCTION)(**{**defaults(cls), **inputs})
    if isinstance(out, dict):
        return tuple(out["result"]), out.get("ui", {})
    return tuple(out), {}


def dataset(nodes, path: str = DEMO, **inputs) -> tuple:
    """The CRUCIBLE_DATASET output (a tuple of dataset configs) for a folder at 64 px."""
    return run(nodes, "CrucibleDataset", path=path, resolution=64, **inputs)[0][0]


# --- loading and schemas -------------------------------------------------------------------------------------------
def test_pack_loads_every_node_module(pack):
    for module in SUBMODULES:
        loaded = sys.modules.get(f"{comfy_stubs.PACK_NAME}.nodes.{module}")
        assert loaded is not None, f"nodes/{module}.py failed to import (see the 'Crucible:' log line)"
        assert set(loaded.NODES) <= set(pack.NODE_CLASS_MAPPINGS)
    assert len(pack.NODE_CLASS_MAPPINGS) >= 11


def _spec_problems(node_id: str, section: str, name: str, spec) -> list[str]:
    where = f"{node_id}.{section}.{name}"
    if not isinstance(spec, tuple) or not spec:
        return [f"{where}: spec must be a non-empty tuple, got {spec!r}"]
    kind, options = spec[0], spec[1] if len(spec) > 1 else {}
    problems = []
    if isinstance(kind, list):
        if not kind or not all(isinstance(c, str) for c in kind):
            problems.append(f"{where}: choices must be a non-empty list of strings")
        if "default" in options and options["default"] not in kind:
            problems.append(f"{where}: default {options['default']!r} is not among the choices")
    elif not isinstance(kind, str) or not kind:
        problems.append(f"{where}: type must be a string or a list of choices, got {kind!r}")
    if not isinstance(options, dict):
        return problems + [f"{where}: options must be a dict"]
    if not str(options.get("tooltip", "")).strip():
        problems.append(f"{where}: no tooltip")
    if kind in ("INT", "FLOAT") and "default" in options:
        lo, hi, default = options.get("min", -math.inf), options.get("max", math.inf), options["default"]
        if not lo <= default <= hi:
            problems.append(f"{where}: default {default} outside [{lo}, {hi}]")
        if kind == "INT" and not all(isinstance(options.get(k, 0), int) for k in ("default", "min", "max", "step")):
            problems.append(f"{where}: INT default/min/max/step must be integers")
    expected = {"STRING": str, "BOOLEAN": bool}.get(kind) if isinstance(kind, str) else None
    if expected and "default" in options and not isinstance(options["default"], expected):
        problems.append(f"{where}: default {options['default']!r} is not a {expected.__name__}")
    if kind == "INT" and name in ("seed", "noise_seed") and "control_after_generate" not in options:
        problems.append(f"{where}: ComfyUI's frontend adds a 'randomize' control to INT inputs named {name} "
                        "unless control_after_generate is set; set it (e.g. 'fixed') so runs stay reproducible")
    return problems


def test_every_node_declares_a_valid_schema(pack):
    problems = []
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        if not node_id.startswith("Crucible"):
            problems.append(f"{node_id}: node ids must start with 'Crucible'")
        if not str(pack.NODE_DISPLAY_NAME_MAPPINGS.get(node_id, "")).strip():
            problems.append(f"{node_id}: no display name")
        if not str(getattr(cls, "CATEGORY", "")).startswith("Crucible/"):
            problems.append(f"{node_id}: CATEGORY {getattr(cls, 'CATEGORY', None)!r} is not under Crucible/")
        function = getattr(cls, getattr(cls, "FUNCTION", ""), None)
        if not callable(function):
            problems.append(f"{node_id}: FUNCTION {getattr(cls, 'FUNCTION', None)!r} is not a method")
        returns = tuple(cls.RETURN_TYPES)
        for attr in ("RETURN_NAMES", "OUTPUT_IS_LIST"):
            if hasattr(cls, attr) and len(getattr(cls, attr)) != len(returns):
                problems.append(f"{node_id}: {attr} has {len(getattr(cls, attr))} items, RETURN_TYPES {len(returns)}")
        inputs = cls.INPUT_TYPES()
        if not set(inputs) <= {"required", "optional", "hidden"} or "required" not in inputs:
            problems.append(f"{node_id}: INPUT_TYPES sections {sorted(inputs)}")
        names = []
        for section in ("required", "optional"):
            for name, spec in inputs.get(section, {}).items():
                names.append(name)
                problems += _spec_problems(node_id, section, name, spec)
        if callable(function):
            try:
                inspect.signature(function).bind(None, **{n: None for n in names})
            except TypeError as exc:
                problems.append(f"{node_id}.{cls.FUNCTION} does not accept its inputs: {exc}")
    assert not problems, "\n".join(problems)


def test_train_node_outputs_and_optional_inputs_keep_their_positions(pack):
    """Saved workflows address outputs by index and widgets by position: these never move (the real server's
    /object_info is compared with the classes in the CI stage)."""
    train = pack.NODE_CLASS_MAPPINGS["CrucibleTrain"]
    assert train.RETURN_TYPES == ("CRUCIBLE_RUN", "IMAGE", "STRING", "INT")
    assert train.OUTPUT_IS_LIST == (False, False, True, True)
    assert list(train.INPUT_TYPES()["optional"])[:6] == ["network", "optimizer", "training", "resume_force",
                                                         "also_save_checkpoint", "validation_dataset"]
    json.dumps(comfy_stubs.pack_object_info(pack))  # ComfyUI serves this as JSON: every spec must serialise


# --- dataset nodes -----------------------------------------------------------------------------------------------
def test_dataset_reports_images_and_concepts(nodes, comfy, demo_input):
    (datasets, report), ui = run(nodes, "CrucibleDataset", path=demo_input, resolution=64)
    assert ui == {"text": [report]}
    assert "12 images" in report and "crucible shapes" in report and "x 10 repeats" in report
    assert len(datasets) == 1 and Path(datasets[0].path) == (comfy.input_dir / DEMO).resolve()
    (merged, report2), _ = run(nodes, "CrucibleDataset", path=demo_input, resolution=64, repeats=2,
                               merge_with=datasets)
    assert len(merged) == 2 and merged[0] == datasets[0] and merged[1].repeats == 2
    assert report2.startswith("Dataset 2")


def test_dataset_refuses_paths_outside_the_input_folder(nodes, comfy, demo_dataset, tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    shutil.copytree(demo_dataset, outside)
    link = comfy.input_dir / "sneaky_link"
    link.symlink_to(outside, target_is_directory=True)
    try:
        climbing = os.path.relpath(outside, comfy.input_dir)  # "../../…/outside": relative, but leaves input/
        for path in (str(outside), climbing, link.name, f"{link.name}/10_crucible shapes"):
            with pytest.raises(UnsafePathError, match="outside the allowed folders"):
                run(nodes, "CrucibleDataset", path=path)
        monkeypatch.setenv("CRUCIBLE_ALLOWED_DIRS", str(outside))  # the documented way to allow another folder
        assert "12 images" in run(nodes, "CrucibleDataset", path=str(outside), resolution=64)[0][1]
    finally:
        link.unlink()


def test_dataset_is_changed_follows_caption_edits(nodes, comfy, demo_dataset):
    shutil.copytree(demo_dataset, comfy.input_dir / "edited")
    is_changed = nodes["CrucibleDataset"].IS_CHANGED
    before = is_changed(path="edited", resolution=64, captions=None)
    assert before == is_changed(path="edited", resolution=64, captions=None)
    caption = next((comfy.input_dir / "edited").rglob("00_red_circle.txt"))
    caption.write_text("red circle, on a black background, edited", encoding="utf-8")
    assert is_changed(path="edited") != before
    refused = is_changed(path="/etc")
    assert refused != refused  # NaN: never cached, so the node runs and reports the refusal


def test_caption_preview_shows_the_training_captions(nodes, demo_input):
    (captions,) = run(nodes, "CrucibleCaptionOptions", trigger_word="crucible", keep_tokens=1,
                      shuffle_caption=True)[0]
    ds = dataset(nodes, captions=captions)
    (text,), ui = run(nodes, "CrucibleCaptionPreview", dataset=ds, images="0-3", epochs=2, seed=42)
    note, *lines = text.splitlines()  # the note: no Training Options, so the text cache is the family's
    assert ui == {"text": [text]} and len(lines) == 8 and note.startswith("(text cache left to the family")  # 4 x 2
    for line in lines:
        caption = line.split(": ", 1)[1]
        assert caption.startswith("crucible, "), line  # the trigger word first, never shuffled
        assert len(caption.split(", ")) == 5  # trigger + the 4 tags of each demo caption, none dropped
    assert run(nodes, "CrucibleCaptionPreview", dataset=ds, images="0-3", epochs=2, seed=42)[0][0] == text
    assert run(nodes, "CrucibleCaptionPreview", dataset=ds, images="0-3", epochs=2, seed=7)[0][0] != text


def test_caption_options_refuse_bad_replacements(nodes):
    with pytest.raises(CrucibleError, match="replace_tags"):
        run(nodes, "CrucibleCaptionOptions", replace_tags="no equals sign here")


def test_step_plan(nodes, demo_input):
    ds = dataset(nodes)  # 12 images, 1 held out for validation: 11 x 10 repeats (from the folder name) = 110 samples
    (text,), _ = run(nodes, "CrucibleStepPlan", dataset=ds, batch_size=4, epochs=2, save_every_n_epochs=1)
    assert "28 optimizer steps per epoch x 2 epoch(s) = 56 steps" in text
    assert "checkpoints at steps: 28 (epoch 1), 56 (epoch 2)" in text


# --- model node --------------------------------------------------------------------------------------------------
def test_model_from_a_diffusers_folder(nodes, tiny_sd15):
    (cfg,), _ = run(nodes, "CrucibleModel", family="sd15", path=str(comfy_stubs.in_models(tiny_sd15)), clip_skip=2)
    assert (cfg.family, Path(cfg.path), cfg.clip_skip, cfg.prediction_type) == \
        ("sd15", comfy_stubs.in_models(tiny_sd15), 2, "")
    with pytest.raises(CrucibleError, match="ckpt_name"):
        run(nodes, "CrucibleModel", path="  ")


def test_model_from_models_checkpoints_keeps_its_own_tokenizer(nodes, comfy, tiny_sd15):
    from trainer.families.tokenizers import find_clip_tokenizer_dir
    from trainer.tiny import build_tiny_tokenizer, single_file_path

    build_tiny_tokenizer(comfy.tokenizer_dir)  # stands in for ComfyUI's comfy/sd1_tokenizer
    checkpoints = comfy.model_dir("checkpoints")
    shutil.copy(single_file_path(tiny_sd15), checkpoints / "tiny.safetensors")
    shutil.copytree(tiny_sd15.parent / f"{tiny_sd15.name}_tokenizer", checkpoints / "tiny_tokenizer")
    shutil.copy(single_file_path(tiny_sd15), checkpoints / "plain.safetensors")
    choices = nodes["CrucibleModel"].INPUT_TYPES()["required"]["ckpt_name"][0]
    assert {"tiny.safetensors", "plain.safetensors"} <= set(choices)

    (own,), _ = run(nodes, "CrucibleModel", ckpt_name="tiny.safetensors")
    assert Path(own.path) == checkpoints / "tiny.safetensors"
    assert find_clip_tokenizer_dir(own) == checkpoints / "tiny_tokenizer"  # the one next to the file wins
    (plain,), _ = run(nodes, "CrucibleModel", ckpt_name="plain.safetensors")
    assert find_clip_tokenizer_dir(plain) == comfy.tokenizer_dir  # else ComfyUI's own


# --- training ----------------------------------------------------------------------------------------------------
def train_inputs(nodes, tiny_sd15, run_name: str, **overrides) -> dict:
    (model,), _ = run(nodes, "CrucibleModel", path=str(comfy_stubs.in_models(tiny_sd15)))
    (network,), _ = run(nodes, "CrucibleNetworkOptions", network_dim=4, network_alpha=4.0)
    (optimizer,), _ = run(nodes, "CrucibleOptimizerOptions", learning_rate=1e-3, lr_scheduler="constant")
    (training,), _ = run(nodes, "CrucibleTrainingOptions", seed=3)
    inputs = dict(model=model, dataset=dataset(nodes, SMALL, repeats=1), run_name=run_name, epochs=2, batch_size=2,
                  save_every_n_epochs=1, save_precision="fp32", network=network, optimizer=optimizer,
                  training=training)
    return {**inputs, **overrides}


@pytest.fixture(scope="module")
def trained(nodes, comfy, tiny_sd15, small_input):
    """One real run through the node: 4 images / batch 2 = 2 steps per epoch, 2 epochs."""
    comfy.reset_interrupt()
    comfy.memory_calls.clear()
    outputs, ui = run(nodes, "CrucibleTrain", **train_inputs(nodes, tiny_sd15, "node-run"))
    return outputs, ui, list(comfy.memory_calls), comfy.last_progress()


@pytest.mark.slow  # uses the trained fixture
def test_train_writes_loras_where_loraloader_finds_them(trained, comfy):
    (run_info, _curve, names, steps), ui, _, _ = trained
    folder = comfy.model_dir("loras") / "node-run"
    assert names == ["node-run/node-run-e0001-s000002.safetensors", "node-run/node-run-e0002-s000004.safetensors"]
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [n.split("/")[1] for n in names]
    assert sys.modules["folder_paths"].get_filename_list("loras") == names  # what LoraLoader's list shows
    assert steps == [2, 4]
    assert run_info["kind"] == "lora" and run_info["family"] == "sd15"
    assert [c["name"] for c in run_info["checkpoints"]] == names
    assert Path(run_info["work_dir"]) == comfy.output_dir / "crucible" / "node-run"
    assert (Path(run_info["work_dir"]) / "run.json").is_file()
    assert "2 checkpoints" in ui["text"][0]


@pytest.mark.slow  # uses the trained fixture
def test_train_frees_comfy_memory_and_drives_the_progress_bar(trained):
    (_run, curve, _, _), _, memory_calls, progress = trained
    assert memory_calls[:2] == ["unload_all_models", "soft_empty_cache"]
    values = [value for value, _total, _preview in progress.updates]
    assert values == sorted(values) and progress.updates[-1][:2] == (4, 4)
    preview = progress.updates[-1][2]
    assert preview[0] == "PNG" and preview[1].size == (384, 192)
    assert curve.dtype == torch.float32 and curve.ndim == 4 and curve.shape[0] == 1 and curve.shape[3] == 3
    assert 0.0 <= float(curve.min()) and float(curve.max()) <= 1.0


@pytest.mark.slow  # uses the trained fixture
def test_cancel_saves_a_checkpoint_and_state_then_resume_finishes(nodes, comfy, tiny_sd15, trained):
    inputs = train_inputs(nodes, tiny_sd15, "cancel/resume")  # a '/' in the name becomes '_' on disk
    folder = comfy.model_dir("loras") / "cancel_resume"
    work = comfy.output_dir / "crucible" / "cancel_resume"
    comfy.reset_interrupt(after=1)  # the user presses Cancel during step 1
    with pytest.raises(comfy_stubs.InterruptProcessingException):
        run(nodes, "CrucibleTrain", **inputs)
    assert not comfy.interrupt  # raised through ComfyUI's own call, which clears the flag
    assert [p.name for p in folder.glob("*.safetensors")] == ["cancel_resume-e0001-s000001.safetensors"]
    assert (work / "state").is_dir()
    assert json.loads((work / "run.json").read_text())["status"] == "cancelled"

    comfy.reset_interrupt()
    (run_info, _, names, steps), _ = run(nodes, "CrucibleTrain", **{**inputs, "resume": True})
    assert steps == [1, 2, 4] and len(names) == 3
    manifest = json.loads((work / "run.json").read_text())
    uninterrupted = json.loads((Path(trained[0][0]["work_dir"]) / "run.json").read_text())
    assert manifest["status"] == "finished"
    assert manifest["losses"] == pytest.approx(uninterrupted["losses"], rel=1e-5)


def lora_tensors(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.slow  # uses the trained fixture
def test_cancel_raised_by_comfys_progress_hook_saves_reports_and_resumes_exactly(nodes, comfy, tiny_sd15, trained):
    """ComfyUI's progress hook raises InterruptProcessingException inside the bar update (and clears the flag):
    the run must still save the checkpoint, state/ and run.json at the step reached, say so, then re-raise."""
    inputs = train_inputs(nodes, tiny_sd15, "hook-cancel")
    folder = comfy.model_dir("loras") / "hook-cancel"
    work = comfy.output_dir / "crucible" / "hook-cancel"
    train_cls = nodes["CrucibleTrain"]
    cached_key = train_cls.IS_CHANGED(**inputs)
    comfy.reset_interrupt(at_progress=3)  # Cancel pressed during step 3 of 4: the hook raises at the step-3 update
    comfy.sent.clear()
    with pytest.raises(comfy_stubs.InterruptProcessingException):
        run(nodes, "CrucibleTrain", unique_id="7", **inputs)
    assert not comfy.interrupt  # ComfyUI's hook cleared the flag as it raised
    saved = sorted(p.name for p in folder.glob("*.safetensors"))
    assert saved == ["hook-cancel-e0001-s000002.safetensors", "hook-cancel-e0002-s000003.safetensors"]
    assert json.loads((work / "state" / "state.json").read_text())["step"] == 3 and (work / "state" / "state.pt").is_file()
    manifest = json.loads((work / "run.json").read_text())
    assert manifest["status"] == "cancelled" and [c["step"] for c in manifest["checkpoints"]] == [2, 3]
    # the report reaches the node in the browser although the node raised, and ComfyUI's log has it too
    (event, data, sid), = [m for m in comfy.sent if m[0] == "executed"]
    report = data["output"]["text"][0]
    assert (data["node"], data["prompt_id"], sid) == ("7", "stub-prompt", comfy.client_id)
    assert report.startswith("cancelled at step 3; saved ") and "hook-cancel-e0002-s000003.safetensors" in report
    assert report.endswith("queue again with resume on to continue")
    # ComfyUI must not reuse a result cached before the Cancel: the run's files changed under it
    assert train_cls.IS_CHANGED(**inputs) != cached_key

    comfy.reset_interrupt()
    (run_info, _, names, steps), ui = run(nodes, "CrucibleTrain", **{**inputs, "resume": True})
    assert steps == [2, 3, 4] and "3 checkpoints" in ui["text"][0]
    manifest = json.loads((work / "run.json").read_text())
    uninterrupted = json.loads((Path(trained[0][0]["work_dir"]) / "run.json").read_text())
    assert manifest["status"] == "finished" and manifest["losses"] == uninterrupted["losses"]
    final, reference = lora_tensors(run_info["checkpoints"][-1]["path"]), lora_tensors(trained[0][0]["checkpoints"][-1]["path"])
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[k], reference[k]) for k in final), "the resumed LoRA differs from the uninterrupted one"
    assert train_cls.IS_CHANGED(**inputs) == train_cls.IS_CHANGED(**inputs)  # stable again: finished runs are cached


@pytest.mark.slow
def test_cancel_during_the_last_step_keeps_the_finished_run_and_still_stops_the_prompt(nodes, comfy, tiny_sd15,
                                                                                     small_input):
    inputs = train_inputs(nodes, tiny_sd15, "last-cancel", epochs=1)
    comfy.reset_interrupt(at_progress=2)  # step 2 is the last
    comfy.sent.clear()
    with pytest.raises(comfy_stubs.InterruptProcessingException):
        run(nodes, "CrucibleTrain", unique_id="3", **inputs)
    work = comfy.output_dir / "crucible" / "last-cancel"
    assert json.loads((work / "run.json").read_text())["status"] == "finished"
    report = next(d for e, d, _ in comfy.sent if e == "executed")["output"]["text"][0]
    assert report.startswith("cancelled after the last step 2: the run is complete; saved ")
    comfy.reset_interrupt()
    (_run, _, _, steps), _ = run(nodes, "CrucibleTrain", **{**inputs, "resume": True})
    assert steps == [2]  # nothing left to train: the saved run is passed on


def test_show_report_sends_the_executed_message_only_to_the_client_that_queued(comfy, pack):
    comfy_module = sys.modules[f"{comfy_stubs.PACK_NAME}.nodes._comfy"]
    comfy.sent.clear()
    assert comfy_module.show_report("12", "cancelled at step 1; …")
    assert comfy.sent == [("executed", {"node": "12", "display_node": "12", "output": {"text": ["cancelled at step 1; …"]},
                                        "prompt_id": "stub-prompt"}, comfy.client_id)]
    saved, comfy.client_id = comfy.client_id, None  # a prompt posted without a client id: ComfyUI sends no UI output
    try:
        assert not comfy_module.show_report("12", "x") and not comfy_module.show_report(None, "x")
    finally:
        comfy.client_id = saved
    assert len(comfy.sent) == 1


class LoadSpy:
    """Weak references to every denoiser and text encoder the sd15 family loads."""

    def __init__(self, monkeypatch):
        import weakref

        from trainer.families import get_family

        cls = type(get_family("sd15"))
        real = cls.load
        self.refs: list = []

        def load(family, *args, **kwargs):
            comps = real(family, *args, **kwargs)
            self.refs += [weakref.ref(m) for m in (comps.denoiser, *comps.text_encoders)]
            return comps

        monkeypatch.setattr(cls, "load", load)

    def alive(self) -> int:
        count = sum(ref() is not None for ref in self.refs)
        self.refs.clear()
        return count


@pytest.mark.slow
def test_train_node_hands_every_model_back_when_it_returns_fails_or_is_cancelled(nodes, comfy, tiny_sd15,
                                                                               small_input, monkeypatch):
    """bf16 (accelerate wraps forward in a cycle) and the text cache (a closure back to the trainer) make the worst
    case; no test-side gc.collect(): the node itself must leave nothing behind."""
    from trainer.loop import Trainer

    spy = LoadSpy(monkeypatch)
    (training,), _ = run(nodes, "CrucibleTrainingOptions", seed=3, mixed_precision="bf16",
                         cache_text_embeddings=True, ema=True)
    inputs = train_inputs(nodes, tiny_sd15, "memory-run", epochs=1, training=training)
    comfy.reset_interrupt()
    run(nodes, "CrucibleTrain", **inputs)
    assert spy.alive() == 0, "models outlive a finished run"

    comfy.reset_interrupt(at_progress=1)
    with pytest.raises(comfy_stubs.InterruptProcessingException) as cancelled:
        run(nodes, "CrucibleTrain", **inputs)
    assert spy.alive() == 0, "models outlive a cancelled run (ComfyUI keeps the exception while it reports it)"
    del cancelled

    def broken_save(self, *args, **kwargs):
        raise OSError("disk went away")

    monkeypatch.setattr(Trainer, "_save", broken_save)
    comfy.reset_interrupt()
    with pytest.raises(OSError, match="disk went away") as failed:
        run(nodes, "CrucibleTrain", **inputs)
    assert spy.alive() == 0, "models outlive a failed run (the traceback's frames hold them)"
    assert "broken_save" in "".join(__import__("traceback").format_exception(failed.value))  # still readable


@pytest.mark.slow
def test_validation_dataset_input_scores_every_checkpoint_and_the_sweep_marks_the_best(nodes, comfy, tiny_sd15,
                                                                                       small_input):
    from trainer.render import BEST_MARK

    comfy.reset_interrupt()
    inputs = train_inputs(nodes, tiny_sd15, "node-val", validation_dataset=dataset(nodes, SMALL, repeats=1))
    (run_info, _curve, _names, _steps), ui = run(nodes, "CrucibleTrain", **inputs)
    vals = [c["val_loss"] for c in run_info["checkpoints"]]
    assert len(vals) == 2 and all(isinstance(v, float) for v in vals)
    assert all(set(c["val_loss_t"]) == {"0.25", "0.50", "0.75", "1.00"} for c in run_info["checkpoints"])
    best = run_info["checkpoints"][vals.index(min(vals))]
    assert f"recommended: {Path(best['path']).name}" in ui["text"][0]
    for source in ({"run": run_info}, {"folder": "loras/node-val"}):  # the run output, or the files' metadata
        out = sweep(nodes, seeds="1", strengths="1.0", **source)
        labels = dict(zip(out["column"], out["label"]))
        assert [labels[c].endswith(BEST_MARK) for c in (1, 2)] == [v == min(vals) for v in vals]
        assert all(f"val {v:.4f}" in labels[c] for c, v in zip((1, 2), vals))


# --- sweep -------------------------------------------------------------------------------------------------------
BASE_MODEL, BASE_CLIP = "base MODEL", "base CLIP"


def sweep(nodes, **inputs):
    values = dict(model=BASE_MODEL, clip=BASE_CLIP, folder=FROM_RUN, prompts="a red circle\na blue square",
                  seeds="1, 2", strengths="0.5, 1.0")
    return dict(zip(nodes["CrucibleCheckpointSweep"].RETURN_NAMES,
                    run(nodes, "CrucibleCheckpointSweep", **{**values, **inputs})[0]))


@pytest.mark.slow  # uses the trained fixture
def test_sweep_from_the_run_output(nodes, comfy, trained):
    run_info = trained[0][0]
    comfy.lora_calls.clear()
    out = sweep(nodes, run=run_info)
    columns, rows = 3, 2 * 2 * 2  # base + 2 checkpoints; prompts x seeds x strengths
    assert {len(v) for v in out.values()} == {columns * rows}
    assert sorted(set(out["column"])) == [0, 1, 2] and sorted(set(out["row"])) == list(range(rows))
    labels = {c: l for c, l in zip(out["column"], out["label"])}
    assert labels[0] == "base" and labels[1].startswith("step 2") and labels[2].startswith("step 4")
    expected_rows = [(p, s, w) for p in ("a red circle", "a blue square") for s in (1, 2) for w in (0.5, 1.0)]
    paths = {c["step"]: c["path"] for c in run_info["checkpoints"]}
    for model, clip, prompt, seed, col, row in zip(out["model"], out["clip"], out["prompt"], out["seed"],
                                                   out["column"], out["row"]):
        want_prompt, want_seed, strength = expected_rows[row]
        assert (prompt, seed) == (want_prompt, want_seed)
        if col == 0:
            assert (model, clip) == (BASE_MODEL, BASE_CLIP)
        else:
            step = 2 if col == 1 else 4
            assert model == comfy_stubs.Patched(BASE_MODEL, paths[step], strength)
            assert clip == comfy_stubs.Patched(BASE_CLIP, paths[step], strength)
    assert len(comfy.lora_calls) == 4  # each (checkpoint, strength) patched once, then reused
    first = out["row_label"][out["row"].index(0)]  # row labels name the prompt, and the seed and strength that vary
    assert first.startswith("a red circle") and "seed 1" in first and "0.5" in first


@pytest.mark.slow  # uses the trained fixture
def test_sweep_a_lora_folder_and_notice_new_files(nodes, comfy, trained):
    sweep_cls = nodes["CrucibleCheckpointSweep"]
    assert "loras/node-run" in sweep_cls.INPUT_TYPES()["required"]["folder"][0]
    out = sweep(nodes, folder="loras/node-run", seeds="5", strengths="1.0", every_nth=2)
    assert sorted(set(zip(out["column"], out["label"]))) == [(0, "base"), (1, "step 2 · ep 1"), (2, "step 4 · ep 2")]
    before = sweep_cls.IS_CHANGED(folder="loras/node-run", model=BASE_MODEL)
    extra = comfy.model_dir("loras") / "node-run" / "extra.safetensors"
    shutil.copy(Path(trained[0][0]["checkpoints"][0]["path"]), extra)
    try:
        assert sweep_cls.IS_CHANGED(folder="loras/node-run", model=BASE_MODEL) != before
    finally:
        extra.unlink()
    with pytest.raises(CrucibleError, match="connect a run"):
        sweep(nodes)
    with pytest.raises(CrucibleError, match="prompts"):
        sweep(nodes, folder="loras/node-run", prompts=" \n ")


def test_sweep_full_finetunes_loads_them_with_comfys_diffusion_loader(nodes, comfy, pack):
    from trainer.fileio import save_safetensors

    comfy_module = sys.modules[f"{comfy_stubs.PACK_NAME}.nodes._comfy"]
    folder = comfy_module.model_folder("diffusion_models") / "full-run"
    assert folder == comfy.model_dir("diffusion_models") / "full-run"  # not the legacy models/unet
    for step in (20, 10):
        save_safetensors(folder / f"full-{step}.safetensors", {"w": torch.zeros(2)}, {"crucible_step": str(step)})
    comfy.diffusion_calls.clear()
    out = sweep(nodes, folder="diffusion_models/full-run", prompts="p", seeds="1", strengths="1.0")
    assert out["label"] == ["base", "step 10", "step 20"]
    assert out["model"][0] == BASE_MODEL
    assert out["model"][1:] == [comfy_stubs.LoadedDiffusionModel(str(folder / f"full-{s}.safetensors")) for s in (10, 20)]
    assert out["clip"] == [BASE_CLIP] * 3
    assert comfy.diffusion_calls == [str(folder / "full-10.safetensors"), str(folder / "full-20.safetensors")]


def test_sweep_full_checkpoints_are_patches_read_from_their_files_when_rendered(nodes, comfy, pack, caplog):
    """A sweep's list of MODELs must not hold the checkpoints: each is a clone of the base MODEL (sharing its
    weights) whose patches name tensors in the file, read only when ComfyUI applies them for sampling."""
    from trainer.fileio import save_safetensors

    comfy_module = sys.modules[f"{comfy_stubs.PACK_NAME}.nodes._comfy"]
    names = {"conv_in.weight": "input_blocks.0.0.weight", "mid_block.resnets.0.norm1.bias": "middle_block.0.in_layers.0.bias"}
    base = comfy_stubs.StubModelPatcher(comfy_stubs.StubBaseModel(
        {"input_blocks.0.0.weight": torch.zeros(2, 3), "middle_block.0.in_layers.0.bias": torch.zeros(4),
         "out.2.weight": torch.ones(2)}, names))
    folder = comfy_module.model_folder("diffusion_models") / "lazy-run"
    files = {}
    for step in (10, 20, 30):
        files[step] = {"conv_in.weight": torch.full((2, 3), float(step)), "mid_block.resnets.0.norm1.bias": torch.arange(4.0) + step}
        save_safetensors(folder / f"lazy-{step}.safetensors", files[step], {"crucible_step": str(step)})
    comfy.diffusion_calls.clear()
    out = sweep(nodes, model=base, folder="diffusion_models/lazy-run", prompts="p", seeds="1", strengths="1.0")
    assert out["label"] == ["base", "step 10", "step 20", "step 30"] and out["model"][0] is base
    assert comfy.diffusion_calls == []  # no checkpoint was loaded whole
    for step, model in zip((10, 20, 30), out["model"][1:]):
        assert model.model is base.model  # a clone: the base weights are shared, not copied
        values = [p[1] for patches in model.patches.values() for p in patches]
        assert len(values) == 2 and all(isinstance(v, comfy_module.FileWeight) for v in values)
        assert not any(isinstance(x, torch.Tensor) for v in values for x in tuple.__iter__(v))  # no data held
        patched = model.patched_weights()  # what ComfyUI computes when it loads the model for sampling
        assert torch.equal(patched["diffusion_model.input_blocks.0.0.weight"], files[step]["conv_in.weight"])
        assert torch.equal(patched["diffusion_model.middle_block.0.in_layers.0.bias"], files[step]["mid_block.resnets.0.norm1.bias"])
        assert torch.equal(patched["diffusion_model.out.2.weight"], torch.ones(2))  # not in the file: untouched
    assert base.patches == {} and torch.equal(base.model.weights["diffusion_model.input_blocks.0.0.weight"], torch.zeros(2, 3))

    wrong = comfy_stubs.StubModelPatcher(comfy_stubs.StubBaseModel({"input_blocks.0.0.weight": torch.zeros(5)}, names))
    comfy.diffusion_calls.clear()
    with caplog.at_level("WARNING"):
        out = sweep(nodes, model=wrong, folder="diffusion_models/lazy-run", prompts="p", seeds="1", strengths="1.0")
    assert len(comfy.diffusion_calls) == 3  # another architecture: ComfyUI's own loader, as before
    assert "do not fit" in caplog.text and "Connect the base model" in caplog.text


# --- image grid --------------------------------------------------------------------------------------------------
def colour(i: int) -> tuple[int, int, int]:
    return (40 * (i % 6), 255 - 30 * (i % 8), 90 + 20 * (i % 5))


def solid(rgb, size: int = 16) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).div(255).expand(1, size, size, 3).clone()


def grid(nodes, images, **inputs):
    """Call the grid as ComfyUI does for an INPUT_IS_LIST node: every input is a list."""
    values = {name: [value] for name, value in defaults(nodes["CrucibleImageGrid"]).items()}
    values.update({name: value for name, value in inputs.items()})
    cls = nodes["CrucibleImageGrid"]
    out = getattr(cls(), cls.FUNCTION)(images=images, **values)
    return out["result"][0], out["ui"]


@pytest.mark.slow  # uses the trained fixture
def test_image_grid_lays_out_a_sweep_and_saves_its_layout(nodes, comfy, trained):
    from trainer.render import read_layout

    out = sweep(nodes, run=trained[0][0])
    images = [solid(colour(i)) for i in range(len(out["label"]))]
    image, ui = grid(nodes, images, title=["sweep"], font_size=[10], padding=[4], filename_prefix=["crucible/test"],
                     labels=out["label"], columns=out["column"], rows=out["row"], row_labels=out["row_label"])
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[3] == 3
    (saved,) = ui["images"]
    assert saved["type"] == "output" and saved["subfolder"] == "crucible" and saved["filename"].startswith("test_")
    png = comfy.output_dir / saved["subfolder"] / saved["filename"]
    layout = read_layout(png)
    assert (layout["cols"], layout["rows"]) == (3, 8) and layout["title"] == "sweep"
    assert layout["col_labels"][0] == "base" and layout["col_labels"][2].startswith("step 4")
    assert layout["row_labels"][0] == out["row_label"][0]
    assert layout["size"] == [image.shape[2], image.shape[1]]
    for i in (0, 5, len(images) - 1):  # each picture landed in its own cell
        cell = next(c for c in layout["cells"] if (c["row"], c["col"]) == (out["row"][i], out["column"][i]))
        x0, y0, x1, y1 = cell["image_box"]
        pixel = (image[0, (y0 + y1) // 2, (x0 + x1) // 2] * 255).round().int().tolist()
        assert pixel == list(colour(i))


def test_image_grid_strip_from_one_batch_without_saving(nodes, comfy):
    before = set(comfy.output_dir.rglob("*.png"))
    batch = torch.cat([solid((255, 0, 0)), solid((0, 255, 0)), solid((0, 0, 255))])
    image, ui = grid(nodes, [batch], save=[False], padding=[0], title=[""])
    assert ui == {} and set(comfy.output_dir.rglob("*.png")) == before
    assert image.shape[2] == 3 * 16 and image.shape[1] >= 16
    with pytest.raises(CrucibleError, match="column"):
        grid(nodes, [batch], columns=[0, 1], rows=[0, 0, 0])
    with pytest.raises(CrucibleError, match="no images"):
        grid(nodes, [])


# --- SD3 / Flux from ComfyUI's split files --------------------------------------------------------------------------
@pytest.mark.slow
def test_split_model_node_picks_comfyui_files_and_trains_flux(nodes, comfy, small_input, tmp_path_factory):
    from tiny_flow import build_tiny_flow_model

    tiny = build_tiny_flow_model(tmp_path_factory.mktemp("flux"), "flux")
    shutil.copytree(tiny.comfy_root / "comfy", comfy.base / "comfy", dirs_exist_ok=True)  # ComfyUI's tokenizers
    targets = {"diffusion_models": [tiny.transformer_file], "text_encoders": list(tiny.text_encoder_files),
               "vae": [tiny.vae_file]}
    for kind, files in targets.items():
        folder = comfy.models_dir / kind
        folder.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy(f, folder / f.name)
    names = {kind: [f.name for f in files] for kind, files in targets.items()}
    assert set(names["diffusion_models"]) <= set(nodes["CrucibleSplitModel"].INPUT_TYPES()["required"]["unet_name"][0])
    (model,), _ = run(nodes, "CrucibleSplitModel", family="flux", unet_name=names["diffusion_models"][0],
                      clip_name1=names["text_encoders"][0], clip_name2=names["text_encoders"][1],
                      vae_name=names["vae"][0])
    assert model.family == "flux" and len(model.text_encoder_paths) == 2 and model.vae_path
    (fp8,), _ = run(nodes, "CrucibleSplitModel", family="flux", unet_name=names["diffusion_models"][0],
                    clip_name1=names["text_encoders"][0], vae_name=names["vae"][0], fp8_base=True)
    assert fp8.fp8_base and not model.fp8_base  # kohya --fp8_base, an appended widget (issue #16)
    comfy.reset_interrupt()
    (network,), _ = run(nodes, "CrucibleNetworkOptions", network_dim=4, network_alpha=4.0)
    outputs, _ = run(nodes, "CrucibleTrain", model=model, dataset=dataset(nodes, SMALL, repeats=1), run_name="flux-run",
                     epochs=1, batch_size=2, network=network)
    run_info, _curve, ckpt_names, steps = outputs
    assert run_info["family"] == "flux" and steps == [2]
    assert ckpt_names[0].startswith("flux-run/") and (comfy.models_dir / "loras" / ckpt_names[0]).is_file()
    with pytest.raises(Exception, match="unet_name"):
        run(nodes, "CrucibleSplitModel", family="flux")


def test_model_paths_outside_comfyui_folders_are_refused(nodes, tiny_sd15):
    from trainer.errors import UnsafePathError

    with pytest.raises(UnsafePathError, match="model path"):
        run(nodes, "CrucibleModel", path=str(tiny_sd15))  # a /prompt request cannot point the server anywhere
    with pytest.raises(UnsafePathError, match="model path"):
        run(nodes, "CrucibleSplitModel", family="flux", path="/etc")


@pytest.mark.slow
def test_train_renders_preview_samples_into_the_progress_bar(nodes, comfy, tiny_sd15, small_input):
    comfy.reset_interrupt()
    inputs = train_inputs(nodes, tiny_sd15, "sampled-run", epochs=1, sample_prompts="crucible, red circle\nblue square",
                          sample_every_n_epochs=1)
    (run_info, _curve, _names, _steps), _ = run(nodes, "CrucibleTrain", **inputs)
    previews = [p for _v, _t, p in comfy.last_progress().updates if p is not None and p[1].size == (64, 64)]
    assert previews, "the sample render never reached ComfyUI's progress-bar preview"
    samples = sorted((Path(run_info["work_dir"]) / "samples").glob("*.png"))
    assert [s.name for s in samples] == ["sampled-run-s000002-p0.png", "sampled-run-s000002-p1.png"]


def test_caption_preview_follows_the_text_cache(nodes, demo_input):
    from trainer.cache import TextCache
    from trainer.dataset import DataSource

    (training,), _ = run(nodes, "CrucibleTrainingOptions", seed=3, cache_text_embeddings=True, caption_variants=2)
    (options,), _ = run(nodes, "CrucibleCaptionOptions", shuffle_caption=True)
    data = dataset(nodes, captions=options)
    (text,), _ = run(nodes, "CrucibleCaptionPreview", dataset=data, images="0", epochs=3, seed=3, training=training)
    cache = TextCache(DataSource(data, seed=3), 2, encode=None)
    assert text.splitlines()[1:] == [f"#0 epoch {e}: {cache.caption_for(0, e, 0)}" for e in (1, 2, 3)]
    assert all(line.split(": ", 1)[1] in cache.variant_texts(0) for line in text.splitlines()[1:])


def test_training_options_node_defaults_to_auto_and_keeps_explicit_choices(nodes):
    """Issue 16: auto precision, per-family checkpointing; the old toggle keeps its position and meaning when on."""
    (auto,), _ = run(nodes, "CrucibleTrainingOptions")
    assert auto.mixed_precision == "auto" and auto.gradient_checkpointing is None
    (on,), _ = run(nodes, "CrucibleTrainingOptions", gradient_checkpointing=True)
    assert on.gradient_checkpointing is True  # a saved workflow with the toggle on stays on (any family)
    (off,), _ = run(nodes, "CrucibleTrainingOptions", gradient_checkpointing_when_off="off")
    assert off.gradient_checkpointing is False
    spec = nodes["CrucibleTrainingOptions"].INPUT_TYPES()
    assert "gradient_checkpointing_when_off" in spec["optional"]  # appended: saved widget positions unchanged


def test_training_options_node_leaves_the_caches_to_the_family_unless_told(nodes):
    """Issue 16: the cache toggles keep their positions and BOOLEAN type; off + 'family default' (the appended
    caches_when_off) is the fields' None, which SD3 and Flux resolve to on (trainer.defaults)."""
    (auto,), _ = run(nodes, "CrucibleTrainingOptions")
    assert auto.cache_latents is None and auto.cache_text_embeddings is None
    (on,), _ = run(nodes, "CrucibleTrainingOptions", cache_latents=True, caches_when_off="off")
    assert on.cache_latents is True and on.cache_text_embeddings is False
    (off,), _ = run(nodes, "CrucibleTrainingOptions", caches_when_off="off")
    assert off.cache_latents is False and off.cache_text_embeddings is False
    spec = nodes["CrucibleTrainingOptions"].INPUT_TYPES()
    assert list(spec["optional"]).index("caches_when_off") == 4  # appended: saved widget positions unchanged
    assert spec["required"]["cache_latents"][0] == "BOOLEAN" and spec["required"]["cache_latents"][1]["default"] is False


def test_training_options_node_switches_release_encoders(nodes):
    """Issue 16: training.release_encoders on the node, an appended optional combo; a saved workflow without it
    keeps the config default (free after caching)."""
    (default,), _ = run(nodes, "CrucibleTrainingOptions")
    assert default.release_encoders is True
    (kept,), _ = run(nodes, "CrucibleTrainingOptions", release_encoders="keep in RAM")
    assert kept.release_encoders is False
    (freed,), _ = run(nodes, "CrucibleTrainingOptions", release_encoders="free after caching")
    assert freed.release_encoders is True
    optional = nodes["CrucibleTrainingOptions"].INPUT_TYPES()["optional"]
    assert list(optional).index("release_encoders") == list(optional).index("caches_when_off") + 1
    assert optional["release_encoders"][0] == ["free after caching", "keep in RAM"]
    assert optional["release_encoders"][1]["default"] == "free after caching"


def test_caption_preview_says_when_the_text_cache_is_left_to_the_family(nodes, demo_input):
    from trainer.cache import TextCache
    from trainer.config import TrainingConfig
    from trainer.dataset import DataSource
    from trainer.preview_captions import caption_preview

    (options,), _ = run(nodes, "CrucibleCaptionOptions", shuffle_caption=True)
    data = dataset(nodes, captions=options)
    (text,), _ = run(nodes, "CrucibleCaptionPreview", dataset=data, images="0", epochs=2, seed=3)
    assert text.splitlines()[0].startswith("(text cache left to the family: SD3 and Flux runs cache")
    flux = caption_preview(data, "0", 2, 3, TrainingConfig(seed=3, caption_variants=2), family="flux")
    cache = TextCache(DataSource(data, seed=3), 2, encode=None)
    assert flux.text_cache_variants == 2 and [r.caption for r in flux.rows] == [cache.caption_for(0, e, 0) for e in (1, 2)]
    sd15 = caption_preview(data, "0", 2, 3, TrainingConfig(seed=3), family="sd15")
    assert sd15.text_cache_variants == 0 and not sd15.note


def test_step_plan_shows_the_memory_estimate_when_the_model_is_connected(nodes, demo_input):
    """Issue 16: the Step Plan node tells the user the estimated peak memory before training."""
    from trainer.config import ModelConfig

    data = dataset(nodes, demo_input)
    (plain,), _ = run(nodes, "CrucibleStepPlan", dataset=data)
    assert "estimated peak memory" not in plain
    (training,), _ = run(nodes, "CrucibleTrainingOptions", cache_latents=True)
    (text,), _ = run(nodes, "CrucibleStepPlan", dataset=data, model=ModelConfig(family="sd15"), training=training)
    assert "estimated peak memory" in text and "sd15 lora at 64 px" in text and "bf16" in text
    assert "device memory: unknown" in text  # no CUDA device in the tests


def test_step_plan_counts_the_previews_of_a_plan_that_samples(nodes, demo_input):
    """The Step Plan does not see the Train node's preview prompts: a plan that samples is estimated with its
    previews (the VAE back for each decode), as the MODEL path's is; one that does not, without. Counted only when
    the previews are the largest phase: SD1.5 at 1024 px with every cache on and lean steps."""
    from trainer.config import ModelConfig

    data = run(nodes, "CrucibleDataset", path=demo_input, resolution=1024)[0][0]
    (training,), _ = run(nodes, "CrucibleTrainingOptions", cache_latents=True, cache_text_embeddings=True,
                         gradient_checkpointing=True)
    plans = {}
    for every in (0, 2):
        (plans[every],), _ = run(nodes, "CrucibleStepPlan", dataset=data, model=ModelConfig(family="sd15"),
                                 training=training, batch_size=1, sample_every_n_epochs=every)
    assert "previews peak" not in plans[0] and "previews peak" in plans[2], plans[2]


def test_progress_bar_counts_the_images_cached_before_step_1(nodes):
    comfy_module = sys.modules[f"{comfy_stubs.PACK_NAME}.nodes._comfy"]
    progress = comfy_module.ComfyProgress(total=1)
    progress.on_prepare(3, 10, "caching latents")
    assert (progress.bar.current, progress.bar.total) == (3, 10)
