"""One record of a run and its checkpoints (trainer/run_record.py): run.json is its on-disk form, older run.json files
still load, and checkpoint metadata is read in exactly one place."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.errors import CrucibleError, ModelLoadError
from trainer.run_record import (CheckpointRecord, RunRecord, checkpoint_step, checkpoint_val_loss, list_checkpoints,
                                read_safetensors_metadata)

ROOT = Path(__file__).resolve().parents[1]

# run.json as the version before the run record wrote it (trainer/loop.py _write_manifest at 2fac9cd): no work_dir,
# checkpoint entries with "file" but no "name".
RUN_JSON_2FAC9CD = {
    "run_name": "old", "family": "sd15", "kind": "lora", "status": "finished", "run_dir": "/runs/old",
    "checkpoints": [
        {"file": "old-e0001-s000002.safetensors", "path": "/runs/old/old-e0001-s000002.safetensors", "step": 2,
         "epoch": 1, "loss": 0.25, "kind": "lora", "val_loss": 0.2, "val_loss_t": {"0.25": 0.1}},
        {"file": "old-e0002-s000004.safetensors", "path": "/runs/old/old-e0002-s000004.safetensors", "step": 4,
         "epoch": 2, "loss": None, "kind": "lora", "val_loss": None, "val_loss_t": None},
    ],
    "validation": {"images": 0}, "losses": [0.5, 0.4, 0.3, 0.25], "plan": {"total_steps": 4},
    "resolved": {"mixed_precision": "no"}, "samples": [{"step": 4, "paths": ["/w/s.png"]}],
}


def save(path: Path, **metadata: str) -> Path:
    from safetensors.numpy import save_file
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": np.zeros(1, dtype=np.float32)}, str(path), metadata=metadata or None)
    return path


def test_an_older_run_json_loads_and_writes_back_with_the_same_keys(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps(RUN_JSON_2FAC9CD), encoding="utf-8")
    run = RunRecord.load(tmp_path)
    assert (run.run_name, run.family, run.kind, run.status) == ("old", "sd15", "lora", "finished")
    assert run.work_dir == tmp_path  # not recorded then: the folder it was read from
    assert [(c.step, c.epoch, c.loss, c.val_loss) for c in run.checkpoints] == [(2, 1, 0.25, 0.2), (4, 2, None, None)]
    assert run.checkpoints[0].path == Path("/runs/old/old-e0001-s000002.safetensors")
    assert run.checkpoints[0].val_loss_t == {"0.25": 0.1}
    again = run.to_dict()
    for key, value in RUN_JSON_2FAC9CD.items():  # every old key keeps its meaning and value
        assert again[key] == value, key
    assert again["work_dir"] == str(tmp_path)


def test_a_minimal_run_json_gets_defaults(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"run_name": "tiny", "checkpoints": [{"path": "/x/a.safetensors",
                                                                                           "step": 3}],
                                                   "kind": "full", "extra_future_key": 1}), encoding="utf-8")
    run = RunRecord.load(tmp_path)
    assert run.kind == "full" and run.checkpoints[0].kind == "full"  # the run's kind, when the entry has none
    assert run.checkpoints[0].epoch is None and run.losses == [] and run.status == ""


def test_round_trip_through_run_json(tmp_path):
    ckpt = CheckpointRecord(tmp_path / "r.safetensors", 10, 2, 0.5, "lora", val_loss=0.125, val_loss_t={"0.5": 0.1})
    run = RunRecord("r", "flux", "lora", "running", tmp_path, tmp_path / "work", [ckpt], {"images": 2}, [1.0, 0.5])
    path = run.write()
    assert path == tmp_path / "work" / "run.json"
    assert RunRecord.load(tmp_path / "work") == run
    assert RunRecord.from_dict(json.loads(path.read_text())) == run


@pytest.mark.parametrize("content, match", [(None, "has no run.json"), ("{", "cannot read"),
                                            ("[1, 2]", "not a run record"),
                                            ('{"checkpoints": [{"step": 1}]}', "checkpoint 0 has no file path")])
def test_a_missing_or_damaged_run_json_names_the_file(tmp_path, content, match):
    if content is not None:
        (tmp_path / "run.json").write_text(content, encoding="utf-8")
    with pytest.raises(CrucibleError, match=match) as info:
        RunRecord.load(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_a_checkpoint_file_record_comes_from_its_metadata_not_its_name(tmp_path):
    path = save(tmp_path / "run-s999.safetensors", crucible_step="12", crucible_epoch="3", crucible_loss="0.5",
                crucible_val_loss="0.25")
    record = CheckpointRecord.from_file(path)
    assert (record.step, record.epoch, record.loss, record.val_loss) == (12, 3, 0.5, 0.25)
    kohya = CheckpointRecord.from_file(save(tmp_path / "k.safetensors", ss_steps="7", ss_epoch="1"))
    assert (kohya.step, kohya.epoch, kohya.val_loss) == (7, 1, None)
    bare = CheckpointRecord.from_file(save(tmp_path / "bare.safetensors"))
    assert (bare.step, bare.label) == (None, "bare.safetensors")


def test_metadata_numbers_are_read_leniently():
    assert checkpoint_step({"crucible_step": "\"64\""}) == 64
    assert checkpoint_step({"crucible_step": "-3", "ss_steps": "5"}) == 5  # never negative
    assert checkpoint_step({"crucible_step": "inf"}) is None
    assert checkpoint_val_loss({"crucible_val_loss": "nan"}) is None
    assert checkpoint_val_loss({"crucible_val_loss": " 0.5 "}) == 0.5


def test_sweep_and_client_list_the_same_records(tmp_path):
    from trainer import client
    from trainer.sweep import read_checkpoint_info

    save(tmp_path / "b.safetensors", crucible_step="20", crucible_val_loss="0.1")
    save(tmp_path / "a.safetensors", crucible_step="10")
    listed = client.list_checkpoints(tmp_path)
    assert client.Checkpoint is CheckpointRecord and listed == list_checkpoints(tmp_path)
    assert [c.step for c in listed] == [10, 20]
    assert read_checkpoint_info(tmp_path / "b.safetensors") == listed[1].to_dict()


def test_the_loop_reports_run_records():
    from trainer.callbacks import CheckpointInfo

    assert CheckpointInfo is CheckpointRecord


def test_not_a_safetensors_file_is_named(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x03\x00\x00\x00\x00\x00\x00\x00{no")
    with pytest.raises(ModelLoadError, match="bad.safetensors' has a corrupt safetensors header"):
        read_safetensors_metadata(bad)
    with pytest.raises(ModelLoadError, match="cannot read"):
        read_safetensors_metadata(tmp_path / "missing.safetensors")


def test_safetensors_metadata_is_read_in_one_place():
    """No module but trainer/run_record.py parses a safetensors header by hand or asks for a file's metadata.
    trainer/fp8_files.py reads the quantization metadata of the handle it is already reading tensors from (one
    open, ComfyUI's ``_quantization_metadata``), not a checkpoint's run metadata. trainer/safetensors_stream.py writes
    a header (the streaming writer of the memory benchmark's model files); it reads none."""
    readers = []
    for path in sorted([*(ROOT / "trainer").rglob("*.py"), *(ROOT / "nodes").rglob("*.py")]):
        text = path.read_text(encoding="utf-8")
        if re.search(r"""unpack\(\s*["']<Q|__metadata__|\.metadata\(\)""", text):
            readers.append(path.relative_to(ROOT).as_posix())
    assert readers == ["trainer/fp8_files.py", "trainer/run_record.py", "trainer/safetensors_stream.py"]


@pytest.mark.parametrize("module", ["trainer.client", "trainer.comfy_client"])
def test_the_client_runs_as_a_module(module):
    run = subprocess.run([sys.executable, "-m", module, "sweep", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "--checkpoints" in run.stdout and "--workflow" in run.stdout
