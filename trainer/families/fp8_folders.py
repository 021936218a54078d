"""Model folders (diffusers / transformers ``save_pretrained`` layouts) loaded with ``model.fp8_base``: the model is
built on the meta device from its ``config.json`` and each shard's tensors are read lazily, so every Linear weight
is quantized as it is read (issue #16) instead of the whole model first existing in the compute dtype.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError


def weight_files(where: Path, variant: str | None) -> list[Path]:
    """The ``.safetensors`` files holding a folder's weights: the shards its index names, else every file (only the
    ``variant``'s files when a variant is asked, only the plain ones otherwise)."""
    def wanted(path: Path) -> bool:
        return (f".{variant}." in path.name) if variant else ".fp16." not in path.name

    for index in sorted(p for p in where.glob("*.safetensors.index.json") if wanted(p)):
        try:
            shards = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise ModelLoadError(f"model.path: the shard index '{index}' is unreadable ({exc}); the folder is "
                                 "incomplete or damaged") from exc
        return [where / name for name in sorted(set(shards))]
    return sorted(p for p in where.glob("*.safetensors") if wanted(p))


def load_folder_streamed(cls, where: Path, variant: str | None, dtype, what: str) -> Any:
    """``cls`` (a diffusers or transformers model class) from the folder ``where``, its tensors assigned one at a
    time (quantized while :func:`trainer.quantized.fp8_loading` is active)."""
    from .weights import TensorFile, _materialize

    files = weight_files(where, variant)
    if not files:
        raise ModelLoadError(f"{what}: '{where}' has no .safetensors weights; pickle .bin weights are refused, "
                             "convert them to .safetensors")
    if cls.__module__.startswith("transformers"):
        config = cls.config_class.from_pretrained(str(where), local_files_only=True)
        factory = lambda: cls(config)  # noqa: E731
    else:
        config = cls.load_config(str(where), local_files_only=True)
        factory = lambda: cls.from_config(config)  # noqa: E731
    sd: dict = {}
    for file in files:
        sd.update(TensorFile(file, what).read(dtype=dtype))
    embed = sd.get("shared.weight", sd.get("encoder.embed_tokens.weight"))  # T5 saves its tied embedding once
    if embed is not None:
        sd.setdefault("shared.weight", embed)
        sd.setdefault("encoder.embed_tokens.weight", embed)
    model = _materialize(factory, sd, cls.__name__, where, dtype)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model
