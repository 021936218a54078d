"""What a run leaves behind: checkpoints (with validation loss), pruning to the checkpoint limit, the resumable
state, ``run.json`` and preview samples.

:class:`RunOutputs` is one part of :class:`trainer.loop.Trainer`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path

import torch

from .callbacks import SampleInfo
from .checkpoints import checkpoint_metadata, write_checkpoint
from .deepspeed_zero import deepspeed_training_state, master_weights
from .fileio import atomic_write, atomic_write_json
from .plots import save_loss_curve
from .run_record import RunRecord
from .network import ADAPTER
from .sample_prompts import preview_conditioning
from .sharding import (OPTIMIZER_BY_NAME, GatheredWeights, adapter_export_states, dora_base_weights, full_state_dict,
                       training_state)
from .state import save_state
from .validation import validation_summary

log = logging.getLogger("crucible")


class RunOutputs:
    """Checkpoints, state, manifest and samples (part of :class:`trainer.loop.Trainer`)."""

    def _save(self, step: int, epoch: int, final: bool) -> None:
        self.acc.wait_for_everyone()
        main = self.acc.is_main_process
        # DeepSpeed: the fp32 master weights a full fine-tune exports, gathered from every rank's slice onto rank 0
        masters = master_weights(self.comps.denoiser) if self.deepspeed else None
        if main or self.sharded:  # sharded: validating and gathering the weights need every rank; rank 0 writes
            # the encoders come back only for a single-file export (validation encoded its inputs before step 1)
            with self._ema_weights(), self._encoders_on_device(self._save_needs_encoders()), self.acc.autocast():
                validation = self.validator.evaluate()
                comps, adapters, bases = self.comps, None, None  # sharded: only the denoiser trains (trainer.sharding)
                if self.sharded and self.net.is_full:  # gathered whole on rank 0
                    comps = dataclasses.replace(comps, denoiser=GatheredWeights(full_state_dict(comps.denoiser)))
                elif masters is not None:
                    comps = dataclasses.replace(comps, denoiser=GatheredWeights(masters))
                elif self.sharded:  # adapters: they alone (and DoRA's base weights), gathered whole on rank 0
                    adapters = adapter_export_states(self.net.modules, ADAPTER)
                    bases = dora_base_weights(self.net.modules, ADAPTER)
                if main:
                    loss = self.losses[-1] if self.losses else None
                    meta = checkpoint_metadata(self.cfg, self.source, run_name=self.run_name, step=step,
                                               epoch=epoch, started_at=self.started_at, loss=loss,
                                               validation=validation)
                    info = write_checkpoint(self.family, comps, self.net, self.cfg.save, self.run_dir,
                                            self.run_name, step, epoch, meta, loss=loss, final=final,
                                            validation=validation, adapter_states=adapters,
                                            dora_bases=bases)
            del comps, bases  # the gathered copies go before the state is gathered
        del masters
        state = None
        if self.cfg.save.save_state and (self.sharded or self.deepspeed):  # gathered whole on rank 0
            state = training_state(self) if self.sharded else deepspeed_training_state(self)
        if main:
            self.checkpoints.append(info)
            self._prune()
            if self.cfg.save.save_state:
                self._save_state(step, epoch, state)
            self._write_manifest("running")
            save_loss_curve(self.work_dir / "loss_curve.png", self.losses, self.checkpoints)
            self.callbacks.on_checkpoint(info)
        self.acc.wait_for_everyone()

    def _save_needs_encoders(self) -> bool:
        """A full fine-tune's single-file export holds the VAE and text encoders; validation's inputs are encoded
        before the cached encoders leave the device (trainer.run_setup._pre_encode)."""
        return self.acc.is_main_process and self.net.is_full and bool(self.cfg.save.single_file_dir)

    @contextlib.contextmanager
    def _ema_weights(self):
        if self.ema is None:
            yield
            return
        params = self.net.parameters()
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    def _save_state(self, step: int, epoch: int, sharded_state=None) -> None:
        """``sharded_state``: the whole (network, optimizer, EMA) state a sharded run gathered on every rank."""
        network, optimizer, ema = sharded_state or (self.net.state_dicts(), self.optimizer.state_dict(),
                                                    self.ema.state_dict() if self.ema is not None else {})
        payload = {
            "network": network,
            "optimizer": optimizer,
            "optimizer_keys": OPTIMIZER_BY_NAME if sharded_state else "indices",
            "scheduler": self.scheduler.state_dict(),
            "ema": ema,
            "losses": list(self.losses),
            "scaler": self.acc.scaler.state_dict() if self.acc.scaler is not None else {},  # fp16: resume exact
        }
        save_state(self.state_dir, step=step, epoch=epoch, payload=payload, cfg=self.cfg,
                   data_fingerprint=self.source.fingerprint(), extra={"run_name": self.run_name})

    def _prune(self) -> None:
        limit = self.cfg.save.checkpoint_limit
        if limit <= 0 or len(self.checkpoints) <= limit:
            return
        keep_last = self.checkpoints[-1]
        older = self.checkpoints[:-1]
        single_dir = Path(self.cfg.save.single_file_dir) / self.run_name if self.cfg.save.single_file_dir else None
        while len(older) + 1 > limit and older:
            victim = older.pop(0)
            for path in (victim.path, single_dir / victim.path.name if single_dir else None):
                if path is not None:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
            log.info("checkpoint limit %d: removed %s", limit, victim.path.name)
        self.checkpoints = older + [keep_last]

    def _write_manifest(self, status: str) -> RunRecord | None:
        if not self.acc.is_main_process:
            return None
        record = RunRecord(self.run_name, self.family.name, "full" if self.net.is_full else "lora", status,
                           self.run_dir, self.work_dir, list(self.checkpoints),
                           validation_summary(self.validator, self.checkpoints), list(self.losses),
                           self.plan.to_dict(), self.resolved,
                           [{"step": s.step, "paths": [str(p) for p in s.paths]} for s in self.samples],
                           dict(self.family.base_patches))
        record.write()
        return record

    def _sample(self, step: int, epoch: int) -> None:
        self.acc.wait_for_everyone()
        if self.acc.is_main_process or self.sharded:  # a sharded model renders on every rank; rank 0 keeps it
            s = self.cfg.sample
            res = self.cfg.dataset.resolution
            modules = list(self.net.modules.values())
            modes = [m.training for m in modules]
            for m in modules:
                m.eval()
            try:
                with torch.no_grad(), self._ema_weights(), self.acc.autocast(), preview_conditioning(self) as encoded:
                    extra = {"conditioning": encoded} if encoded is not None else {}  # the prompts, pre-encoded
                    images = self.family.sample(self.comps, s.prompts, seed=s.seed, steps=s.steps, cfg=s.cfg,
                                                width=s.width or res, height=s.height or res,
                                                negative_prompt=s.negative_prompt, guidance=s.guidance, **extra)
            finally:
                for m, mode in zip(modules, modes):
                    m.train(mode)
        if self.acc.is_main_process:
            paths = []
            for i, image in enumerate(images):
                path = self.work_dir / "samples" / f"{self.run_name}-s{step:06d}-p{i}.png"
                atomic_write(path, lambda tmp, im=image: im.save(tmp, format="PNG"))
                paths.append(path)
            info = SampleInfo(step, epoch, tuple(s.prompts), tuple(images), tuple(paths))
            self.samples.append(info)
            self.callbacks.on_sample(info)
        self.acc.wait_for_everyone()
