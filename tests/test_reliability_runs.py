"""Nothing lost across a run's life: cancel, crash, disk full, divergence, restart, and a long soak.

Every test compares against one uninterrupted reference run of the tiny SD1.5 model (9 optimizer steps, a checkpoint
per epoch, cosine schedule with warmup and shuffled captions, so optimizer, scheduler and caption RNG state all
matter): whatever happens in between, the final weights must be bitwise the reference's.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from trainer.callbacks import Callbacks
from trainer.config import TrainConfig
from trainer.errors import CrucibleError, TrainingDivergedError
from trainer.loop import Trainer, train
from trainer.state import load_state
from run_helpers import StopAt

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TOTAL_STEPS = 9  # 12 images / batch 4 = 3 steps per epoch, 3 epochs; checkpoints at 3, 6, 9
SOAK_STEPS = int(os.environ.get("CRUCIBLE_SOAK_STEPS", "200"))  # CI default; set 1000 for the full soak
RUN = "t"


def run_config(model: Path, data: Path, out: Path, **sections) -> TrainConfig:
    base = {
        "model": {"family": "sd15", "path": str(model)},
        "datasets": [{"path": str(data), "resolution": 64, "repeats": 1,
                      "captions": {"shuffle_caption": True, "caption_tag_dropout_rate": 0.1}}],
        "network": {"network_dim": 4, "network_alpha": 4},
        "optim": {"learning_rate": 5e-3, "lr_scheduler": "cosine", "lr_warmup_steps": 2},
        "training": {"batch_size": 4, "epochs": 3, "seed": 5},
        "save": {"output_dir": str(out / "loras"), "work_dir": str(out / "work"), "run_name": RUN,
                 "save_every_n_epochs": 1, "save_precision": "fp32"},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return TrainConfig.from_dict(base)




class Hashes(Callbacks):
    """The sha256 of each checkpoint file at the moment it was announced."""

    def __init__(self):
        self.at_save: dict[Path, str] = {}

    def on_checkpoint(self, ckpt):
        self.at_save[ckpt.path] = sha256(ckpt.path)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def checkpoint(out: Path, step: int) -> Path:
    epoch = (step - 1) // 3 + 1
    return out / "loras" / RUN / f"{RUN}-e{epoch:04d}-s{step:06d}.safetensors"


def fingerprint(cfg: TrainConfig) -> str:
    """The dataset fingerprint a resume is checked against."""
    from trainer.dataset import dataset_fingerprint

    return dataset_fingerprint(cfg.datasets)


def assert_same_weights(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} tensors differ between {a.name} and {b.name}, e.g. {different[0]}"


@pytest.fixture(scope="module")
def reference(tiny_sd15, demo_dataset, tmp_path_factory) -> Path:
    """The uninterrupted run; returns its output folder."""
    out = tmp_path_factory.mktemp("reference")
    result = train(run_config(tiny_sd15, demo_dataset, out))
    assert [c.step for c in result.checkpoints] == [3, 6, 9] and not result.cancelled
    return out


@pytest.fixture
def config(tiny_sd15, demo_dataset, tmp_path):
    return lambda **sections: run_config(tiny_sd15, demo_dataset, tmp_path, **sections)


def assert_matches_reference(out: Path, reference: Path) -> None:
    """Every scheduled checkpoint exists and is bitwise the reference's."""
    for step in (3, 6, 9):
        assert_same_weights(checkpoint(out, step), checkpoint(reference, step))


# --- cancel and resume -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 5, 11, 17])  # stops [1, 7], [3, 5, 6], [4, 8], [3, 7, 8]: epoch ends, the last step
def test_cancel_at_random_steps_then_resume_is_bitwise_identical(config, tmp_path, reference, seed):
    """One to three Cancels at random steps, each followed by a resume."""
    rng = random.Random(seed)
    stops = sorted(rng.sample(range(1, TOTAL_STEPS), k=rng.randint(1, 3)))
    cfg = config()
    state = None
    for stop in stops:
        stopped = train(cfg, StopAt(stop), resume_from=state)
        assert stopped.cancelled and stopped.checkpoints[-1].step == stop, stops
        assert load_state(stopped.state_dir, cfg, fingerprint(cfg)).step == stop
        state = stopped.state_dir
    finished = train(cfg, resume_from=state)
    assert not finished.cancelled and len(finished.losses) == TOTAL_STEPS
    reference_losses = json.loads((reference / "work" / RUN / "run.json").read_text())["losses"]
    assert finished.losses == reference_losses, stops
    assert_matches_reference(tmp_path, reference)


def test_resume_in_a_fresh_python_process_matches_the_uninterrupted_run(config, tmp_path, reference):
    cfg = config()
    stopped = train(cfg, StopAt(4))
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(cfg.to_json(), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "trainer", "train", str(cfg_file), "--resume", str(stopped.state_dir)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert_matches_reference(tmp_path, reference)
    final, expected = _metadata(checkpoint(tmp_path, 9)), _metadata(checkpoint(reference, 9))
    assert final == expected  # the same metadata too, apart from where and when it was written


def _metadata(path: Path) -> dict:
    """A checkpoint's metadata without the start time and the output folders (which differ between two runs)."""
    with safe_open(str(path), "pt") as fh:
        meta = dict(fh.metadata())
    for key in ("ss_training_started_at", "modelspec.date"):
        meta.pop(key)
    config = json.loads(meta.pop("crucible_config"))
    config.pop("save")
    meta["crucible_config"] = config
    return meta


def test_resume_detects_a_changed_dataset_or_config_and_force_continues(tiny_sd15, demo_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_dataset, data)
    cfg = run_config(tiny_sd15, data, tmp_path)
    stopped = train(cfg, StopAt(2))
    # Changing only where and how often it saves is fine: those sections may change between stop and resume.
    saves_more = cfg.replace(save={"checkpoint_limit": 2}, sample={"prompts": ("a red circle",)})
    assert load_state(stopped.state_dir, saves_more, fingerprint(cfg)).step == 2
    caption = next(data.rglob("00_red_circle.txt"))
    caption.write_text(caption.read_text(encoding="utf-8") + ", edited after the stop", encoding="utf-8")
    with pytest.raises(CrucibleError, match="the dataset files changed") as caught:
        train(cfg, resume_from=stopped.state_dir)
    assert "force" in str(caught.value) and str(stopped.state_dir) in str(caught.value)
    changed = cfg.replace(optim={"learning_rate": 1e-3})
    with pytest.raises(CrucibleError, match="the training config changed and the dataset files changed"):
        train(changed, resume_from=stopped.state_dir)
    forced = train(changed, resume_from=stopped.state_dir, force_resume=True)
    assert not forced.cancelled and len(forced.losses) == TOTAL_STEPS
    assert forced.losses[:2] == stopped.losses  # the first two steps are the saved ones, not recomputed


# --- disk full during a run ------------------------------------------------------------------------------------------
def _enospc_on_second(monkeypatch, where: str) -> None:
    """Make the second save of ``where`` fail the way a full disk does."""
    from trainer import state as state_module
    from trainer.fileio import atomic_write

    calls = {"n": 0}

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def second_fails(real):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                return atomic_write(args[0], full) if where == "state record" else full()
            return real(*args, **kwargs)
        return wrapper

    if where == "checkpoint":
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file", second_fails(safetensors.torch.save_file))
    elif where == "state blob":
        monkeypatch.setattr(torch, "save", second_fails(torch.save))
    else:
        monkeypatch.setattr(state_module, "atomic_write_json", second_fails(state_module.atomic_write_json))


@pytest.mark.parametrize("where, failing_file, resumable_step", [
    ("checkpoint", "t-e0002-s000006.safetensors", 3),
    ("state blob", "state.pt", 3),
    ("state record", "state.json", 6),  # state.pt of step 6 was complete: it carries its own record
])
def test_disk_full_mid_run_names_the_file_keeps_earlier_ones_and_resumes_exactly(config, tmp_path, reference,
                                                                                 monkeypatch, where, failing_file,
                                                                                 resumable_step):
    cfg = config()
    hashes = Hashes()
    _enospc_on_second(monkeypatch, where)
    with pytest.raises(CrucibleError, match="No space left on device") as caught:
        train(cfg, hashes)
    monkeypatch.undo()
    assert failing_file in str(caught.value)
    first = checkpoint(tmp_path, 3)
    assert sha256(first) == hashes.at_save[first]  # the earlier checkpoint is untouched
    assert not list(tmp_path.rglob("*.tmp"))
    state_dir = tmp_path / "work" / RUN / "state"
    assert load_state(state_dir, cfg, fingerprint(cfg)).step == resumable_step
    resumed = train(cfg, resume_from=state_dir)
    assert not resumed.cancelled
    assert_matches_reference(tmp_path, reference)


# --- divergence ------------------------------------------------------------------------------------------------------
def _poison(monkeypatch, step: int, how: str) -> None:
    real = Trainer._loss

    def poisoned(self, batch_plan, epoch, at_step, micro):
        loss = real(self, batch_plan, epoch, at_step, micro)
        if at_step != step:
            return loss
        if how == "inf gradient":  # the loss stays finite; the backward pass produces inf/NaN gradients
            loss.register_hook(lambda grad: torch.full_like(grad, float("inf")))
            return loss
        return loss * float("nan" if how == "nan loss" else "inf")

    monkeypatch.setattr(Trainer, "_loss", poisoned)


def _all_finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(path)).values())


@pytest.mark.parametrize("how", ["nan loss", "inf loss", "inf gradient"])
def test_divergence_names_the_step_keeps_the_last_good_checkpoint_and_resumes(config, tmp_path, reference,
                                                                              monkeypatch, how):
    cfg = config()
    hashes = Hashes()
    _poison(monkeypatch, step=5, how=how)
    with pytest.raises(TrainingDivergedError, match=r"at step 5\b"):
        train(cfg, hashes)
    monkeypatch.undo()
    kept = sorted((tmp_path / "loras" / RUN).glob("*.safetensors"))
    assert kept == [checkpoint(tmp_path, 3)] and sha256(kept[0]) == hashes.at_save[kept[0]]
    assert _all_finite(kept[0])
    state_dir = tmp_path / "work" / RUN / "state"
    assert load_state(state_dir, cfg, fingerprint(cfg)).step == 3
    train(cfg, resume_from=state_dir)  # the cause is gone (a transient spike): the run ends as if nothing happened
    assert_matches_reference(tmp_path, reference)


def test_inf_gradient_with_clipping_off_is_caught_before_the_weights_change(config, tmp_path, monkeypatch):
    cfg = config(optim={"max_grad_norm": 0.0})
    _poison(monkeypatch, step=3, how="inf gradient")  # step 3 is a save step
    with pytest.raises(TrainingDivergedError, match=r"at step 3\b"):
        train(cfg)
    monkeypatch.undo()
    assert all(_all_finite(p) for p in (tmp_path / "loras" / RUN).glob("*.safetensors"))


def test_checkpoint_limit_also_prunes_the_single_file_copies_of_a_full_finetune(config, tmp_path):
    singles = tmp_path / "checkpoints"
    cfg = config(network={"network_type": "full"}, optim={"learning_rate": 1e-5, "lr_scheduler": "constant",
                                                          "lr_warmup_steps": 0},
                 training={"batch_size": 6, "max_train_steps": 3},
                 save={"save_every_n_epochs": 0, "save_every_n_steps": 1, "checkpoint_limit": 1,
                       "single_file_dir": str(singles)})
    train(cfg)
    assert len(list((tmp_path / "loras" / RUN).glob("*.safetensors"))) == 1
    assert [p.name for p in (singles / RUN).glob("*.safetensors")] == [f"{RUN}-e0002-s000003.safetensors"]


# --- soak ------------------------------------------------------------------------------------------------------------
def rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Probe(Callbacks):
    """Resident memory and open files at every step, and the checkpoint count at every save."""

    def __init__(self, folder: Path, limit: int):
        self.folder, self.limit = folder, limit
        self.rss: list[int] = []
        self.fds: list[int] = []
        self.saved: list[int] = []

    def on_step(self, info):
        self.rss.append(rss_kib())
        self.fds.append(open_fds())

    def on_checkpoint(self, ckpt):
        files = sorted(self.folder.glob("*.safetensors"))
        assert len(files) <= self.limit, [f.name for f in files]
        assert ckpt.path in files
        self.saved.append(ckpt.step)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_soak_memory_and_file_handles_stay_flat_and_the_checkpoint_limit_holds(config, tmp_path):
    limit, every = 2, 50
    cfg = config(training={"batch_size": 1, "max_train_steps": SOAK_STEPS},
                 optim={"learning_rate": 1e-3, "lr_scheduler": "constant", "lr_warmup_steps": 0},
                 save={"save_every_n_epochs": 0, "save_every_n_steps": every, "checkpoint_limit": limit})
    probe = Probe(tmp_path / "loras" / RUN, limit)
    fds_before = open_fds()
    result = train(cfg, probe)
    fds_after = open_fds()
    assert probe.saved == list(range(every, SOAK_STEPS + 1, every)) + ([SOAK_STEPS] if SOAK_STEPS % every else [])
    kept = sorted(p.name for p in (tmp_path / "loras" / RUN).glob("*.safetensors"))
    assert kept == [c.path.name for c in result.checkpoints][-limit:] and len(kept) == limit
    warm = min(every + 10, SOAK_STEPS // 3)  # the first save, caches and allocator pools are warm by now
    window = max(10, (SOAK_STEPS - warm) // 4)
    early, late = max(probe.rss[warm:warm + window]), max(probe.rss[-window:])
    assert late - early < 8 * 1024, f"RSS grew {(late - early) / 1024:.1f} MiB over {SOAK_STEPS - warm} steps"
    assert max(probe.fds[warm:]) <= probe.fds[warm], "open file descriptors grew during training"
    assert fds_after <= fds_before, f"{fds_after - fds_before} file descriptors left open after the run"
