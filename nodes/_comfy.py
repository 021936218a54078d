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

from ..trainer import (ALLOWED_DIRS_ENV, Callbacks, CheckpointInfo, CrucibleError, ReadPolicy, SampleInfo, StepInfo,
                       check_path_text, ensure_inside, shown)

SETTINGS_FILE = "crucible_settings.json"
CHECKPOINT_KINDS = ("loras", "diffusion_models", "checkpoints")  # where a run's checkpoints may be loaded from


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
    if not isinstance(path, str) or not path.strip():
        raise CrucibleError("dataset path is empty: put your images in a folder under ComfyUI/input and give its name")
    candidate = Path(check_path_text(path.strip(), "dataset path")).expanduser()
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
    text = check_path_text(path.strip(), "model path")
    return ensure_inside(Path(text).expanduser(), model_roots(), "model path")


def _kind_folders(kinds) -> list[Path]:
    fp = _folder_paths()
    out = []
    for kind in kinds:
        for name in {kind, _kind(kind), LEGACY_KINDS.get(kind, kind)}:
            if name in fp.folder_names_and_paths:
                out += [Path(f) for f in fp.get_folder_paths(name)]
    return list(dict.fromkeys(out))


def model_roots() -> list[Path]:
    """Where model files (checkpoints, encoders, VAEs, tokenizers) may be read from: ComfyUI's model folders
    (``extra_model_paths.yaml`` included; not custom_nodes), its bundled CLIP tokenizer, and the allowed roots."""
    fp = _folder_paths()
    roots = [Path(fp.models_dir)] if getattr(fp, "models_dir", None) else []
    roots += _kind_folders(k for k in fp.folder_names_and_paths if k != "custom_nodes")
    tokenizer = comfy_tokenizer_dir()
    return roots + ([tokenizer] if tokenizer else []) + allowed_roots()


def node_read_policy() -> ReadPolicy:
    """The trainer's read policy for a node run: datasets from the allowed roots, models from the model roots."""
    return ReadPolicy(data=tuple(allowed_roots()), models=tuple(model_roots()))


def confine_checkpoint(path: Any, what: str = "checkpoint") -> Path:
    """A trained checkpoint about to be loaded: a .safetensors file inside ComfyUI's loras / diffusion_models /
    checkpoints folders, nothing else (a forged run record must not make the server open any file)."""
    if not isinstance(path, (str, Path)) or not str(path).strip():
        raise CrucibleError(f"{what} has no file path; connect Crucible Train's run output")
    text = check_path_text(str(path), what)
    if not text.lower().endswith(".safetensors"):
        raise CrucibleError(f"{what} {shown(text)} is not a .safetensors file; only safetensors checkpoints are loaded")
    resolved = ensure_inside(text, _kind_folders(CHECKPOINT_KINDS), what)
    if not resolved.is_file():
        raise CrucibleError(f"{what} {shown(text)} does not exist (deleted or moved?); train again or pick a folder")
    return resolved


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


def is_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` is ComfyUI's "the user pressed Cancel" exception (``InterruptProcessingException``; every
    ComfyUI version raises it from ``throw_exception_if_processing_interrupted``, which its progress hook calls)."""
    try:
        import comfy.model_management as mm

        own = getattr(mm, "InterruptProcessingException", None)
    except ImportError:
        own = None
    return (own is not None and isinstance(exc, own)) or type(exc).__name__ == "InterruptProcessingException"


def interrupt_exception() -> BaseException:
    import comfy.model_management as mm

    return mm.InterruptProcessingException()


def hand_back_memory() -> None:
    """After a run: let ComfyUI return cached device memory (the trainer already dropped its models)."""
    import comfy.model_management as mm

    mm.soft_empty_cache()


def show_report(node_id: str | None, text: str) -> bool:
    """Put ``text`` under the node in the browser even though the node is about to raise: ComfyUI delivers a node's
    ``ui`` output only when it returns, so this sends the same ``executed`` message ComfyUI would (every version
    since 2023 has ``PromptServer.instance.send_sync``; the pack's web extension shows ``output.text``)."""
    if node_id is None:
        return False
    try:
        from server import PromptServer
    except ImportError:
        return False
    server = getattr(PromptServer, "instance", None)
    if server is None or getattr(server, "client_id", None) is None:  # ComfyUI sends node output to its client only
        return False
    data = {"node": node_id, "display_node": node_id, "output": {"text": [text]}, "prompt_id": _prompt_id(server)}
    server.send_sync("executed", data, server.client_id)
    return True


def _prompt_id(server) -> str | None:
    try:  # ComfyUI >= 0.3.4x knows the executing prompt per task
        from comfy_execution.utils import get_executing_context

        context = get_executing_context()
        if context is not None and getattr(context, "prompt_id", None):
            return context.prompt_id
    except ImportError:
        pass
    return getattr(server, "last_prompt_id", None)


class ComfyProgress(Callbacks):
    """Drives ComfyUI's progress bar (which also shows preview images) and turns Cancel into a clean stop.

    ComfyUI's progress hook raises its interrupt exception from inside ``ProgressBar.update*`` once the user pressed
    Cancel (and clears the flag as it raises). The exception is caught here and remembered, so the loop reads
    :meth:`should_stop`, saves the checkpoint and state at the step reached, and returns; the node then calls
    :meth:`raise_interrupt` so ComfyUI still marks the prompt interrupted.
    """

    def __init__(self, total: int, node_id: str | None = None, preview_every: int = 0):
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(total) if node_id is None else comfy.utils.ProgressBar(total, node_id=node_id)
        self.losses: list[float] = []
        self.preview_every = preview_every
        self.last_line = ""
        self.interrupt: BaseException | None = None  # ComfyUI's exception, caught in a progress update
        self.stop_seen = False  # should_stop() answered True (the flag was read directly)

    def _update(self, value: int, total: int | None, preview=None) -> None:
        try:
            self.bar.update_absolute(value, total, preview)
        except Exception as exc:
            if not is_interrupt(exc):
                raise
            if self.interrupt is None:
                self.interrupt = exc
                print("[Crucible] Cancel pressed: saving a checkpoint and the training state at the step reached",
                      flush=True)

    def on_start(self, plan) -> None:
        self._update(0, plan.total_steps)

    def on_prepare(self, done: int, total: int, what: str) -> None:
        """Caches filled before step 1: the bar counts images, then steps."""
        if done == total or done % 50 == 0:
            print(f"[Crucible] {what}: {done}/{total}", flush=True)
        self._update(done, total)

    def on_step(self, info: StepInfo) -> None:
        from ..trainer import format_seconds, loss_curve

        self.losses.append(info.loss)
        preview = None
        if self.preview_every and (info.step % self.preview_every == 0 or info.step == info.total_steps):
            preview = ("PNG", loss_curve(self.losses, width=384, height=192), 512)
        rate = 1 / info.seconds_per_step if info.seconds_per_step else 0.0
        self.last_line = (f"step {info.step}/{info.total_steps} epoch {info.epoch} loss {info.loss:.4f} "
                          f"{rate:.2f} it/s ETA {format_seconds(info.eta_seconds)}")
        if info.step % 10 == 0 or info.step == info.total_steps:
            print(f"[Crucible] {self.last_line}", flush=True)
        self._update(info.step, info.total_steps, preview)

    def on_sample(self, sample: SampleInfo) -> None:
        if sample.images:
            self._update(self.bar.current, None, ("PNG", sample.images[0], 512))

    def on_checkpoint(self, ckpt: CheckpointInfo) -> None:
        print(f"[Crucible] {ckpt.summary}", flush=True)

    def should_stop(self) -> bool:
        if self.interrupt is not None or interrupted():
            self.stop_seen = True
        return self.stop_seen

    @property
    def cancelled(self) -> bool:
        """The user pressed Cancel during the run (seen through either path)."""
        return self.stop_seen or self.interrupt is not None or interrupted()

    def raise_interrupt(self) -> None:
        """Raise ComfyUI's interrupt exception, so the prompt ends as interrupted (nothing downstream runs)."""
        from ..trainer import forget_frames

        if self.interrupt is not None:
            exc, self.interrupt = self.interrupt, None
            forget_frames(exc)  # its frames (the training loop's) must not keep anything alive
            raise exc.with_traceback(None)
        raise_if_interrupted()  # the flag is still set: ComfyUI's own call raises (and clears it)
        raise interrupt_exception()  # the flag was read and cleared elsewhere: the Cancel still ends the prompt


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

    lora = comfy.utils.load_torch_file(str(confine_checkpoint(path)), safe_load=True)
    return comfy.sd.load_lora_for_models(model, clip, lora, strength, strength)


def load_diffusion_model(path: Path):
    """Load a full fine-tune checkpoint with ComfyUI's own diffusion-model loader."""
    import comfy.sd

    loader = getattr(comfy.sd, "load_diffusion_model", None) or comfy.sd.load_unet
    return loader(str(confine_checkpoint(path)))


# --- full checkpoints as weight patches read from the file on demand --------------------------------------------------
class FileWeight(tuple):
    """A ComfyUI weight patch value of the one-tensor ``diff`` kind whose tensor stays in the checkpoint file: it
    is read when ComfyUI applies the patch (``ModelPatcher.patch_weight_to_device`` as the model is loaded for
    sampling, or at each forward in low-VRAM mode) and dropped after. Added with ``strength_model`` 0, ComfyUI
    computes ``0 * weight + 1 * tensor``: the patch *sets* the weight, in every ComfyUI version since 2023."""

    def __new__(cls, path: str, name: str):
        self = super().__new__(cls, (None,))
        self.path, self.name = path, name
        return self

    def __getitem__(self, index):
        if index not in (0, -1):
            raise IndexError(index)
        from safetensors import safe_open

        with safe_open(self.path, framework="pt", device="cpu") as f:  # unmapped again on exit
            return f.get_tensor(self.name)

    def __iter__(self):
        yield self[0]

    def __getnewargs__(self):  # copy / pickle rebuild it from the file reference, never from the data
        return self.path, self.name

    def __repr__(self) -> str:
        return f"FileWeight({Path(self.path).name}:{self.name})"


def _diffusers_key_map(unet_config: dict) -> dict:
    """diffusers name -> ComfyUI name (a string, or ``(name, offset[, function])`` for a slice of a fused weight),
    from ComfyUI's own conversion tables: the ones its Load Diffusion Model uses for diffusers-format files."""
    import comfy.utils

    image_model = unet_config.get("image_model")
    if image_model == "flux" and hasattr(comfy.utils, "flux_to_diffusers"):
        return comfy.utils.flux_to_diffusers(unet_config, output_prefix="")
    if image_model == "mmdit" and hasattr(comfy.utils, "mmdit_to_diffusers"):
        return comfy.utils.mmdit_to_diffusers(unet_config, output_prefix="")
    return comfy.utils.unet_to_diffusers(unet_config)


def full_checkpoint_model(model, path: Path):
    """A full fine-tune checkpoint as a clone of the base MODEL (same architecture) whose weights are patched from
    the file on demand: a sweep's list of such MODELs holds no weights, and sampling holds one checkpoint at a time.

    Falls back to ComfyUI's Load Diffusion Model when the file does not map onto ``model`` (another architecture, or
    a ComfyUI without the conversion table for this family)."""
    import logging

    from safetensors import safe_open

    path = confine_checkpoint(path)
    try:
        inner = model.model
        unet_config = inner.model_config.unet_config
        mapping = _diffusers_key_map(unet_config)
        prefix = "diffusion_model."
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = list(f.keys())
            shapes = {n: tuple(f.get_slice(n).get_shape()) for n in names}
        own = {k: tuple(v.shape) for k, v in inner.state_dict().items()}
        patches, problems = {}, []
        for name in names:
            target = mapping.get(name)
            key = target if isinstance(target, str) else target[0] if target else None
            if key is None or prefix + key not in own:
                problems.append(f"{name}: no place in the MODEL")
            elif isinstance(target, str) and own[prefix + key] != shapes[name]:
                problems.append(f"{name}: shape {shapes[name]} vs {own[prefix + key]} in the MODEL")
            else:
                full_key = prefix + key if isinstance(target, str) else (prefix + key, *target[1:])
                patches[full_key] = FileWeight(str(path), name)
        if problems:
            raise CrucibleError(f"{len(problems)} of {len(names)} weights do not fit, e.g. {problems[0]}")
        clone = model.clone()
        added = clone.add_patches(patches, 1.0, 0.0)  # strength_model 0: the file's tensor replaces the weight
        if len(added) != len(patches):
            raise CrucibleError(f"this ComfyUI patched {len(added)} of {len(patches)} weights")
        return clone
    except Exception as exc:  # noqa: BLE001 - any mismatch: ComfyUI's own loader reads the whole file instead
        logging.warning("[Crucible] %s is loaded whole (it cannot be patched onto the MODEL input: %s); a sweep then "
                        "holds every such checkpoint in memory. Connect the base model the run trained.",
                        Path(path).name, exc)
        return load_diffusion_model(path)
