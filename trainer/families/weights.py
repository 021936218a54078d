"""Reading weights: ``.safetensors`` files (whole, or lazily by prefix), diffusers/transformers model folders, and
modules built from tensors whose config was derived from their shapes. Every failure is a :class:`ModelLoadError`
naming the file and what to do.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..errors import ModelLoadError

if TYPE_CHECKING:  # pragma: no cover
    import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")

_DENOISER_SHAPES_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("crucible_denoiser_shapes_only",
                                                                              default=False)


@contextlib.contextmanager
def denoiser_shapes_only(enabled: bool = True):
    """While active, the denoiser is built on the meta device (shapes and dtypes, no values, its weights never
    read): a sharded run's other ranks, which receive their shards from rank 0 (:mod:`trainer.sharding`). A model
    folder's denoiser is built from its ``config.json``; a single file's (a checkpoint, or a diffusion-model file) is
    built from meta tensors with the shapes and dtypes of its header (:func:`denoiser_tensors`), going through the
    same key conversion, config derivation and checks as the real read; the text encoders and VAE are read as usual."""
    token = _DENOISER_SHAPES_ONLY.set(bool(enabled))
    try:
        yield
    finally:
        _DENOISER_SHAPES_ONLY.reset(token)


def building_shapes_only() -> bool:
    """Whether :func:`denoiser_shapes_only` is active."""
    return _DENOISER_SHAPES_ONLY.get()


def denoiser_tensors(part: "Part", dtype=None) -> dict[str, "torch.Tensor"]:
    """A single file's denoiser tensors (:meth:`Part.read`), or their meta stand-ins under
    :func:`denoiser_shapes_only`."""
    return part.read(dtype, shapes_only=building_shapes_only())


def load_denoiser(cls, folder: Path, sub: str | None, dtype):
    """The denoiser of a model folder: :func:`from_pretrained`, or its shapes alone under
    :func:`denoiser_shapes_only`."""
    if not _DENOISER_SHAPES_ONLY.get():
        return from_pretrained(cls, folder, sub, dtype)
    import torch
    from accelerate import init_empty_weights

    where = folder / sub if sub else folder
    try:
        config = cls.load_config(str(where), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model.path: cannot read the config of '{where}' ({exc}); the folder is incomplete"
                             ) from exc
    with init_empty_weights():  # parameters on meta; buffers (RoPE tables, position ids) made as usual
        model = cls.from_config(config)
    return model.to(dtype=dtype or torch.float32).eval()


def param_dtype(module) -> "torch.dtype":
    """The dtype of a module's first parameter (diffusers' ``.dtype`` walks every parameter: slow per step)."""
    return next(unwrap(module).parameters()).dtype


def place(module, device) -> None:
    """Move a loaded module to ``device``; a denoiser built as shapes only (:func:`denoiser_shapes_only`) stays on
    the meta device, where a sharded run's ``prepare()`` expects it."""
    if not any(p.is_meta for p in module.parameters()):
        module.to(device)


def unwrap(module):
    """The module inside a DDP / accelerate wrapper (config, dtype and submodules live there)."""
    return getattr(module, "module", module)


def from_pretrained(cls, folder: Path, sub: str | None, dtype, what: str = "model.path"):
    """``cls.from_pretrained`` offline, safetensors only, with a :class:`ModelLoadError` naming the folder.

    Folders that only hold ``fp16`` variant weights (``*.fp16.safetensors``) load too.
    """
    import torch

    where = folder / sub if sub else folder
    dtype = dtype or torch.float32
    variant = _fp16_variant(where)
    try:
        from ..quantized import FP8_MODULE_CLASSES, loading_fp8

        if loading_fp8() and cls.__name__ in FP8_MODULE_CLASSES:  # fp8 base: quantized tensor by tensor
            from .fp8_folders import load_folder_streamed

            return load_folder_streamed(cls, where, variant, dtype, what).eval()
        if cls.__module__.startswith("transformers"):
            model, info = cls.from_pretrained(str(where), local_files_only=True, use_safetensors=True,
                                              variant=variant, output_loading_info=True, **_transformers_dtype(dtype),
                                              **_sdpa(cls))
            if info.get("missing_keys"):
                raise ModelLoadError(f"{what}: '{where}' lacks {len(info['missing_keys'])} weights (e.g. "
                                     f"'{sorted(info['missing_keys'])[0]}'); the folder is incomplete or damaged")
        else:
            model = cls.from_pretrained(str(folder), subfolder=sub, local_files_only=True, use_safetensors=True,
                                        variant=variant, torch_dtype=dtype)
    except ModelLoadError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise ModelLoadError(f"{what}: cannot load '{where}' ({first_line}). It needs config.json and .safetensors "
                             "weights; pickle .bin weights are refused, convert them to .safetensors") from exc
    return model.eval()


def _fp16_variant(folder: Path) -> str | None:
    """``"fp16"`` when ``folder`` has only fp16-variant safetensors weights, else ``None``."""
    if not folder.is_dir():
        return None
    files = [p.name for p in folder.iterdir() if p.name.endswith(".safetensors")]
    plain = [n for n in files if not n.endswith(".fp16.safetensors")]
    return "fp16" if files and not plain else None


def _transformers_dtype(dtype) -> dict[str, Any]:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def _sdpa(cls) -> dict[str, Any]:
    """PyTorch SDPA attention where the class has it. transformers 4.x loads a folder whose config.json carries
    ``_attn_implementation_autoset`` (written by its own save_pretrained) with eager attention: slower, more memory,
    and not bit-equal to the same encoder built from a single file."""
    return {"attn_implementation": "sdpa"} if getattr(cls, "_supports_sdpa", False) else {}


def check_safetensors_path(path: str | Path, what: str = "model.path") -> Path:
    """Refuse missing files and pickle checkpoints (they can run code when loaded) with a message saying what to do."""
    path = Path(path).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(f"{what} '{path}' is a pickle checkpoint ({path.suffix}); Crucible only loads "
                             ".safetensors files because pickles can run arbitrary code. Convert it to .safetensors "
                             "(e.g. with ComfyUI's 'Save Checkpoint' node or kohya's convert script) and use that file")
    if not path.is_file():
        raise ModelLoadError(f"{what} '{path}' does not exist; give a diffusers model folder or a .safetensors file")
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{what} '{path}' is not a .safetensors file; convert it to .safetensors and use that")
    return path


def read_checkpoint(path: str | Path, what: str = "model.path", dtype=None) -> dict[str, "torch.Tensor"]:
    """All tensors of a ``.safetensors`` single file (after :func:`check_safetensors_path`), read tensor by tensor
    into ``dtype``; ComfyUI's fp8 / scaled-fp8 files are dequantized (:mod:`trainer.fp8_files`)."""
    from ..fp8_files import read_file

    path = check_safetensors_path(path, what)
    with _readable(path, what):
        return read_file(path, dtype)


def checkpoint_keys(path: str | Path, what: str = "model.path") -> list[str]:
    """The tensor names of a ``.safetensors`` file, read from its header only (cheap even for 7 GB files)."""
    from safetensors import safe_open

    path = check_safetensors_path(path, what)
    with _readable(path, what), safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


@contextlib.contextmanager
def _readable(path: Path, what: str):
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{what} '{path}' is not a readable safetensors file ({exc}); it may be truncated or "
                             "a renamed pickle. Re-download it or convert it to .safetensors") from exc


def _derive(what: str, path: Any, derive: Callable[..., dict], *args) -> dict:
    """Run a config derivation; a missing or odd tensor becomes a :class:`ModelLoadError` naming the file."""
    try:
        return derive(*args)
    except ModelLoadError as exc:
        raise ModelLoadError(f"'{path}': {exc}") from exc
    except (KeyError, IndexError, ValueError) as exc:
        raise ModelLoadError(f"'{path}': the {what} weights are incomplete or not in the SD layout (no {exc}); the "
                             "file is damaged or not a checkpoint of this model family") from exc


def _materialize(factory: Callable[[], Any], weights: dict, what: str, path: Any, dtype) -> Any:
    """Build a module without allocating random weights, then assign ``weights`` (all of them must fit)."""
    import torch
    from accelerate import init_empty_weights

    with init_empty_weights():
        module = factory()
    expected = module.state_dict()
    given, weights = weights, {_matching_key(k, expected): v for k, v in weights.items()}
    missing = sorted(set(expected) - set(weights))
    wrong = sorted(k for k in set(expected) & set(weights) if tuple(expected[k].shape) != tuple(weights[k].shape))
    if missing or wrong:
        key = (missing or wrong)[0]
        problem = f"{len(missing)} tensors missing" if missing else f"{len(wrong)} tensors with unexpected shapes"
        raise ModelLoadError(f"'{path}': the {what} weights do not form a valid model ({problem}, e.g. '{key}'); "
                             "the file is damaged or not a checkpoint of this model family")
    # one tensor at a time (fp8 base, T5 wo kept fp32 under fp16); the caller's dict lets go of its tensors too
    from ..quantized import assign_weights

    given.clear()
    assign_weights(module, weights, list(expected), dtype or torch.float32)
    return module.eval()


def _matching_key(key: str, expected: Mapping) -> str:
    """transformers 5 flattened ``CLIPTextModel`` (no ``text_model.`` level) while ``CLIPTextModelWithProjection``
    keeps it: add or drop that level so ``key`` matches the module at hand."""
    if key in expected:
        return key
    other = key.removeprefix("text_model.") if key.startswith("text_model.") else f"text_model.{key}"
    return other if other in expected else key


class TensorFile:
    """A ``.safetensors`` file: names and shapes from its header at once, tensors only when :meth:`read` asks."""

    def __init__(self, path: str | Path, what: str):
        self.path = check_safetensors_path(path, what)
        self.what = what
        with self._open() as handle:
            self.shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}

    @contextlib.contextmanager
    def _open(self):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.path), framework="pt") as handle:
                yield handle
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{self.what} '{self.path}' is not a readable safetensors file ({exc}); it may be "
                                 "truncated or a renamed pickle. Re-download it or convert it to .safetensors") from exc

    def has_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.shapes)

    def read(self, prefix: str = "", exclude: tuple[str, ...] = (), dtype=None,
             shapes_only: bool = False) -> dict[str, "torch.Tensor"]:
        """The tensors whose names start with ``prefix`` (removed from the names), skipping ``exclude`` prefixes, read
        tensor by tensor into ``dtype``; ComfyUI fp8 / scaled-fp8 files dequantized (:mod:`trainer.fp8_files`).
        ``shapes_only``: meta tensors of the same shapes and dtypes, nothing read."""
        from ..fp8_files import read_tensors

        with self._open() as handle:
            return read_tensors(handle, self.path, prefix, exclude, dtype, reopen=self.path, shapes_only=shapes_only)


@dataclass(frozen=True)
class Part:
    """One component's tensors inside a file: those under ``prefix`` (all of them when it is empty)."""

    file: TensorFile
    prefix: str = ""
    exclude: tuple[str, ...] = ()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k[len(self.prefix):]: s for k, s in self.file.shapes.items()
                if k.startswith(self.prefix) and not k.startswith(self.exclude)}

    def read(self, dtype=None, shapes_only: bool = False) -> dict[str, "torch.Tensor"]:
        return self.file.read(self.prefix, self.exclude, dtype, shapes_only)

    def describe(self) -> str:
        return f"{self.file.path}" + (f" ({self.prefix}…)" if self.prefix else "")
