"""A ``/prompt`` request must not read files outside ComfyUI's folders, nor stop the queue (issue 13).

Node-level tests run the pack through the stub ComfyUI (``comfy_stubs``), the way a real server calls it, with the
values a hostile request can send: a caption extension that is a path, literal JSON where a node's output belongs
(ComfyUI 0.8.0 passes it through), a forged run record for the sweep, strings with lone surrogates, 5,000-character
names and bad numbers. A marker file outside every allowed folder must never be read into any output.
The real-server version of these cases is ``tests/comfyui_e2e/checks_hostile.py``.
"""
from __future__ import annotations

import io
import logging
import shutil
import sys
from pathlib import Path

import pytest

import comfy_stubs
from trainer.config import (CaptionConfig, DatasetConfig, ModelConfig, NetworkConfig, OptimConfig, TrainConfig,
                            TrainingConfig)
from trainer.config_checks import validate
from trainer import errors, fileio
from trainer.errors import ConfigError, CrucibleError, UnsafePathError

SECRET = "crucible-secret-marker-7c1e"  # the content of files outside every allowed folder


# --- fixtures --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pack(nodes):
    return lambda name: sys.modules[f"{comfy_stubs.PACK_NAME}.nodes.{name}"]


@pytest.fixture(scope="module")
def outside(comfy, demo_dataset) -> Path:
    """Beside the ComfyUI tree (outside every allowed folder): a secret text file, a LoRA-named file and a dataset."""
    folder = comfy.base.parent / "private"
    folder.mkdir()
    (folder / "secret.txt").write_text(SECRET, encoding="utf-8")
    (folder / "secret.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    shutil.copytree(demo_dataset, folder / "dataset")
    return folder


@pytest.fixture(scope="module")
def small(comfy, demo_dataset) -> str:
    """Two demo images (with captions) in ComfyUI's input folder."""
    return comfy_stubs.demo_images_in_input(comfy.input_dir, demo_dataset, 2)


node_defaults, run_node = comfy_stubs.node_defaults, comfy_stubs.run_node


def no_secret(*values) -> None:
    for value in values:
        assert SECRET not in repr(value), "a file outside the allowed folders was read into the output"


# --- 1. caption_extension is not a path ----------------------------------------------------------------------------
def test_caption_extension_is_a_plain_suffix():
    assert fileio.caption_suffix(".txt") == ".txt" and fileio.caption_suffix("caption") == ".caption"
    assert fileio.caption_suffix(".wd14.txt") == ".wd14.txt" and fileio.caption_suffix("") == ".txt"
    for bad in [".d/../../../../etc/passwd", "/etc/passwd", "..", "../x", ".t\\x", ".txt\x00", ". txt", ".a..b",
                "." + "x" * 40, 3]:
        with pytest.raises(ConfigError, match="caption_extension"):
            fileio.caption_suffix(bad)
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.caption_extension"):
        validate(TrainConfig(datasets=(DatasetConfig(path="x", caption_extension=".d/../secret.txt"),)))


def test_a_caption_extension_cannot_read_a_file_outside_the_dataset(nodes, comfy, outside, demo_dataset):
    """The issue's exploit: image a.png, a folder a.d beside it (both uploadable), caption_extension climbing out."""
    folder = comfy.input_dir / "capx"
    folder.mkdir()
    shutil.copy(next(demo_dataset.rglob("*.png")), folder / "a.png")
    (folder / "a.d").mkdir()
    climb = "/".join([".."] * (len(folder.parts) + 2))
    ext = f".d/{climb}{outside / 'secret'}.txt"
    assert (folder / ("a" + ext)).resolve() == (outside / "secret.txt").resolve()  # the path really reaches it
    with pytest.raises(ConfigError, match="caption_extension") as refused:
        run_node(nodes, "CrucibleDataset", path="capx", resolution=64, caption_extension=ext)
    no_secret(str(refused.value))


def test_every_file_a_scan_reads_stays_inside_the_allowed_folders(tmp_path, outside, demo_dataset):
    """Under a read policy the trainer itself refuses a caption file or an image that links outside."""
    from trainer.dataset import scan_dataset

    data = tmp_path / "data"
    shutil.copytree(demo_dataset, data)
    concept = next(p for p in data.iterdir() if p.is_dir())
    caption = sorted(concept.glob("*.txt"))[0]
    caption.unlink()
    caption.symlink_to(outside / "secret.txt")
    policy = fileio.ReadPolicy(data=(tmp_path,), models=())
    with fileio.read_policy(policy), pytest.raises(UnsafePathError, match="caption file"):
        scan_dataset(DatasetConfig(path=str(data)))
    caption.unlink()
    image = sorted(concept.glob("*.png"))[0]
    image.unlink()
    image.symlink_to(next((outside / "dataset").rglob("*.png")))
    with fileio.read_policy(policy), pytest.raises(UnsafePathError, match="dataset image"):
        scan_dataset(DatasetConfig(path=str(data)))
    with fileio.read_policy(policy), pytest.raises(UnsafePathError, match="dataset folder"):
        scan_dataset(DatasetConfig(path=str(outside / "dataset")))
    assert scan_dataset(DatasetConfig(path=str(data))).items  # headless use: no policy, links are the user's own


# --- 2. forged custom-type inputs ----------------------------------------------------------------------------------
def genuine(pack) -> dict:
    """A real value of every custom socket type, as the producing node returns it."""
    s = pack("_sockets")
    return {s.MODEL: ModelConfig(), s.DATASET: (DatasetConfig(),), s.CAPTIONS: CaptionConfig(),
            s.NETWORK: NetworkConfig(), s.OPTIM: OptimConfig(), s.TRAINING: TrainingConfig(), s.RUN: s.RunRecord()}


FORGERIES = [{"family": "sd15", "path": "/etc/passwd"}, [{"path": "/etc"}], "/etc/passwd", 7, None]


def custom_inputs(cls, sockets) -> list[tuple[str, str, bool]]:
    spec = cls.INPUT_TYPES()
    return [(name, entry[0], group == "required") for group in ("required", "optional")
            for name, entry in spec.get(group, {}).items() if isinstance(entry[0], str) and entry[0] in sockets]


def test_every_custom_typed_input_of_every_node_refuses_a_forged_value(nodes, pack):
    real = genuine(pack)
    checked = 0
    for node_id, cls in nodes.items():
        inputs = custom_inputs(cls, real)
        base = {**node_defaults(cls), **{name: real[kind] for name, kind, _ in inputs}}
        for name, kind, required in inputs:
            for forged in FORGERIES:
                if forged is None and not required:
                    continue  # an unconnected optional input is fine
                with pytest.raises(CrucibleError, match=f"input '{name}' is not a .* output.*connect a"):
                    getattr(cls(), cls.FUNCTION)(**{**base, name: forged})
                checked += 1
    assert checked >= 40, checked  # Train (6 inputs), Preview, Plan, Dataset, Sweep: every one covered


def test_forged_model_and_dataset_never_train_on_outside_files(nodes, comfy, outside, small, tiny_sd15):
    (model,) = run_node(nodes, "CrucibleModel", path=str(comfy_stubs.in_models(tiny_sd15)))
    (dataset, _report) = run_node(nodes, "CrucibleDataset", path=small, resolution=64)
    train = dict(epochs=1, batch_size=1, run_name="forged")
    with pytest.raises(CrucibleError, match="input 'model' is not a Crucible Model output"):
        run_node(nodes, "CrucibleTrain", model={"family": "sd15", "path": str(tiny_sd15)}, dataset=dataset, **train)
    with pytest.raises(CrucibleError, match="input 'dataset' is not a Crucible Dataset output"):
        run_node(nodes, "CrucibleTrain", model=model, dataset=[{"path": str(outside / "dataset")}], **train)
    for node in ("CrucibleStepPlan", "CrucibleCaptionPreview"):  # crashed with AttributeError before
        with pytest.raises(CrucibleError, match="input 'dataset' is not a Crucible Dataset output"):
            run_node(nodes, node, dataset=[{"path": str(outside / "dataset")}])
    assert not list(comfy.model_dir("loras").glob("forged*"))


def test_the_trainer_confines_paths_it_uses_even_in_genuine_configs(nodes, comfy, outside, small, tiny_sd15):
    """A config built by other code than the nodes (a genuine dataclass) still cannot reach outside: the dataset scan
    and the model loader check every path against the read policy the node runs under."""
    (model,) = run_node(nodes, "CrucibleModel", path=str(comfy_stubs.in_models(tiny_sd15)))
    (dataset, _report) = run_node(nodes, "CrucibleDataset", path=small, resolution=64)
    train = dict(epochs=1, batch_size=1, run_name="confined")
    for node, inputs in [("CrucibleStepPlan", {}), ("CrucibleCaptionPreview", {}),
                         ("CrucibleTrain", dict(model=model, **train))]:
        with pytest.raises(UnsafePathError, match="outside the allowed folders"):
            run_node(nodes, node, dataset=(DatasetConfig(path=str(outside / "dataset"), resolution=64),), **inputs)
    with pytest.raises(UnsafePathError, match="model.path .* outside the allowed folders"):
        run_node(nodes, "CrucibleTrain", model=ModelConfig(path=str(tiny_sd15)), dataset=dataset, **train)
    with pytest.raises(UnsafePathError, match="model.vae_path"):
        run_node(nodes, "CrucibleTrain", model=ModelConfig(path=model.path, vae_path=str(outside / "secret.txt")),
                 dataset=dataset, **train)
    assert not list(comfy.model_dir("loras").glob("confined*"))


def test_model_loading_checks_every_path_under_a_policy(outside):
    from trainer.families import get_family

    for family in ("sd15", "sdxl", "sd3", "flux"):
        with fileio.read_policy(fileio.ReadPolicy(data=(), models=(outside / "nowhere",))):
            with pytest.raises(UnsafePathError, match="model.text_encoder_paths"):
                get_family(family).load(ModelConfig(family=family, text_encoder_paths=(str(outside / "secret.txt"),)))


# --- 3. a forged run for the sweep ---------------------------------------------------------------------------------
def sweep(nodes, **inputs):
    return run_node(nodes, "CrucibleCheckpointSweep", model="MODEL", clip="CLIP", **inputs)


def test_a_forged_run_never_opens_a_file(nodes, comfy, pack, outside):
    comfy.loaded_files.clear()
    forged = {"kind": "lora", "checkpoints": [{"path": str(outside / "secret.safetensors")}, {"path": "/etc/passwd"}]}
    with pytest.raises(CrucibleError, match="input 'run' is not a Crucible Train output"):
        sweep(nodes, run=forged)
    record = pack("_sockets").RunRecord
    cases = [
        (record(forged), "outside the allowed folders"),
        (record(kind="lora", checkpoints=[{"path": "/etc/passwd"}]), "not a .safetensors file"),
        (record(kind="lora", checkpoints=[]), "has no checkpoints"),
        (record(kind="lora"), "has no checkpoints"),
        (record(kind="lora", checkpoints=["x"]), "not a checkpoint record"),
        (record(kind="lora", checkpoints=[{"name": "x"}]), "has no file path"),
        (record(kind="lora", checkpoints=[{"path": str(comfy.model_dir("loras") / "gone.safetensors")}]),
         "does not exist"),
    ]
    for run, message in cases:
        with pytest.raises(CrucibleError, match=message):
            sweep(nodes, run=run)
    assert comfy.loaded_files == [] and comfy.diffusion_calls == []


def test_checkpoint_loading_itself_is_confined_to_the_model_folders(pack, comfy, outside):
    _comfy = pack("_comfy")
    for load in (lambda p: _comfy.apply_lora("M", "C", p, 1.0), _comfy.load_diffusion_model):
        with pytest.raises(UnsafePathError):
            load(outside / "secret.safetensors")
    assert comfy.loaded_files == [] and comfy.diffusion_calls == []


# --- 4. lone surrogates, NUL and huge names -------------------------------------------------------------------------
def strict_console(encoding: str = "utf-8") -> io.TextIOWrapper:
    """A console like ComfyUI's LogInterceptor: strict errors, so unencodable text raises."""
    return io.TextIOWrapper(io.BytesIO(), encoding=encoding, errors="strict")


def test_a_lone_surrogate_as_dataset_path_gives_a_printable_error(nodes):
    with pytest.raises(CrucibleError) as refused:
        run_node(nodes, "CrucibleDataset", path="ds_\udcff")
    message = str(refused.value)
    assert "\\udcff" in message and "cannot be encoded" in message
    handler = logging.StreamHandler(strict_console())
    handler.handleError = lambda record: pytest.fail("logging the error failed")  # ComfyUI's worker dies here
    log = logging.getLogger("crucible-test-console")
    log.addHandler(handler)
    try:
        log.error("!!! Exception during processing !!! %s", message)
    finally:
        log.removeHandler(handler)


def test_every_string_input_refuses_unencodable_text(nodes):
    count = 0
    for node_id, cls in nodes.items():
        strings = [n for g in ("required", "optional") for n, e in cls.INPUT_TYPES().get(g, {}).items()
                   if e[0] == "STRING" and "default" in (e[1] if len(e) > 1 else {})]
        for name in strings:
            with pytest.raises(CrucibleError, match=f"input '{name}' contains characters that cannot be encoded"):
                getattr(cls(), cls.FUNCTION)(**{**node_defaults(cls), name: "x\udcff"})
            count += 1
    assert count >= 20, count


def test_error_messages_are_console_safe(monkeypatch):
    message = str(CrucibleError("path 'a\udcff\x00\x1b[31m' 日本 é\nnext line"))
    assert message.encode("utf-8") and "\\udcff" in message and "\\x00" in message and "\\x1b" in message
    assert "\n" in message and "日本" in message  # newlines and encodable text stay as they are
    console = strict_console("cp1252")
    monkeypatch.setattr(sys, "stdout", console)
    monkeypatch.setattr(sys, "stderr", console)
    narrow = str(CrucibleError("dataset '日本' é"))
    narrow.encode("cp1252")  # what this console cannot print is escaped, what it can is kept
    assert "é" in narrow and "\\u65e5" in narrow
    assert errors.console_safe("plain") == "plain"


def test_a_node_error_that_is_not_console_safe_becomes_a_safe_crucible_error(nodes, monkeypatch, pack):
    cls = nodes["CrucibleCaptionOptions"]
    monkeypatch.setattr(pack("dataset_nodes"), "validate", lambda cfg: (_ for _ in ()).throw(ValueError("k\udcff")))
    with pytest.raises(CrucibleError, match=r"Crucible Caption Options: ValueError: k\\udcff") as raised:
        getattr(cls(), cls.FUNCTION)(**node_defaults(cls))
    str(raised.value).encode("utf-8")


@pytest.mark.parametrize("path", ["a" * 5000, "a/" + "b" * 300, "x" * 1100])
def test_huge_names_give_a_short_clear_error(nodes, path):
    with pytest.raises(CrucibleError, match="too long|longer than") as refused:
        run_node(nodes, "CrucibleDataset", path=path)
    assert not isinstance(refused.value, OSError) and len(str(refused.value)) < 500
    with pytest.raises(CrucibleError, match="too long|longer than"):
        run_node(nodes, "CrucibleModel", path=path)


def test_path_text_is_checked_before_it_touches_the_file_system():
    for bad, why in [("a\x00b", "NUL"), ("ds_\udcff", "cannot be encoded"), ("a" * 5000, "too long")]:
        with pytest.raises(UnsafePathError, match=why):
            fileio.check_path_text(bad, "dataset path")
    with pytest.raises(CrucibleError, match="must be text"):
        fileio.check_path_text({"path": "x"}, "dataset path")


def test_an_unusable_name_in_a_config_is_refused_by_the_trainer_too(tmp_path):
    from trainer.dataset import scan_dataset

    for path in ["ds_\udcff", "a" * 5000]:
        with pytest.raises(CrucibleError):
            scan_dataset(DatasetConfig(path=path))


# --- bad numbers -----------------------------------------------------------------------------------------------------
def test_sweep_refuses_non_finite_strengths_and_seeds_out_of_range(nodes, comfy, pack):
    import torch
    from safetensors.torch import save_file

    lora = comfy.model_dir("loras") / "runx" / "runx.safetensors"
    lora.parent.mkdir(exist_ok=True)
    save_file({"w": torch.zeros(1)}, str(lora))
    run = pack("_sockets").RunRecord(kind="lora", checkpoints=[{"path": str(lora), "name": "runx", "step": 1}])
    assert len(sweep(nodes, run=run)[0]) == 2  # base + the checkpoint: the run itself is fine
    for field, value, message in [("strengths", "nan", "finite"), ("strengths", "inf", "finite"),
                                  ("strengths", "1e400", "finite"), ("strengths", "1e6", "finite"),
                                  ("seeds", "-1", "between 0"), ("seeds", str(2**64), "between 0"),
                                  ("seeds", "1.5", "whole numbers"), ("seeds", "9" * 5000, "whole numbers")]:
        with pytest.raises(CrucibleError, match=message):
            sweep(nodes, run=run, **{field: value})


def test_caption_preview_index_ranges_are_cheap_and_checked(nodes, small):
    (dataset, _report) = run_node(nodes, "CrucibleDataset", path=small, resolution=64)
    (text,) = run_node(nodes, "CrucibleCaptionPreview", dataset=dataset, images="0-999999999999999", epochs=1)
    assert text.count("#") == 2
    with pytest.raises(CrucibleError, match="'images' must be indices"):
        run_node(nodes, "CrucibleCaptionPreview", dataset=dataset, images="zero")
