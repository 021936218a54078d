"""The training loop: set up, resume, step through the epochs, save as the plan says.

One optimizer step (:mod:`trainer.train_step`) reads: sample σ/t → ``objective.noise`` → ``family.predict`` →
weighted MSE against the target.
The loop never branches on the model family; everything family-specific is behind :class:`ModelFamily`.

Determinism: the epoch's batch order, captions and crops come from ``DataSource`` keyed by (seed, epoch); noise
and timesteps come from a generator seeded per (seed, step, micro-batch, rank). A run stopped after step *k* and
resumed from its saved state therefore computes exactly the steps an uninterrupted run would.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .callbacks import Callbacks, CheckpointInfo, SampleInfo, StepInfo
from .config import TrainConfig
from .families import Components, ModelFamily, get_family
from .fileio import atomic_write_json
from .run_outputs import RunOutputs
from .run_paths import run_paths
from .run_record import RUN_FILE, RunRecord
from .run_setup import RunSetup
from .sharding import full_tensor, load_training_state
from .state import check_state, load_state
from .train_step import TrainStep

log = logging.getLogger("crucible")


@dataclass
class RunResult:
    run_dir: Path  # where checkpoints are
    work_dir: Path  # state, samples, config.json, run.json
    checkpoints: list[CheckpointInfo]
    losses: list[float]  # mean loss per optimizer step (index 0 = step 1)
    cancelled: bool
    plan: Any
    state_dir: Path | None = None
    samples: list[SampleInfo] = field(default_factory=list)
    record: RunRecord | None = None  # what run.json holds (None on the non-main processes of a multi-GPU run)


def train(cfg: TrainConfig, callbacks: Callbacks | None = None, *, resume_from: str | Path | None = None,
          force_resume: bool = False, components: Components | None = None) -> RunResult:
    """Train ``cfg`` to completion (or until ``callbacks.should_stop()``), saving as the plan says.

    Whatever the outcome (finished, cancelled, raised), every model the run loaded is released before this returns
    (:mod:`trainer.release`): a host like ComfyUI goes on running in the same process.
    """
    from .release import forget_frames, release_run

    trainer = Trainer(cfg, callbacks or Callbacks())
    try:
        with torch.inference_mode(False), torch.enable_grad():
            return trainer.run(resume_from, force_resume, components)
    except BaseException as exc:
        forget_frames(exc)  # the traceback's frames would keep the models alive for as long as the caller keeps exc
        raise
    finally:
        release_run(trainer)


class Trainer(RunSetup, TrainStep, RunOutputs):
    """One training run. Its parts live in their own modules: set-up (:mod:`trainer.run_setup`), the optimizer step
    (:mod:`trainer.train_step`) and what the run writes (:mod:`trainer.run_outputs`); this class runs the loop."""

    def __init__(self, cfg: TrainConfig, callbacks: Callbacks):
        self.cfg = cfg
        self.callbacks = callbacks
        self.family: ModelFamily = get_family(cfg.model.family)
        paths = run_paths(cfg.save)
        self.run_name, self.run_dir, self.work_dir, self.state_dir = paths.name, paths.run_dir, paths.work_dir, paths.state_dir
        self.checkpoints: list[CheckpointInfo] = []
        self.losses: list[float] = []
        self.samples: list[SampleInfo] = []
        self.started_at = time.time()  # kohya ss_training_started_at: when this run (not the process) started
        self.residency = None  # the encoders the caches replace, off the device / out of memory (_pre_encode)
        self.sharded = False  # FSDP: the trained weights are shards on each rank (trainer.sharding); set up by _setup
        self.deepspeed = False  # DeepSpeed ZeRO-2 steps the weights (trainer.deepspeed_zero); set up by _setup
        self.overflow_skips = 0  # consecutive fp16 overflow steps the gradient scaler skipped (trainer.numerics)

    # --- run -----------------------------------------------------------------------------------------------------
    def run(self, resume_from, force_resume: bool, components: Components | None) -> RunResult:
        """Set up the encoders, fill the caches and release the encoders, then read and set up the denoiser
        (:mod:`trainer.run_setup`), resume, and train."""
        self._setup_encoders(components)
        if resume_from:  # a state that cannot resume this run is refused before any caching
            check_state(Path(resume_from), self.cfg, self.source.fingerprint(), force=force_resume)
        if self.acc.is_main_process:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.work_dir / "config.json", self.cfg.to_dict())
            self.callbacks.on_start(self.plan)
        self._pre_encode()
        self._setup_denoiser()
        start = self._resume(resume_from, force_resume) if resume_from else 0
        try:
            cancelled = self._loop(start)
        finally:
            self.prefetch.close()
        self.acc.wait_for_everyone()
        log.debug("rank %d trained weights sha256 %s", self.acc.process_index, self._weights_digest())
        record = self._write_manifest("cancelled" if cancelled else "finished")
        return RunResult(self.run_dir, self.work_dir, self.checkpoints, self.losses, cancelled, self.plan,
                         self.state_dir if self.cfg.save.save_state else None, self.samples, record)

    def _resume(self, folder, force: bool) -> int:
        saved = load_state(Path(folder), self.cfg, self.source.fingerprint(), force=force)
        payload = saved.payload
        load_training_state(self, payload, folder)  # weights and optimizer state (sharded: each rank its shards)
        self.scheduler.load_state_dict(payload["scheduler"])
        if self.ema is not None and payload.get("ema"):
            self.ema.load_state_dict(payload["ema"])
        if self.acc.scaler is not None and payload.get("scaler"):
            self.acc.scaler.load_state_dict(payload["scaler"])
        self.losses = [float(x) for x in payload.get("losses", [])][: saved.step]
        if (Path(folder).parent / RUN_FILE).is_file():
            self.checkpoints = [c for c in RunRecord.load(Path(folder).parent).checkpoints
                                if c.step is not None and c.step <= saved.step and c.path.exists()]
        log.info("resuming %s at step %d (epoch %d)", self.run_name, saved.step, saved.epoch)
        return saved.step

    def _loop(self, start_step: int) -> bool:
        plan = self.plan
        step = start_step
        t0, done_here = time.monotonic(), 0
        for epoch in range(1, plan.epochs + 1):
            groups = self._epoch_groups(epoch)
            for index, group in enumerate(groups):
                step_of = (epoch - 1) * plan.steps_per_epoch + index + 1
                if step_of <= start_step:
                    continue
                if step_of > plan.total_steps:
                    break
                step = step_of
                if index + 1 < len(groups):  # decode the next step's images while this one computes
                    self.prefetch.request(groups[index + 1], epoch)
                loss = self._optimizer_step(group, step, epoch)
                self.losses.append(loss)
                done_here += 1
                spent = (time.monotonic() - t0) / done_here
                if self.acc.is_main_process:
                    self.callbacks.on_step(StepInfo(step, plan.total_steps, epoch, loss,
                                                    self.scheduler.get_last_lr()[0], spent,
                                                    spent * (plan.total_steps - step)))
                if plan.is_sample_step(step) and self.cfg.sample.prompts:
                    self._sample(step, epoch)
                stop = self._should_stop() and step < plan.total_steps
                if plan.is_save_step(step) or stop:
                    self._save(step, epoch, final=step == plan.total_steps)
                if stop:
                    log.info("stopped at step %d; checkpoint and state saved", step)
                    return True
            if step >= plan.total_steps:
                break
        return False

    def _should_stop(self) -> bool:
        """The main process's Cancel, agreed by every process (a stop on one rank alone would hang the others)."""
        wanted = self.acc.is_main_process and self.callbacks.should_stop()
        if self.acc.num_processes == 1:
            return wanted
        flag = torch.tensor([1.0 if wanted else 0.0], device=self.acc.device)
        return bool(self.acc.reduce(flag, reduction="sum").item() > 0)

    def _weights_digest(self) -> str:
        digest = hashlib.sha256()
        for _, name, p in sorted(self.net.named_trainable(), key=lambda x: (x[0], x[1])):
            digest.update(name.encode())
            digest.update(full_tensor(p).detach().float().cpu().numpy().tobytes())  # sharded: every rank gathers
        return digest.hexdigest()[:16]

    def _epoch_groups(self, epoch: int) -> list[list[Any]]:
        """This rank's micro-batches for the epoch, grouped into optimizer steps."""
        tr = self.cfg.training
        batches = self.source.epoch_batches(epoch, tr.batch_size, tr.drop_last)
        world, rank = self.acc.num_processes, self.acc.process_index
        if world > 1:  # pad by wrapping so every rank takes the same number of steps
            need = math.ceil(len(batches) / world) * world
            batches = (batches + batches[: need - len(batches)])[rank::world]
        accum = tr.gradient_accumulation_steps
        return [batches[i:i + accum] for i in range(0, len(batches), accum)]
