"""Two CPU processes under `accelerate launch` (gloo): the ranks end with identical weights, only rank 0 writes."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_two_processes_agree_and_only_rank0_writes(tiny_sd15, demo_dataset, tmp_path):
    cfg = {"model": {"family": "sd15", "path": str(tiny_sd15)},
           "datasets": [{"path": str(demo_dataset), "resolution": 64, "repeats": 1}],
           "network": {"network_dim": 4, "network_alpha": 4},
           "training": {"batch_size": 2, "epochs": 1, "seed": 1},
           "save": {"output_dir": str(tmp_path / "out"), "run_name": "mp", "save_every_n_epochs": 1}}
    assert_ranks_agree(launch_two_processes(tmp_path, cfg))
    files = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file())
    # 11 images (1 held out for validation) / batch 2 = 6 batches, 3 per process → 3 optimizer steps; one
    # checkpoint, written once
    assert files == ["mp/config.json", "mp/loss_curve.png", "mp/mp-e0001-s000003.safetensors", "mp/run.json",
                     "mp/state/state.json", "mp/state/state.pt"], files
    manifest = json.loads((tmp_path / "out" / "mp" / "run.json").read_text())
    assert manifest["plan"]["num_processes"] == 2 and len(manifest["losses"]) == 3


def test_two_processes_train_sdxl_text_encoders(demo_dataset, tmp_path):
    """SDXL with both text encoders training: at clip skip the last CLIP-L layer (and its final norm) get no gradient,
    which DDP must accept (issue 15: it crashed at step 2 with "parameters that were not used")."""
    from trainer.tiny import build_tiny_pipeline

    model = build_tiny_pipeline(tmp_path / "xl", family="sdxl", seed=1)
    cfg = {"model": {"family": "sdxl", "path": str(model), "clip_skip": 2},
           "datasets": [{"path": str(demo_dataset), "resolution": 64, "repeats": 1}],
           "network": {"network_dim": 2, "network_alpha": 2, "train_text_encoder": True},
           "training": {"batch_size": 2, "epochs": 1, "seed": 1, "max_train_steps": 3},
           "save": {"output_dir": str(tmp_path / "out"), "run_name": "xl", "save_every_n_epochs": 0,
                    "save_state": False}}
    assert_ranks_agree(launch_two_processes(tmp_path, cfg))
    manifest = json.loads((tmp_path / "out" / "xl" / "run.json").read_text())
    assert len(manifest["losses"]) == 3


def assert_ranks_agree(output: str) -> None:
    """Both ranks logged the digest of their trained weights (``-v``), and the two are equal."""
    digests = dict(re.findall(r"rank (\d+) trained weights sha256 (\w+)", output))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], output[-3000:]


def launch_two_processes(folder: Path, cfg: dict, config_file: Path | None = None, module: str = "trainer",
                         timeout: int = 600, check: bool = True, pythonpath: tuple = (), args: tuple = (),
                         env: dict | None = None) -> str:
    """``accelerate launch`` of ``python -m trainer train`` on 2 CPU (gloo) processes; their joint output.
    ``config_file``: an accelerate config file (2 processes) instead of the ``--multi_gpu`` flags; ``module``: run
    another module with the trainer's arguments (a test shim, found on ``pythonpath``); ``check``: assert exit
    status 0; ``args``: more ``train`` arguments (``--resume DIR``); ``env``: more environment variables."""
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        accelerate = shutil.which("accelerate")
    assert accelerate, "accelerate's launcher is part of the accelerate package"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *map(str, pythonpath)]), OMP_NUM_THREADS="1",
               **(env or {}))
    how = ["--config_file", str(config_file)] if config_file else [
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    proc = subprocess.Popen([str(accelerate), "launch", *how, "--dynamo_backend", "no", "-m", module, "-v", "train",
                             "cfg.json", *args], cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # a hung collective: end the launcher and its workers (its own group)
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n[test] killed after {timeout} s"
    output = out + err
    assert proc.returncode == 0 or not check, output[-3000:]
    return output


def test_two_processes_fill_the_caches_once_each_rank_its_share(tiny_sd15, demo_dataset, tmp_path):
    """Issue 16: with the latent and text caches on, each rank runs the VAE and the text encoder over its share of
    the images only (6 and 5 of the 11 trained), writes those latent files once, receives the other rank's entries,
    and trains as the same launch without caches does (the same losses: the cached latents and embeddings are what
    encoding in the step gives)."""
    def config(folder: Path, cached: bool) -> dict:
        return {"model": {"family": "sd15", "path": str(tiny_sd15)},
                "datasets": [{"path": str(demo_dataset), "resolution": 64, "repeats": 1}],
                "network": {"network_dim": 4, "network_alpha": 4},
                "training": {"batch_size": 2, "epochs": 2, "seed": 1, "max_train_steps": 5, "mixed_precision": "no",
                             "cache_latents": cached, "cache_text_embeddings": cached,
                             "cache_latents_to_disk": cached},
                "save": {"output_dir": str(folder / "out"), "run_name": "mp", "save_every_n_epochs": 0,
                         "save_state": False}}

    runs = {}
    for cached in (True, False):
        folder = tmp_path / ("cached" if cached else "uncached")
        folder.mkdir()
        output = launch_two_processes(folder, config(folder, cached))
        assert_ranks_agree(output)
        runs[cached] = (folder, output)
    folder, output = runs[True]
    latents = dict(re.findall(r"rank (\d) cached latents of (\d+ of \d+ images \(\d+ encoded\))", output))
    assert latents == {"0": "6 of 11 images (6 encoded)", "1": "5 of 11 images (5 encoded)"}, output[-3000:]
    texts = dict(re.findall(r"rank (\d) cached text embeddings of (\d+ of \d+) images", output))
    assert texts == {"0": "6 of 11", "1": "5 of 11"}, output[-3000:]
    files = list(folder.rglob("cache/latents/*.safetensors"))
    assert len(files) == 11 and not list(folder.rglob("cache/latents/*.tmp*"))
    losses = [json.loads(next(f.rglob("run.json")).read_text())["losses"] for f in (folder, runs[False][0])]
    assert len(losses[0]) == 5 and losses[0] == pytest.approx(losses[1], rel=1e-4)
