"""Finding the CLIP tokenizer files for a model, without the network and without importing ComfyUI.

A diffusers folder carries its tokenizers (``tokenizer/``, ``tokenizer_2/``); a single-file checkpoint does not. For
those, Crucible looks next to the file and then at the copy ComfyUI ships in ``comfy/sd1_tokenizer/`` (the CLIP
ViT-L/14 BPE vocabulary, which SDXL's CLIP-G shares). Search order for :func:`find_clip_tokenizer_dir`:

1. ``model.tokenizer_path`` (the folder itself, or its ``tokenizer/`` / ``tokenizer_2/`` sub-folder);
2. a diffusers model folder's ``tokenizer/`` (CLIP-L) or ``tokenizer_2/`` (CLIP-G, falling back to ``tokenizer/``);
3. next to a single file: ``<stem>_tokenizer/`` then ``tokenizer/`` (and their ``tokenizer_2/`` for CLIP-G);
4. ``$CRUCIBLE_COMFY_TOKENIZER_DIR`` (the tokenizer folder itself or a ComfyUI root);
5. ``comfy/sd1_tokenizer`` under a ComfyUI root: the folders above the model file, the working directory and every
   ``sys.path`` entry (ComfyUI puts its root there when it runs).

CLIP-G is padded with ``"!"`` (id 0) and CLIP-L with ``<|endoftext|>``, as in diffusers' SDXL ``tokenizer_2`` and
``tokenizer``; the context is always 77 tokens (ComfyUI's copy says 8192, which is only a tokenizer limit).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelLoadError

if TYPE_CHECKING:  # pragma: no cover
    from ..config import ModelConfig

ENV_TOKENIZER_DIR = "CRUCIBLE_COMFY_TOKENIZER_DIR"
COMFY_TOKENIZER_SUBDIR = Path("comfy") / "sd1_tokenizer"
CLIP_MAX_LENGTH = 77
PAD_TOKENS = {"clip_l": "<|endoftext|>", "clip_g": "!"}
_ANCESTOR_LEVELS = 5  # ComfyUI/models/checkpoints/<sub>/<file>: the root is at most a few levels up


def is_tokenizer_dir(folder: Path) -> bool:
    """A folder a CLIPTokenizer can load: BPE files (vocab.json + merges.txt) or a fast-tokenizer tokenizer.json."""
    return folder.is_dir() and (((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())
                                or (folder / "tokenizer.json").is_file())


def _subfolders(which: str) -> tuple[str, ...]:
    return ("tokenizer_2", "tokenizer") if which == "clip_g" else ("tokenizer",)


def tokenizer_candidates(cfg: "ModelConfig", which: str = "clip_l") -> list[Path]:
    """Every folder :func:`find_clip_tokenizer_dir` tries, in order (without ``model.tokenizer_path``)."""
    found: list[Path] = []
    model = Path(cfg.path).expanduser() if cfg.path else None
    if model is not None and model.is_dir():
        found += [model / sub for sub in _subfolders(which)]
    elif model is not None:
        for beside in (model.parent / f"{model.stem}_tokenizer", model.parent / "tokenizer"):
            found += ([beside / "tokenizer_2"] if which == "clip_g" else []) + [beside]
    env = os.environ.get(ENV_TOKENIZER_DIR, "").strip()
    if env:
        hint = Path(env).expanduser()
        found += [hint, hint / COMFY_TOKENIZER_SUBDIR, hint / COMFY_TOKENIZER_SUBDIR.name]
    roots: list[Path] = []
    if model is not None:
        roots += list(model.resolve().parents)[:_ANCESTOR_LEVELS]
    roots.append(Path.cwd())
    roots += [Path(p) for p in sys.path if p]
    found += [root / COMFY_TOKENIZER_SUBDIR for root in roots]
    unique: list[Path] = []
    for path in found:
        if path not in unique:
            unique.append(path)
    return unique


def find_clip_tokenizer_dir(cfg: "ModelConfig", which: str = "clip_l") -> Path:
    """The folder holding the tokenizer files for ``which`` (``"clip_l"`` or ``"clip_g"``) of ``cfg``'s model."""
    if which not in PAD_TOKENS:
        raise ValueError(f"which must be one of {sorted(PAD_TOKENS)}, got {which!r}")
    if cfg.tokenizer_path:
        given = Path(cfg.tokenizer_path).expanduser()
        order = ([given / "tokenizer_2"] if which == "clip_g" else []) + [given, given / "tokenizer"]
        for folder in order:
            if is_tokenizer_dir(folder):
                return folder
        raise ModelLoadError(f"model.tokenizer_path '{given}' has no CLIP tokenizer files (vocab.json and merges.txt, "
                             "or tokenizer.json); point it at a folder that has them, e.g. ComfyUI/comfy/sd1_tokenizer")
    tried = tokenizer_candidates(cfg, which)
    for folder in tried:
        if is_tokenizer_dir(folder):
            return folder
    listing = "; ".join(str(p) for p in tried)
    raise ModelLoadError(
        f"no CLIP tokenizer ({which}) found for model '{cfg.path}'. Tried: {listing}. Provide one: set "
        f"model.tokenizer_path to a folder with vocab.json and merges.txt (ComfyUI ships one in "
        f"ComfyUI/comfy/sd1_tokenizer; a diffusers model has tokenizer/), put that folder next to the checkpoint as "
        f"'<checkpoint name>_tokenizer', or set the environment variable {ENV_TOKENIZER_DIR} to it")


def load_clip_tokenizer(folder: str | Path, which: str = "clip_l") -> Any:
    """Load a ``transformers.CLIPTokenizer`` from ``folder`` with the family's pad token and a 77-token context."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, model_max_length=CLIP_MAX_LENGTH,
                                             pad_token=PAD_TOKENS[which])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"the CLIP tokenizer in '{folder}' cannot be read ({exc}); replace it with a copy of "
                             "ComfyUI/comfy/sd1_tokenizer or a diffusers model's tokenizer/ folder") from exc


def find_clip_tokenizer(cfg: "ModelConfig", which: str = "clip_l") -> Any:
    """Locate (see the module docstring) and load the CLIP tokenizer for ``which`` of ``cfg``'s model."""
    return load_clip_tokenizer(find_clip_tokenizer_dir(cfg, which), which)
