"""The step plan: how many steps a run takes and at which steps it saves checkpoints and renders samples.

The training loop follows this plan exactly; the rules live here once, as functions the loop calls.

Counting rules
--------------
* **Samples per epoch** = Σ images × repeats (regularization samples included, see
  :class:`trainer.dataset.DataSource`).
* **Batches per epoch** = Σ over buckets of ⌈n / batch_size⌉, or ⌊n / batch_size⌋ with ``drop_last`` (a batch
  never mixes buckets, so every bucket may end with a partial batch).
* **Steps per epoch** (optimizer steps) = ⌈batches / gradient_accumulation_steps⌉: the optimizer steps after every
  ``gradient_accumulation_steps`` micro-batches *and* after the epoch's last micro-batch, so a short final group
  still makes a step and accumulation never straddles two epochs (kohya/accelerate behaviour).
* **Total steps** = epochs × steps per epoch; when ``training.max_train_steps > 0`` it is ``max_train_steps`` and
  the run needs ⌈max_train_steps / steps per epoch⌉ epochs, the last one possibly cut short.
* **Warmup** = ⌊lr_warmup_ratio × total⌋ when the ratio is > 0 (kohya's ``int(ratio × total)``), else
  ``lr_warmup_steps``; never above total. :func:`warmup_steps` is the one place this is computed: the plan shows it
  and the scheduler applies it. ``constant`` with a warmup runs as ``constant_with_warmup`` (:func:`scheduler_name`).

Steps are 1-based global optimizer steps; epochs are 1-based. Step ``s`` belongs to epoch ``⌈s / steps per epoch⌉``.

Save / sample rules
-------------------
* ``save_every_n_epochs = N``: at the last step of every complete epoch ``e`` with ``e % N == 0``.
* ``save_every_n_steps = M``: at every step ``s`` with ``s % M == 0``.
* ``save_last``: at the final step.
* Samples: the same with ``sample_every_n_epochs`` / ``sample_every_n_steps`` (no implicit final sample). Prompts
  given with neither set render one preview per epoch (prompts never render nothing silently).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Mapping

from .errors import ConfigError, DatasetError
from .families.settings import check_family_settings

if TYPE_CHECKING:  # pragma: no cover
    from .config import OptimConfig, TrainConfig
    from .dataset import DataSource

Resolution = tuple[int, int]


@dataclass(frozen=True)
class StepPlan:
    """Every number of a run, fixed before training starts."""

    samples_per_epoch: int
    batches_per_epoch: int
    steps_per_epoch: int
    epochs: int
    total_steps: int
    warmup_steps: int
    batch_size: int
    gradient_accumulation_steps: int
    drop_last: bool
    bucket_counts: tuple[tuple[Resolution, int], ...]  # samples per bucket, sorted
    save_every_n_epochs: int
    save_every_n_steps: int
    save_last: bool
    sample_every_n_epochs: int
    sample_every_n_steps: int
    save_points: tuple[tuple[int, int], ...]  # (step, epoch) pairs, ascending
    sample_points: tuple[tuple[int, int], ...]
    num_processes: int = 1  # data-parallel processes: each takes every Nth batch (padded to equal length)
    lr_scheduler: str = ""  # the scheduler that runs (see scheduler_name)
    notes: tuple[str, ...] = ()  # settings this model ignores (trainer.families.settings), shown with the plan

    @property
    def batches_per_process(self) -> int:
        return math.ceil(self.batches_per_epoch / self.num_processes)

    # --- rules the loop calls ------------------------------------------------------------------------------------
    def epoch_of(self, step: int) -> int:
        """The 1-based epoch that 1-based optimizer step ``step`` belongs to."""
        self._check_step(step)
        return (step - 1) // self.steps_per_epoch + 1

    def is_epoch_end(self, step: int) -> bool:
        """Whether ``step`` is the last optimizer step of a complete epoch."""
        self._check_step(step)
        return step % self.steps_per_epoch == 0

    def is_save_step(self, step: int) -> bool:
        """Whether a checkpoint is written after optimizer step ``step`` (see module docstring)."""
        return _is_event(self, step, self.save_every_n_epochs, self.save_every_n_steps, self.save_last)

    def is_sample_step(self, step: int) -> bool:
        """Whether samples are rendered after optimizer step ``step``."""
        return _is_event(self, step, self.sample_every_n_epochs, self.sample_every_n_steps, False)

    def micro_batches_in_step(self, step: int) -> int:
        """How many micro-batches optimizer step ``step`` accumulates (the epoch's last step may have fewer)."""
        self._check_step(step)
        within = (step - 1) % self.steps_per_epoch  # 0-based step inside its epoch
        start = within * self.gradient_accumulation_steps
        return min(self.gradient_accumulation_steps, self.batches_per_process - start)

    def _check_step(self, step: int) -> None:
        if not 1 <= step <= self.total_steps:
            raise ValueError(f"step {step} is outside the plan (1..{self.total_steps})")

    # --- presentation --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (buckets as ``"WxH"``, points as ``[step, epoch]`` lists)."""
        data = asdict(self)
        data["bucket_counts"] = {f"{w}x{h}": n for (w, h), n in self.bucket_counts}
        data["save_points"] = [list(p) for p in self.save_points]
        data["sample_points"] = [list(p) for p in self.sample_points]
        return data

    def format(self) -> str:
        """Readable summary for the UI and the console."""
        accum = self.gradient_accumulation_steps
        lines = [
            f"{self.samples_per_epoch} samples per epoch in {len(self.bucket_counts)} bucket(s): "
            + ", ".join(f"{w}x{h}: {n}" for (w, h), n in self.bucket_counts),
            f"batch size {self.batch_size}{' (drop_last)' if self.drop_last else ''}: "
            f"{self.batches_per_epoch} batches per epoch"
            + (f", gradient accumulation {accum}" if accum > 1 else ""),
            f"{self.steps_per_epoch} optimizer steps per epoch x {self.epochs} epoch(s) = {self.total_steps} steps"
            + ("" if self.total_steps == self.epochs * self.steps_per_epoch else " (max_train_steps)"),
            f"warmup: {self.warmup_steps} step(s)" + (
                " (lr_scheduler constant with warmup runs as constant_with_warmup)"
                if self.warmup_steps and self.lr_scheduler == "constant_with_warmup" else ""),
            *self._dropped_line(),
            "checkpoints at steps: " + (_points(self.save_points) or "none (nothing will be saved!)"),
        ]
        if self.sample_points:
            lines.append("samples at steps: " + _points(self.sample_points))
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


    def _dropped_line(self) -> list[str]:
        dropped = sum(n % self.batch_size for _, n in self.bucket_counts) if self.drop_last else 0
        return [f"drop_last leaves out {dropped} sample(s) per epoch (each epoch a different random subset)"] \
            if dropped else []


def _points(points: tuple[tuple[int, int], ...], limit: int = 12) -> str:
    text = ", ".join(f"{s} (epoch {e})" for s, e in points[:limit])
    return text + (f", ... ({len(points)} in all)" if len(points) > limit else "")


def _is_event(plan: StepPlan, step: int, every_epochs: int, every_steps: int, at_last: bool) -> bool:
    plan._check_step(step)
    if at_last and step == plan.total_steps:
        return True
    if every_steps > 0 and step % every_steps == 0:
        return True
    return every_epochs > 0 and plan.is_epoch_end(step) and plan.epoch_of(step) % every_epochs == 0


def plan_from_counts(bucket_counts: Mapping[Resolution, int], cfg: "TrainConfig", num_processes: int = 1) -> StepPlan:
    """Build the plan from samples per bucket (images × repeats) and the run config; no files needed.

    With ``num_processes`` > 1 (``accelerate launch``) every process takes ⌈batches / processes⌉ batches per epoch,
    so one optimizer step consumes that many times more samples.
    """
    t, s, p, o = cfg.training, cfg.save, cfg.sample, cfg.optim
    counts = tuple(sorted((tuple(b), int(n)) for b, n in bucket_counts.items() if n > 0))
    if t.batch_size < 1:
        raise ConfigError(f"training.batch_size is {t.batch_size}; it must be at least 1")
    if t.gradient_accumulation_steps < 1:
        raise ConfigError("training.gradient_accumulation_steps must be at least 1")
    samples = sum(n for _, n in counts)
    batches = sum(n // t.batch_size if t.drop_last else math.ceil(n / t.batch_size) for _, n in counts)
    if batches == 0:
        raise DatasetError(_no_batches_message(samples, t.batch_size, t.drop_last))
    steps_per_epoch = math.ceil(math.ceil(batches / num_processes) / t.gradient_accumulation_steps)
    if t.max_train_steps > 0:
        total, epochs = t.max_train_steps, math.ceil(t.max_train_steps / steps_per_epoch)
    else:
        epochs = t.epochs
        total = epochs * steps_per_epoch
    warmup = warmup_steps(o, total)
    plan = StepPlan(
        samples_per_epoch=samples, batches_per_epoch=batches, steps_per_epoch=steps_per_epoch, epochs=epochs,
        total_steps=total, warmup_steps=warmup, batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, drop_last=t.drop_last, bucket_counts=counts,
        save_every_n_epochs=s.save_every_n_epochs, save_every_n_steps=s.save_every_n_steps, save_last=s.save_last,
        sample_every_n_epochs=_sample_epochs(p), sample_every_n_steps=p.sample_every_n_steps,
        save_points=(), sample_points=(), num_processes=num_processes,
        lr_scheduler=scheduler_name(o.lr_scheduler, warmup), notes=tuple(check_family_settings(cfg)),
    )
    return _with_points(plan)


def _sample_epochs(sample) -> int:
    """``sample_every_n_epochs``, or 1 when prompts are given with no cadence at all."""
    if sample.prompts and sample.sample_every_n_epochs <= 0 and sample.sample_every_n_steps <= 0:
        return 1
    return sample.sample_every_n_epochs


def warmup_steps(optim: "OptimConfig", total_steps: int) -> int:
    """Warmup steps of a run of ``total_steps``: ⌊ratio × total⌋ when ``lr_warmup_ratio`` > 0, else
    ``lr_warmup_steps``; capped to the run. The plan and the scheduler both use this value."""
    if optim.lr_warmup_ratio > 0:
        steps = math.floor(optim.lr_warmup_ratio * total_steps + 1e-9)  # 0.29 × 100 is 28.999…: still 29
    else:
        steps = optim.lr_warmup_steps
    return max(0, min(int(steps), total_steps))


def scheduler_name(name: str, warmup: int) -> str:
    """The scheduler that runs: ``constant`` with a warmup becomes ``constant_with_warmup`` (diffusers' plain
    ``constant`` would ignore the warmup the plan shows)."""
    return "constant_with_warmup" if name == "constant" and warmup > 0 else name


def _with_points(plan: StepPlan) -> StepPlan:
    """Fill ``save_points``/``sample_points`` by applying the step rules, so list and rules cannot disagree."""
    candidates = set()
    for every in (plan.save_every_n_steps, plan.sample_every_n_steps):
        if every > 0:
            candidates.update(range(every, plan.total_steps + 1, every))
    candidates.update(range(plan.steps_per_epoch, plan.total_steps + 1, plan.steps_per_epoch))
    candidates.add(plan.total_steps)
    steps = sorted(candidates)
    saves = tuple((s, plan.epoch_of(s)) for s in steps if plan.is_save_step(s))
    samples = tuple((s, plan.epoch_of(s)) for s in steps if plan.is_sample_step(s))
    return replace(plan, save_points=saves, sample_points=samples)


def _no_batches_message(samples: int, batch_size: int, drop_last: bool) -> str:
    if samples == 0:
        return "the dataset has no samples: add images (or repeats) to the dataset folder"
    return (f"no full batch can be made: every bucket has fewer than batch_size={batch_size} samples and drop_last "
            f"is {'on' if drop_last else 'off'}; lower training.batch_size or turn training.drop_last off")


def compute_plan(cfg: "TrainConfig", source: "DataSource", num_processes: int = 1) -> StepPlan:
    """The plan for a run over an already scanned :class:`~trainer.dataset.DataSource`."""
    return plan_from_counts(source.bucket_counts(), cfg, num_processes)


__all__ = ["StepPlan", "plan_from_counts", "compute_plan", "warmup_steps", "scheduler_name"]
