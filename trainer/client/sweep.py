"""The checkpoint sweep through a running ComfyUI: one workflow run per checkpoint (the loader node's file name
patched), composed into one labelled strip.

Checkpoints are :class:`~trainer.run_record.CheckpointRecord` s, listed and labelled exactly as
``python -m trainer sweep`` does (:func:`trainer.run_record.list_checkpoints`, :func:`trainer.sweep.column_label`).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..errors import ModelLoadError
from ..run_record import CheckpointRecord, list_checkpoints
from .errors import ComfyError
from .workflow import LoaderRef, find_loader, prepare_workflow, validate_workflow

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from ..render import Composite, GridStyle
    from .server import ComfyClient


@dataclass
class SweepResult:
    """What :func:`run_sweep` produced: the composite and, per checkpoint, its prompt id and images."""

    composite: "Composite"
    checkpoints: list[CheckpointRecord]
    prompt_ids: list[str]
    images: list[list["Image.Image"]]
    loader: LoaderRef

    @property
    def best(self) -> CheckpointRecord | None:
        """The checkpoint with the lowest validation loss (its metadata's ``crucible_val_loss``), if any has one."""
        from ..sweep import best_index

        index = best_index([c.val_loss for c in self.checkpoints])
        return None if index is None else self.checkpoints[index]

    def metadata(self, name_prefix: str = "") -> dict:
        """JSON-able description for the PNG's text chunks."""
        best = self.best
        return {"loader": {"node_id": self.loader.node_id, "input": self.loader.input_name},
                "checkpoints": [{"file": c.path.name, "step": c.step, "value": c.value(name_prefix), "prompt_id": p,
                                 "val_loss": c.val_loss} for c, p in zip(self.checkpoints, self.prompt_ids)],
                "best": best.path.name if best is not None else None}


def run_sweep(client: "ComfyClient", workflow: Mapping[str, Any],
              checkpoints: str | Path | Sequence[CheckpointRecord], *, loader_title: str | None = None,
              loader_class: str | None = None, input_name: str | None = None, name_prefix: str = "",
              prompt_text: str | None = None, seed: int | None = None, timeout: float = 600.0,
              total_timeout: float | None = None, title: str = "", style: "GridStyle | None" = None) -> SweepResult:
    """Run ``workflow`` once per checkpoint (patched into the loader node) and compose a labelled strip.

    Columns follow the checkpoints' step order, labelled "step N · val <loss>" (or the file name; the validation
    loss from the files' metadata), the lowest validation loss marked best, captioned with the file name.
    When a run outputs several images they become rows. ``timeout`` applies to each prompt,
    ``total_timeout`` to the whole sweep.
    """
    base = validate_workflow(workflow)
    loader = find_loader(base, title=loader_title, class_type=loader_class, input_name=input_name)
    base = prepare_workflow(base, prompt_text=prompt_text, seed=seed)
    ckpts = list_checkpoints(checkpoints) if isinstance(checkpoints, (str, Path)) else list(checkpoints)
    if not ckpts:
        raise ModelLoadError("no checkpoints to sweep; pass a folder with .safetensors files")
    overall = time.monotonic() + total_timeout if total_timeout else None
    try:
        prompt_ids, images = _run_all(client, base, loader, ckpts, name_prefix, timeout, overall)
    finally:
        client.close()
    composite = compose_sweep(ckpts, images, title=title, style=style)
    return SweepResult(composite, ckpts, prompt_ids, images, loader)


def _run_all(client: "ComfyClient", base: dict, loader: LoaderRef, ckpts: Sequence[CheckpointRecord],
             name_prefix: str, timeout: float, overall: float | None) -> tuple[list[str], list[list["Image.Image"]]]:
    prompt_ids: list[str] = []
    images: list[list["Image.Image"]] = []
    for i, ckpt in enumerate(ckpts, 1):
        tag = f"[{i}/{len(ckpts)}] {ckpt.label}"
        prompt = copy.deepcopy(base)
        prompt[loader.node_id]["inputs"][loader.input_name] = ckpt.value(name_prefix)
        started = time.monotonic()
        prompt_id = client.queue(prompt)
        client.log(f"{tag}: queued {ckpt.value(name_prefix)} as {prompt_id}")
        entry = client.wait(prompt_id, timeout, deadline=overall)
        outputs = client.images(entry, timeout=None if overall is None else overall - time.monotonic())
        if not outputs:
            raise ComfyError(f"prompt {prompt_id} ({ckpt.path.name}) produced no images; "
                             "add a SaveImage or PreviewImage node to the workflow")
        client.log(f"{tag}: {len(outputs)} image(s) in {time.monotonic() - started:.1f} s")
        prompt_ids.append(prompt_id)
        images.append(outputs)
    return prompt_ids, images


def compose_sweep(checkpoints: Sequence[CheckpointRecord], images: Sequence[Sequence[Any]], *, title: str = "",
                  style: "GridStyle | None" = None) -> "Composite":
    """One column per checkpoint; a strip when each gave one image, else one row per output image."""
    from .. import render
    from ..sweep import best_index, column_label

    style = style or render.GridStyle()
    best = best_index([c.val_loss for c in checkpoints])
    labels = [column_label({"step": c.step, "val_loss": c.val_loss, "path": str(c.path)}, i == best)
              for i, c in enumerate(checkpoints)]
    captions = [c.path.name for c in checkpoints]
    if all(len(imgs) == 1 for imgs in images):
        return render.compose_strip([imgs[0] for imgs in images], labels, title=title, captions=captions, style=style)
    rows = max(len(imgs) for imgs in images)
    cells = [[imgs[r] if r < len(imgs) else None for imgs in images] for r in range(rows)]
    return render.compose_grid(cells, col_labels=labels, row_labels=[f"image {r + 1}" for r in range(rows)],
                               title=title, cell_captions=[captions] + [[""] * len(images)] * (rows - 1),
                               style=style)
