"""Nothing lost: every write is atomic, proven by trying to break it.

* A child process saves a multi-MB LoRA, a training state, a JSON file and a PNG over and over; it is SIGKILLed
  dozens of times: half of the kills at random moments, half while it is inside a chosen save (it says so through
  a pipe and waits), so kills land mid-save however loaded the machine is. Under the final names there is only ever
  a complete file of one version, the files written before are untouched, and the temp files the kills leave behind
  are removed by the next save.
* Disk full (``ENOSPC``) and permission denied (``EACCES``) at every stage of a write: a :class:`CrucibleError`
  naming the file, the previous file intact, no temp file left.
* A real training run (LoRA with samples, disk latent cache and a sweep strip; a full fine-tune with its
  single-file copy) writes every file it leaves through :func:`trainer.fileio.atomic_path`.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import select
import signal
import stat
import time
import traceback
from pathlib import Path

import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors import safe_open

import trainer.fileio as fileio
from trainer.config import TrainConfig
from trainer.errors import CrucibleError
from trainer.fileio import atomic_write, atomic_write_json, save_safetensors
from trainer.state import load_state, save_state

LORA_ELEMENTS = 1 << 20  # 4 MB of float32: a save takes long enough to be killed in the middle of it
STATE_ELEMENTS = 1 << 18
KILLS = 40
SAVES_PER_ROUND = 5  # lora.safetensors, state/state.pt, state/state.json, config.json, strip.png
STATE_CFG = TrainConfig()
FINGERPRINT = "fixed-dataset"


# --- the writer that gets killed -------------------------------------------------------------------------------------
def colour(version: int) -> tuple[int, int, int]:
    return (version % 251, (version * 7) % 253, (version * 13) % 255)


def write_every_kind(folder: Path, version: int) -> None:
    """One round of saves; every file carries ``version`` both in its content and in its metadata."""
    save_safetensors(folder / "lora.safetensors", {"w": torch.full((LORA_ELEMENTS,), float(version))},
                     {"version": str(version)})
    save_state(folder / "state", step=version, epoch=1, cfg=STATE_CFG, data_fingerprint=FINGERPRINT,
               payload={"w": torch.full((STATE_ELEMENTS,), float(version))})
    atomic_write_json(folder / "config.json", {"version": version, "padding": ["x" * 1000] * 200})
    info = PngImagePlugin.PngInfo()
    info.add_text("version", str(version))
    strip = Image.new("RGB", (512, 256), colour(version))
    atomic_write(folder / "strip.png", lambda tmp: strip.save(tmp, format="PNG", pnginfo=info))


def _writer_child(folder: Path, first_version: int, done_fd: int, pause_at: int = 0) -> None:
    """Runs in a forked child until it is killed, writing a byte to ``done_fd`` after each complete round of saves;
    a crash is reported through ``child-error.txt``. With ``pause_at`` > 0 it stops inside its ``pause_at``-th save
    after the first round (that save's temp file written and fsynced, the final name not yet replaced), writes
    ``!`` to ``done_fd`` and waits there to be killed."""
    real_replace, armed, saves = os.replace, [], []

    def replace_or_pause(src, dst, *args, **kwargs):  # atomic_path's last step; patched in this child process only
        if armed and f".{os.getpid()}." in Path(src).name:
            saves.append(dst)
            if len(saves) == pause_at:
                os.write(done_fd, b"!")
                while True:
                    time.sleep(60)
        return real_replace(src, dst, *args, **kwargs)

    try:
        if pause_at:
            os.replace = replace_or_pause
        version = first_version
        while True:
            version += 1
            write_every_kind(folder, version)
            os.write(done_fd, b".")
            armed.append(True)  # saves count from the second round on
    except BaseException:  # noqa: BLE001 - report anything to the parent, then leave without cleanup
        (folder.parent / "child-error.txt").write_text(traceback.format_exc())
        os._exit(1)


def check_files(folder: Path) -> int:
    """Every file under a final name is complete and self-consistent; returns the LoRA's version (0 = none yet)."""
    version = 0
    lora = folder / "lora.safetensors"
    if lora.exists():
        with safe_open(str(lora), "pt") as fh:
            version = int(fh.metadata()["version"])
            assert torch.equal(fh.get_tensor("w"), torch.full((LORA_ELEMENTS,), float(version)))
    if (folder / "state" / "state.json").exists():
        saved = load_state(folder / "state", STATE_CFG, FINGERPRINT)
        assert torch.equal(saved.payload["w"], torch.full((STATE_ELEMENTS,), float(saved.step)))
    if (folder / "config.json").exists():
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        assert data["padding"] == ["x" * 1000] * 200 and data["version"] > 0
    if (folder / "strip.png").exists():
        with Image.open(folder / "strip.png") as png:
            png.load()
            assert png.getpixel((511, 255)) == colour(int(png.text["version"]))
    return version


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stray_temps(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*.tmp"))


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_sigkill_mid_save_never_exposes_a_partial_file(tmp_path):
    folder = tmp_path / "run"
    earlier = {}
    for step in (100, 200, 300):  # checkpoints of the same run saved before: must survive every kill
        path = save_safetensors(folder / f"lora-s{step:06d}.safetensors",
                                {"w": torch.full((LORA_ELEMENTS // 4,), float(step))}, {"version": str(step)})
        earlier[path] = digest(path)
    rng = random.Random(2024)
    seen, killed_mid_write, paused, versions = 0, 0, 0, set()
    for kill in range(KILLS):
        # odd kills: inside a chosen save (one of the round's kinds, at random); even kills: at a random moment
        pause_at = rng.randint(1, SAVES_PER_ROUND) if kill % 2 else 0
        done_read, done_write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: save forever (only SIGKILL stops it)
            os.close(done_read)
            _writer_child(folder, first_version=(kill + 1) * 1_000_000, done_fd=done_write, pause_at=pause_at)
        os.close(done_write)
        # the kill lands after the child's first complete round (on a loaded machine a fixed delay could land before
        # it had written anything), then somewhere in the saves that follow, or inside the chosen one
        said = _read_until(done_read, b"!" if pause_at else b".")
        if not pause_at:
            time.sleep(rng.uniform(0.0, 0.15))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        os.close(done_read)
        error = tmp_path / "child-error.txt"
        assert not error.exists(), error.read_text()
        assert said, f"the writer did not say {'it was inside a save' if pause_at else 'it completed a round'} in 120 s"
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        version = check_files(folder)
        assert version >= seen, "an older LoRA replaced a newer one"
        seen = version
        versions.add(version)
        mid_write = any(f".{pid}." in p.name for p in stray_temps(folder))
        assert mid_write or not pause_at, "a writer killed inside a save left no temp file"
        killed_mid_write, paused = killed_mid_write + mid_write, paused + bool(pause_at)
        for path, sha in earlier.items():
            assert digest(path) == sha, f"{path.name} changed"
    # The test is only meaningful if the kills really landed in the middle of saves, after real progress: the paused
    # ones did by construction, whatever the machine's load (the random ones add what they hit)
    assert paused == KILLS // 2 and killed_mid_write >= paused, f"{killed_mid_write} of {KILLS} kills hit a save"
    assert len(versions) == KILLS, "every writer completed a round before its kill: each run leaves a newer LoRA"
    # The next process that writes there removes the temp files the killed writers left (stale ones only).
    assert _in_a_fresh_process(lambda: write_every_kind(folder, version=seen + 1)) == 0
    assert not stray_temps(folder), stray_temps(folder)
    assert check_files(folder) == seen + 1


def _read_until(fd: int, mark: bytes, timeout: float = 120.0) -> bool:
    """Read the child's pipe until ``mark`` arrives (True) or ``timeout`` seconds pass without it (False)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        data = os.read(fd, 4096) if ready else b""
        if mark in data:
            return True
        if ready and not data:  # the child is gone (a crash: child-error.txt says why)
            return False
    return False


def _in_a_fresh_process(work) -> int:
    """Run ``work`` in a forked child (a new process id, as after a restart); returns its exit status."""
    pid = os.fork()
    if pid == 0:
        status = 0
        try:
            work()
        except BaseException:  # noqa: BLE001 - shown in the test output; the exit status fails the test
            traceback.print_exc()
            status = 1
        os._exit(status)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_the_first_save_removes_only_temp_files_of_dead_writers(tmp_path):
    dead = _dead_pid()
    stale = [tmp_path / f".model.safetensors.{dead}.abc123de.tmp", tmp_path / f".run.json.{dead}.x_9y8z7w.tmp"]
    kept = [tmp_path / f".model.safetensors.{os.getpid()}.def456gh.tmp",  # ours: another thread may be writing it
            tmp_path / f".model.safetensors.{os.getppid()}.ghi789jk.tmp",  # a live process's
            tmp_path / ".notes.tmp", tmp_path / f"visible.{dead}.abcdefgh.tmp"]  # not ours at all
    for path in stale + kept:
        path.write_bytes(b"partial")
    save_safetensors(tmp_path / "model.safetensors", {"w": torch.ones(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.safetensors", *(p.name for p in kept)])
    dead_again = tmp_path / f".late.json.{dead}.lmnopqrs.tmp"  # appears after this process swept the folder
    dead_again.write_bytes(b"partial")
    atomic_write_json(tmp_path / "late.json", {})
    assert dead_again.exists()  # one sweep per folder and process keeps thousands of cache writes linear
    assert _in_a_fresh_process(lambda: atomic_write_json(tmp_path / "late.json", {})) == 0
    assert not dead_again.exists()


def _dead_pid() -> int:
    """The id of a process that has exited and been reaped."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


# --- disk full, permission denied ------------------------------------------------------------------------------------
def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _write(kind: str, folder: Path, version: int) -> Path:
    """One save of ``kind``; returns the final path it writes."""
    if kind == "safetensors":
        return save_safetensors(folder / "a.safetensors", {"w": torch.full((64,), float(version))})
    if kind == "state":
        save_state(folder / "state", step=version, epoch=1, cfg=STATE_CFG, data_fingerprint=FINGERPRINT,
                   payload={"w": torch.full((64,), float(version))})
        return folder / "state" / "state.pt"
    if kind == "json":
        return atomic_write_json(folder / "run.json", {"version": version})
    if kind == "png":
        image = Image.new("RGB", (8, 8), colour(version))
        return atomic_write(folder / "strip.png", lambda tmp: image.save(tmp, format="PNG"))
    raise AssertionError(kind)


KINDS = ("safetensors", "state", "json", "png")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _fail_data_write(monkeypatch, kind: str) -> None:
    """Make the library call that writes ``kind``'s bytes write a little, then fail with ENOSPC."""
    def half_then_full(path) -> None:
        Path(path).write_bytes(b"\0" * 1000)
        _enospc()

    if kind == "safetensors":
        monkeypatch.setattr("safetensors.torch.save_file", lambda tensors, path, *a, **k: half_then_full(path))
    elif kind == "state":
        monkeypatch.setattr(torch, "save", lambda obj, path, *a, **k: half_then_full(path))
    elif kind == "json":
        monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: half_then_full(self))
    else:
        monkeypatch.setattr(Image.Image, "save", lambda self, fp, *a, **k: half_then_full(fp))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stage", ["data", "fsync", "rename"])
def test_disk_full_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch, kind, stage):
    final = _write(kind, tmp_path, version=1)
    before = _snapshot(tmp_path)
    if stage == "data":  # the library writing the bytes runs out of space half way
        _fail_data_write(monkeypatch, kind)
    elif stage == "fsync":  # NFS, btrfs, quotas: the error shows up when the data is flushed
        monkeypatch.setattr(os, "fsync", _enospc)
    else:
        monkeypatch.setattr(os, "replace", _enospc)
    with pytest.raises(CrucibleError) as caught:
        _write(kind, tmp_path, version=2)
    monkeypatch.undo()
    message = str(caught.value)
    assert str(final) in message and "No space left on device" in message
    assert _snapshot(tmp_path) == before  # the previous file intact, no temp file left behind


@pytest.mark.parametrize("kind", KINDS)
def test_permission_denied_names_the_file(tmp_path, monkeypatch, kind):
    final = _write(kind, tmp_path, version=1)
    before = _snapshot(tmp_path)

    def denied(*_args, **_kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(fileio.tempfile, "mkstemp", denied)  # what a read-only folder does to the first step
    with pytest.raises(CrucibleError, match="Permission denied") as caught:
        _write(kind, tmp_path, version=2)
    monkeypatch.undo()
    assert str(final) in str(caught.value)
    assert _snapshot(tmp_path) == before


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder_is_refused_with_the_path(tmp_path):
    final = _write("safetensors", tmp_path, version=1)
    before = final.read_bytes()
    tmp_path.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(CrucibleError, match="Permission denied") as caught:
            _write("safetensors", tmp_path, version=2)
    finally:
        tmp_path.chmod(stat.S_IRWXU)
    assert str(final) in str(caught.value) and final.read_bytes() == before


def test_a_failing_writer_leaves_no_temp_file_and_keeps_its_own_error(tmp_path):
    final = atomic_write_json(tmp_path / "config.json", {"v": 1})

    def broken(_tmp):
        raise KeyError("not an OS error")

    with pytest.raises(KeyError):
        atomic_write(final, broken)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    assert json.loads(final.read_text()) == {"v": 1}


# --- a real run writes every file atomically -------------------------------------------------------------------------
@pytest.fixture
def recorded_writes(monkeypatch) -> set[Path]:
    """Final paths written through :func:`trainer.fileio.atomic_path` while the test runs."""
    written: set[Path] = set()
    real = fileio.atomic_path

    def recording(path):
        written.add(Path(path).resolve())
        return real(path)

    monkeypatch.setattr(fileio, "atomic_path", recording)
    return written


def _files(*folders: Path) -> set[Path]:
    return {p.resolve() for folder in folders for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("network_type", ["lora", "full"])
def test_every_file_a_run_leaves_was_written_atomically(tiny_sd15, demo_dataset, tmp_path, recorded_writes,
                                                        network_type):
    from trainer.loop import train
    from trainer.sweep import sweep_run

    lora = network_type == "lora"
    cfg = TrainConfig.from_dict({
        "model": {"family": "sd15", "path": str(tiny_sd15)},
        "datasets": [{"path": str(demo_dataset), "resolution": 64, "repeats": 1}],
        "network": {"network_type": network_type, "network_dim": 4, "network_alpha": 4},
        "optim": {"learning_rate": 1e-3 if lora else 1e-5, "lr_scheduler": "constant"},
        "training": {"batch_size": 6, "max_train_steps": 2, "seed": 1, "cache_latents": lora,
                     "cache_latents_to_disk": lora},
        "save": {"output_dir": str(tmp_path / "models"), "work_dir": str(tmp_path / "work"), "run_name": "atomic",
                 "save_every_n_steps": 1, "save_every_n_epochs": 0,
                 "single_file_dir": "" if lora else str(tmp_path / "models" / "checkpoints")},
        "sample": {"prompts": ["a red circle"] if lora else [], "steps": 2, "sample_every_n_steps": 2},
    })
    result = train(cfg)
    if lora:
        sweep_run(result.work_dir, prompts=["a red circle"], seeds=[1], strengths=[1.0], steps=2)
    left = _files(tmp_path / "models", tmp_path / "work")
    kinds = {p.suffix for p in left}
    assert {".safetensors", ".json", ".pt", ".png"} <= kinds  # PNGs: the loss curve, and samples/sweep for the LoRA
    assert len(list((tmp_path / "models" / "atomic").glob("*.safetensors"))) == 2
    if lora:
        assert list((tmp_path / "work" / "atomic" / "cache").rglob("*.safetensors"))
    else:  # the whole-model single-file copy ComfyUI's Load Checkpoint reads
        assert len(list((tmp_path / "models" / "checkpoints" / "atomic").glob("*.safetensors"))) == 2
    assert left <= recorded_writes, sorted(str(p) for p in left - recorded_writes)
    assert not stray_temps(tmp_path)
