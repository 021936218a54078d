"""Stage check: the validation loss reaches a real ComfyUI's sweep grid.

After ``crucible_ci_lora_sweep`` (12 demo images, so the default ``validation_split`` holds one out) every LoRA it saved
in ``models/loras/ci_sweep/`` must carry ``crucible_val_loss`` in its metadata, and the newest grid it saved
(``output/crucible/ci_lora_sweep_*.png``) must label each checkpoint column with that loss and mark exactly the lowest
one with ``trainer.render.BEST_MARK``.
"""
from __future__ import annotations

import sys
from pathlib import Path

RUN_FOLDER = ("models", "loras", "ci_sweep")
GRID_GLOB = "crucible/ci_lora_sweep*.png"
NAME = "validation: ci_sweep LoRAs carry crucible_val_loss and the grid labels mark the lowest"


def problems_for(comfy_root: Path, pack_dir: Path) -> tuple[list[str] | None, str]:
    """(problems, detail); problems is None when there is nothing to check (the sweep workflow did not run)."""
    if str(pack_dir) not in sys.path:
        sys.path.insert(0, str(pack_dir))
    from trainer.render import BEST_MARK, read_layout
    from trainer.sweep import read_checkpoint_info

    folder = comfy_root.joinpath(*RUN_FOLDER)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    grids = sorted((comfy_root / "output").glob(GRID_GLOB), key=lambda p: p.stat().st_mtime)
    if not files or not grids:
        return None, f"no LoRAs in {folder} or no grid {GRID_GLOB} in output/ (crucible_ci_lora_sweep did not run)"
    infos = sorted((read_checkpoint_info(p) for p in files), key=lambda i: i["step"] or 0)
    problems = [f"{Path(i['path']).name}: no crucible_val_loss in its metadata" for i in infos if i["val_loss"] is None]
    labels = read_layout(grids[-1]).get("col_labels") or []
    columns = labels[1:] if labels and labels[0] == "base" else labels
    if len(columns) != len(infos):
        return problems + [f"{grids[-1].name}: {len(columns)} checkpoint columns {columns} for {len(infos)} LoRAs"], ""
    known = [i["val_loss"] for i in infos if i["val_loss"] is not None]
    lowest = min(known) if known else None
    for info, label in zip(infos, columns):
        val = info["val_loss"]
        if val is not None and f"val {val:.4f}" not in label:
            problems.append(f"column {label!r} does not show {Path(info['path']).name}'s validation loss {val:.4f}")
        if (BEST_MARK in label) != (val is not None and val == lowest):
            problems.append(f"column {label!r}: the best mark {BEST_MARK!r} belongs on the lowest validation loss "
                            f"only ({lowest})")
    return problems, f"{grids[-1].name}: {columns}"


async def run_checks(ctx) -> None:
    problems, detail = problems_for(Path(ctx.comfy_root), Path(ctx.pack_dir))
    if problems is None:
        ctx.results.skip(NAME, detail)
    else:
        ctx.results.check(NAME, problems, detail)
