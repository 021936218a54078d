"""Checkpoint sweep: one LoRA-patched MODEL/CLIP (or, for a full fine-tune, the base MODEL patched from the
checkpoint file on demand) per checkpoint × strength × prompt × seed, as
list outputs, so the user's own CLIPTextEncode → KSampler → VAEDecode chain renders each one in a single queue item.
"""
from __future__ import annotations

from ..trainer import CrucibleError, SweepItem, plan_sweep, read_checkpoint_info, select_checkpoints
from . import _comfy
from ._sockets import RUN, check_socket
from .lists import lines, numbers
from .widgets import BOOL, INT, STRING, combo

FROM_RUN = "(from run input)"


class CrucibleCheckpointSweep:
    CATEGORY = "Crucible/sample"
    RETURN_TYPES = ("MODEL", "CLIP", "STRING", "INT", "STRING", "INT", "INT", "STRING")
    RETURN_NAMES = ("model", "clip", "prompt", "seed", "label", "column", "row", "row_label")
    OUTPUT_IS_LIST = (True,) * 8
    FUNCTION = "sweep"
    DESCRIPTION = ("Emits every checkpoint × strength × prompt × seed as lists: wire model/clip/prompt/seed into "
                   "your own CLIPTextEncode + KSampler, and label/column/row into Crucible Image Grid.")

    @classmethod
    def INPUT_TYPES(cls):
        folders = [f"loras/{n}" for n in _comfy.list_model_subfolders("loras")]
        folders += [f"diffusion_models/{n}" for n in _comfy.list_model_subfolders("diffusion_models")]
        return {"required": {
            "model": ("MODEL", {"tooltip": "The base MODEL from your own loader (the one you trained on)."}),
            "clip": ("CLIP", {"tooltip": "The base CLIP from your own loader."}),
            "folder": combo([FROM_RUN] + folders, FROM_RUN, "Checkpoints to sweep: the run input, or a run folder in models/loras or models/diffusion_models."),
            "prompts": STRING("a photo of sks", "One prompt per line: each is a row.", multiline=True),
            "seeds": STRING("1234", "Seeds, comma-separated: each is a row (fixed seed by default)."),
            "strengths": STRING("1.0", "LoRA strengths, comma-separated (e.g. 0.6, 0.8, 1.0 — the SeaArt comparison): each is a row."),
            "include_base": BOOL(True, "Add a column rendered with the base model (no LoRA)."),
            "every_nth": INT(1, 1, 1000, "Use every Nth checkpoint (the last one is always kept)."),
            "name_filter": STRING("", "Only checkpoints whose file name contains this text."),
        }, "optional": {
            "run": (RUN, {"tooltip": "The run output of Crucible Train."}),
        }}

    @classmethod
    def IS_CHANGED(cls, folder, **_):
        if folder == FROM_RUN:
            return ""
        kind, _, name = folder.partition("/")
        return ",".join(n for n in _comfy.list_models(kind) if n.startswith(name + "/"))

    def sweep(self, model, clip, folder, prompts, seeds, strengths, include_base, every_nth, name_filter, run=None):
        checkpoints = _checkpoints(folder, run)
        chosen = select_checkpoints(checkpoints, name_filter=name_filter, every_nth=every_nth)
        items = plan_sweep(chosen, prompts=_prompts(prompts), seeds=_ints(seeds, "seeds"),
                           strengths=_float_list(strengths), include_base=include_base)
        cache: dict = {}
        out = [[] for _ in self.RETURN_TYPES]
        for item in items:
            m, c = _patched(model, clip, item, cache)
            for slot, value in enumerate((m, c, item.prompt, item.seed, item.label, item.column, item.row, item.row_label)):
                out[slot].append(value)
        return tuple(out)


def _checkpoints(folder: str, run) -> list[dict]:
    if folder == FROM_RUN:
        if not run:
            raise CrucibleError("Crucible Checkpoint Sweep: connect a run, or pick a folder of checkpoints")
        return _run_checkpoints(run)
    kind, _, name = folder.partition("/")
    found = []
    for rel in _comfy.list_models(kind):
        if rel.startswith(name + "/") and rel.endswith(".safetensors"):
            path = _comfy.model_path(kind, rel)
            found.append(dict(read_checkpoint_info(path), name=rel, kind="full" if kind == "diffusion_models" else "lora"))
    if not found:
        raise CrucibleError(f"no .safetensors checkpoints in models/{folder}")
    return found


def _run_checkpoints(run) -> list[dict]:
    """A run record's checkpoints, each confined to ComfyUI's loras / diffusion_models / checkpoints folders."""
    check_socket("Crucible Checkpoint Sweep", "run", RUN, run)
    kind, entries = run.get("kind"), run.get("checkpoints")
    if kind not in ("lora", "full") or not isinstance(entries, list) or not entries:
        raise CrucibleError("Crucible Checkpoint Sweep: the run has no checkpoints (it saved none); train with "
                            "save_every_n_epochs or save_every_n_steps, or pick a folder")
    found = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise CrucibleError(f"Crucible Checkpoint Sweep: checkpoint {i} of the run is not a checkpoint record")
        path = _comfy.confine_checkpoint(entry.get("path"), f"Crucible Checkpoint Sweep: checkpoint {i} of the run")
        found.append(dict(entry, path=str(path), kind=kind))
    return found


def _patched(model, clip, item: SweepItem, cache: dict):
    key = (item.path, item.strength)
    if key not in cache:
        if item.path is None:
            cache[key] = (model, clip)
        elif item.kind == "full":
            cache[key] = (_comfy.full_checkpoint_model(model, item.path), clip)  # weights stay in the file
        else:
            cache[key] = _comfy.apply_lora(model, clip, item.path, item.strength)
    return cache[key]


def _prompts(text: str) -> list[str]:
    prompts = list(lines(text))
    if not prompts:
        raise CrucibleError("Crucible Checkpoint Sweep: 'prompts' is empty; give at least one prompt (one per line)")
    return prompts


MAX_SEED = 2**64 - 1  # KSampler's seed range
MAX_STRENGTH = 100.0


def _ints(text: str, what: str) -> list[int]:
    return list(numbers(text, f"Crucible Checkpoint Sweep: '{what}'", whole=True, lo=0, hi=MAX_SEED)) or [0]


def _float_list(text: str) -> list[float]:
    return list(numbers(text, "Crucible Checkpoint Sweep: 'strengths'", lo=-MAX_STRENGTH, hi=MAX_STRENGTH)) or [1.0]


NODES = {"CrucibleCheckpointSweep": CrucibleCheckpointSweep}
NAMES = {"CrucibleCheckpointSweep": "Crucible Checkpoint Sweep"}
