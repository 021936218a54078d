"""The one module that touches ComfyUI's runtime (folder_paths, comfy.*).

Everything else in ``nodes/`` calls these helpers, so tests can stub this module's few imports and the rest of the
pack stays ComfyUI-agnostic. Imports of ComfyUI modules happen inside functions: importing the pack never needs a
ComfyUI that is fully initialised.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from trainer.callbacks import Callbacks, CheckpointInfo, SampleInfo, StepInfo
from trainer.errors import CrucibleError
from trainer.fileio import ensure_inside

ALLOWED_DIRS_ENV = "CRUCIBLE_ALLOWED_DIRS"
SETTINGS_FILE = "crucible_settings.json"


# --- folders ---------------------------------------------------------------------------------------------------------
def _folder_paths():
    import folder_paths

    return folder_paths


# ComfyUI before mid-2024 called these folders by their old names.
LEGACY_KINDS = {"diffusion_models": "unet", "text_encoders": "clip"}


def _kind(kind: str) -> str:
    fp = _folder_paths()
    return LEGACY_KINDS.get(kind, kind) if kind not in fp.folder_names_and_paths else kind


def model_folder(kind: str) -> Path:
    """The first folder ComfyUI registers for ``kind`` (``loras``, ``diffusion_models``, ``checkpoints`` …)."""
    fp = _folder_paths()
    resolved = _kind(kind)
    folders = fp.get_folder_paths(resolved) if resolved in fp.folder_names_and_paths else []
    if not folders:
        raise CrucibleError(f"ComfyUI has no '{kind}' model folder configured")
    # ComfyUI lists the legacy models/unet before models/diffusion_models: prefer the folder named like the kind.
    return Path(next((f for f in folders if Path(f).name == kind), folders[0]))


def list_models(kind: str) -> list[str]:
    fp = _folder_paths()
    try:
        return sorted(fp.get_filename_list(_kind(kind)))
    except KeyError:
        return []


def model_path(kind: str, name: str) -> Path:
    fp = _folder_paths()
    path = fp.get_full_path(_kind(kind), name)
    if path is None and kind in LEGACY_KINDS:
        path = fp.get_full_path(LEGACY_KINDS[kind], name)
    if path is None:
        raise CrucibleError(f"'{name}' is not in ComfyUI's models/{kind} folder; pick a file from the list")
    return Path(path)


def list_model_subfolders(kind: str) -> list[str]:
    """Sub-folders of a model folder that hold .safetensors files (one per training run)."""
    names = {Path(n).parent.as_posix() for n in list_models(kind) if n.endswith(".safetensors")}
    return sorted(n for n in names if n and n != ".")


def input_dir() -> Path:
    return Path(_folder_paths().get_input_directory())


def output_dir() -> Path:
    return Path(_folder_paths().get_output_directory())


def allowed_roots() -> list[Path]:
    """Folders a /prompt request may point a dataset at: ComfyUI's input folder, plus the user's own list from
    ``CRUCIBLE_ALLOWED_DIRS`` (os.pathsep-separated) or ``crucible_settings.json`` (``{"allowed_dirs": [...]}``)
    in ComfyUI's user or base folder."""
    roots = [input_dir()]
    roots += [Path(p) for p in os.environ.get(ALLOWED_DIRS_ENV, "").split(os.pathsep) if p.strip()]
    fp = _folder_paths()
    for base in {getattr(fp, "base_path", None), _user_dir()}:
        if base and (Path(base) / SETTINGS_FILE).is_file():
            try:
                data = json.loads((Path(base) / SETTINGS_FILE).read_text(encoding="utf-8"))
            except ValueError as exc:
                raise CrucibleError(f"{Path(base) / SETTINGS_FILE} is not valid JSON: {exc}") from exc
            roots += [Path(p) for p in data.get("allowed_dirs", [])]
    return roots


def _user_dir() -> str | None:
    fp = _folder_paths()
    getter = getattr(fp, "get_user_directory", None)
    return getter() if getter else None


def resolve_dataset_path(path: str) -> Path:
    """A dataset folder from a node input: relative paths are taken inside ComfyUI's input folder; the result must
    lie (after following symlinks) inside an allowed root."""
    if not path or not path.strip():
        raise CrucibleError("dataset path is empty: put your images in a folder under ComfyUI/input and give its name")
    candidate = Path(path.strip()).expanduser()
    if not candidate.is_absolute():
        candidate = input_dir() / candidate
    roots = allowed_roots()
    folder = ensure_inside(candidate, roots, "dataset path")
    _refuse_escaping_links(folder, roots)
    return folder


def _refuse_escaping_links(folder: Path, roots: list[Path]) -> None:
    """Refuse symlinks among the files a scan reads (the folder and its concept sub-folders) that point outside
    the allowed roots: a link must not smuggle images from elsewhere into a training run."""
    if not folder.is_dir():
        return  # the scan reports a missing folder with its own message
    levels = [folder]
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_symlink():
                    ensure_inside(entry.path, roots, f"dataset entry '{entry.name}' (a symlink)")
                if entry.is_dir():
                    levels.append(Path(entry.path))
        for sub in levels[1:]:
            with os.scandir(sub) as entries:
                for entry in entries:
                    if entry.is_symlink():
                        ensure_inside(entry.path, roots, f"dataset entry '{sub.name}/{entry.name}' (a symlink)")
    except OSError:
        return  # unreadable folders are reported by the scan


def resolve_model_path(path: str) -> Path:
    """A model file or diffusers folder typed into a node: it must lie inside one of ComfyUI's model folders or an
    allowed root (a /prompt request must not make the server read arbitrary files)."""
    fp = _folder_paths()
    roots = [Path(fp.models_dir)] if getattr(fp, "models_dir", None) else []
    for kind in fp.folder_names_and_paths:
        roots += [Path(f) for f in fp.get_folder_paths(kind)]
    return ensure_inside(Path(path.strip()).expanduser(), roots + allowed_roots(), "model path")


def comfy_tokenizer_dir() -> Path | None:
    """ComfyUI's bundled CLIP tokenizer folder (``comfy/sd1_tokenizer``), if ComfyUI is importable."""
    try:
        import comfy
    except ImportError:
        return None
    for base in getattr(comfy, "__path__", []):  # comfy/ is a namespace package: it has no __file__
        folder = Path(base) / "sd1_tokenizer"
        if folder.is_dir():
            return folder
    return None


# --- runtime -----------------------------------------------------------------------------------------------------------
def free_memory() -> None:
    """Ask ComfyUI to unload its models before training starts."""
    import comfy.model_management as mm

    mm.unload_all_models()
    mm.soft_empty_cache()


def interrupted() -> bool:
    import comfy.model_management as mm

    return bool(mm.processing_interrupted())


def raise_if_interrupted() -> None:
    import comfy.model_management as mm

    mm.throw_exception_if_processing_interrupted()


class ComfyProgress(Callbacks):
    """Drives ComfyUI's progress bar (which also shows preview images) and turns Cancel into a clean stop."""

    def __init__(self, total: int, node_id: str | None = None, preview_every: int = 0):
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(total) if node_id is None else comfy.utils.ProgressBar(total, node_id=node_id)
        self.losses: list[float] = []
        self.preview_every = preview_every
        self.last_line = ""

    def on_start(self, plan) -> None:
        self.bar.update_absolute(0, plan.total_steps)

    def on_step(self, info: StepInfo) -> None:
        from trainer.callbacks import format_seconds
        from trainer.plots import loss_curve

        self.losses.append(info.loss)
        preview = None
        if self.preview_every and (info.step % self.preview_every == 0 or info.step == info.total_steps):
            preview = ("PNG", loss_curve(self.losses, width=384, height=192), 512)
        rate = 1 / info.seconds_per_step if info.seconds_per_step else 0.0
        self.last_line = (f"step {info.step}/{info.total_steps} epoch {info.epoch} loss {info.loss:.4f} "
                          f"{rate:.2f} it/s ETA {format_seconds(info.eta_seconds)}")
        if info.step % 10 == 0 or info.step == info.total_steps:
            print(f"[Crucible] {self.last_line}", flush=True)
        self.bar.update_absolute(info.step, info.total_steps, preview)

    def on_sample(self, sample: SampleInfo) -> None:
        if sample.images:
            self.bar.update_absolute(self.bar.current, None, ("PNG", sample.images[0], 512))

    def on_checkpoint(self, ckpt: CheckpointInfo) -> None:
        print(f"[Crucible] {ckpt.summary}", flush=True)

    def should_stop(self) -> bool:
        return interrupted()


# --- tensors <-> images ------------------------------------------------------------------------------------------------
def pil_to_image(images: Sequence[Any]):
    """PIL images (same size) → ComfyUI IMAGE tensor [B,H,W,C] float 0..1."""
    import torch

    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays))


def image_to_pil(image) -> list[Any]:
    """ComfyUI IMAGE tensor [B,H,W,C] (or one [H,W,C]) → PIL images."""
    from PIL import Image

    arr = image.detach().cpu().float().clamp(0, 1).numpy()
    if arr.ndim == 3:
        arr = arr[None]
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]


# --- models --------------------------------------------------------------------------------------------------------------
def apply_lora(model, clip, path: Path, strength: float):
    """Patch MODEL/CLIP with a LoRA file exactly as the stock LoraLoader does."""
    import comfy.sd
    import comfy.utils

    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    return comfy.sd.load_lora_for_models(model, clip, lora, strength, strength)


def load_diffusion_model(path: Path):
    """Load a full fine-tune checkpoint with ComfyUI's own diffusion-model loader."""
    import comfy.sd

    loader = getattr(comfy.sd, "load_diffusion_model", None) or comfy.sd.load_unet
    return loader(str(path))
