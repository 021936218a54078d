"""Checkpoint sweeps: which checkpoints, in which order, on which grid cell — and the headless renderer.

The ComfyUI sweep node and ``python -m trainer sweep`` share :func:`plan_sweep`: columns are checkpoints (base
first), rows are prompt × seed × strength. The step of a checkpoint is read from its metadata, never parsed out of
its file name; so is its validation loss (``crucible_val_loss``), which labels the column, and the column with the
lowest one carries :data:`trainer.render.BEST_MARK` (the compositor highlights it).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .errors import CrucibleError
from .run_record import CheckpointRecord, RunRecord

BASE_LABEL = "base"


@dataclass(frozen=True)
class SweepItem:
    path: Path | None  # None = the base model
    kind: str  # lora | full
    strength: float
    prompt: str
    seed: int
    label: str  # column label
    row_label: str
    column: int
    row: int


def read_checkpoint_info(path: str | Path) -> dict[str, Any]:
    """A checkpoint file's record as a dict (:meth:`~trainer.run_record.CheckpointRecord.to_dict`: path, step,
    epoch, loss, val_loss, … from its metadata, Crucible or kohya keys)."""
    return CheckpointRecord.from_file(path).to_dict()


def select_checkpoints(checkpoints: Sequence[dict], *, name_filter: str = "", every_nth: int = 1) -> list[dict]:
    """Sort by step (metadata), filter by name, keep every Nth — always keeping the last one and the one with the
    lowest validation loss."""
    items = [c for c in checkpoints if name_filter.lower() in Path(c.get("name") or c["path"]).name.lower()]
    items.sort(key=lambda c: (c.get("step") is None, c.get("step") or 0, Path(c["path"]).name))
    if every_nth > 1 and items:
        kept = items[::every_nth]
        if kept[-1] is not items[-1]:
            kept.append(items[-1])
        best = best_index([c.get("val_loss") for c in items])
        if best is not None and not any(c is items[best] for c in kept):  # the recommended one is always shown
            kept = sorted([*kept, items[best]], key=lambda c: (c.get("step") is None, c.get("step") or 0))
        items = kept
    if not items:
        raise CrucibleError(f"no checkpoint matches name_filter {name_filter!r}" if name_filter else "no checkpoints to sweep")
    return items


def column_label(c: dict, best: bool = False, with_val: bool = True) -> str:
    """``step 120 · ep 3 · val 0.1234``, with :data:`trainer.render.BEST_MARK` on the recommended column (without
    the loss when ``with_val`` is off: the headless grid prints it under the cells instead)."""
    from .render import BEST_MARK

    if c.get("step") is not None:
        label = f"step {c['step']}" + (f" · ep {c['epoch']}" if c.get("epoch") is not None else "")
    else:
        label = Path(c.get("name") or c["path"]).stem
    if with_val and c.get("val_loss") is not None:
        label += f" · val {c['val_loss']:.4f}"
    return label + (f" {BEST_MARK}" if best else "")


def best_index(values: Sequence[float | None]) -> int | None:
    """Position of the lowest validation loss (the first of equals), or None when none is known."""
    known = [(v, i) for i, v in enumerate(values) if v is not None and v == v]
    return min(known)[1] if known else None


def loss_caption(c: dict) -> str:
    """The caption under a checkpoint's cells: its validation loss, else the training loss of its last step."""
    if c.get("val_loss") is not None:
        return f"val loss {c['val_loss']:.4f}"
    return f"train loss {c['loss']:.4f}" if c.get("loss") is not None else ""


def plan_sweep(checkpoints: Sequence[dict], *, prompts: Sequence[str], seeds: Sequence[int],
               strengths: Sequence[float], include_base: bool = True, val_in_label: bool = True) -> list[SweepItem]:
    """Every (column, row) cell of the sweep grid as one item."""
    rows = [(p, s, w) for p in prompts for s in seeds for w in strengths]
    columns: list[tuple[Path | None, str, str]] = [(None, "lora", BASE_LABEL)] if include_base else []
    best = best_index([c.get("val_loss") for c in checkpoints])
    columns += [(Path(c["path"]), c.get("kind", "lora"), column_label(c, i == best, val_in_label))
                for i, c in enumerate(checkpoints)]
    multi = len(strengths) > 1
    items = []
    for r, (prompt, seed, strength) in enumerate(rows):
        row_label = prompt + (f" · seed {seed}" if len(seeds) > 1 else "") + (f" · x{strength:g}" if multi else "")
        for col, (path, kind, label) in enumerate(columns):
            items.append(SweepItem(path, kind, 0.0 if path is None else strength, prompt, seed, label, row_label,
                                   col, r))
    return items


def sweep_run(run_dir: str | Path, *, prompts: Sequence[str], seeds: Sequence[int], strengths: Sequence[float],
              steps: int = 20, cfg_scale: float = 7.0, include_base: bool = True, out: str | Path | None = None,
              every: int = 1, width: int = 0, height: int = 0) -> Path:
    """Render every checkpoint of a finished (or stopped) run with the diffusers pipeline and save the grid."""
    import torch

    from .config import TrainConfig
    from .families import get_family
    from .network import attach_network
    from .render import arrange, compose_grid, save_png

    run_dir = Path(run_dir)
    run = RunRecord.load(run_dir)
    cfg = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text(encoding="utf-8")))
    family = get_family(cfg.model.family)
    checkpoints = [dict(c.to_dict(), name=c.file, val_loss=CheckpointRecord.from_file(c.path).val_loss)
                   for c in run.checkpoints if c.path.exists()]  # val loss: the file's metadata
    chosen = select_checkpoints(checkpoints, every_nth=every)
    prompts = list(prompts) or list(cfg.sample.prompts) or ["a photo"]
    seeds = list(seeds) or [cfg.sample.seed]
    items = plan_sweep(chosen, prompts=prompts, seeds=seeds, strengths=strengths, include_base=include_base,
                       val_in_label=False)  # the validation loss goes under the cells (_loss_caption)
    comps = family.load(cfg.model)
    res = cfg.dataset.resolution if cfg.datasets else 512
    width, height = width or cfg.sample.width or res, height or cfg.sample.height or res
    full = run.kind == "full"
    net = None if full else attach_network(family, comps, cfg.network)
    base_state = {k: v.detach().clone() for k, v in comps.denoiser.state_dict().items()} if full else None
    images = []
    with torch.no_grad():
        for item in items:
            _apply_checkpoint(comps, net, item, base_state)
            images.extend(family.sample(comps, [item.prompt], seed=item.seed, steps=steps, cfg=cfg_scale,
                                        width=width, height=height))
    labels = {i.column: i.label for i in items}
    row_labels = {i.row: i.row_label for i in items}
    cells = arrange([_display_size(im) for im in images], [i.column for i in items], [i.row for i in items])
    losses = {i.column: _loss_caption(chosen, i) for i in items}
    composite = compose_grid(cells, col_labels=[labels[c] for c in sorted(labels)],
                             row_labels=[row_labels[r] for r in sorted(row_labels)],
                             title=f"{run.run_name}: {len(chosen)} checkpoints",
                             cell_captions=[[losses[c] for c in sorted(labels)] for _ in row_labels])
    out = Path(out) if out else run_dir / "sweep.png"
    best = best_index([c.get("val_loss") for c in chosen])
    return save_png(composite, out, {"crucible_sweep": {"run": run.run_name, "prompts": prompts,
                                                        "seeds": seeds, "strengths": list(strengths),
                                                        "best": chosen[best]["name"] if best is not None else None}})


def recommendation(checkpoints: Sequence[dict]) -> str:
    """One line naming the checkpoint with the lowest validation loss (dicts with path/name, step, val_loss)."""
    best = best_index([c.get("val_loss") for c in checkpoints])
    if best is None:
        return ("no validation loss recorded (no validation set: the dataset was too small for a split, or "
                "validation_split is 0); compare the columns by eye")
    c = checkpoints[best]
    name = Path(c.get("name") or c.get("file") or c["path"]).name
    return f"recommended: {name} (step {c.get('step')}, lowest validation loss {c['val_loss']:.4f})"


def _display_size(image, minimum: int = 256):
    """Small renders (tiny test models) are enlarged with nearest-neighbour so labels fit under them."""
    from PIL import Image

    factor = -(-minimum // max(1, min(image.size)))
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def _loss_caption(chosen: list[dict], item: SweepItem) -> str:
    if item.path is None:
        return ""
    return next((loss_caption(c) for c in chosen if Path(c["path"]) == item.path), "")


def _apply_checkpoint(comps, net, item: SweepItem, base_state) -> None:
    from safetensors.torch import load_file

    from .checkpoints import load_lora_file

    if base_state is not None:  # full fine-tune: swap the denoiser weights
        comps.denoiser.load_state_dict(load_file(str(item.path)) if item.path else base_state)
        return
    load_lora_file(net, item.path, strength=item.strength)
