"""Cache, then free — out of host memory too (issue 16).

With the latent / text caches filled before step 1 (:meth:`trainer.run_setup.RunSetup._pre_encode`), nothing runs
the VAE or a frozen text encoder during the training steps. The encoders a cache replaces therefore leave the
training device, and, where the run loaded them itself, host memory as well: every reference the run holds is
dropped and the modules are collected (Flux's T5 alone is ~9 GiB of bf16). A :class:`ReleasedEncoder` stands in
their place, so any use that was missed fails with a clear message instead of re-encoding silently.

They are read again, lazily, from the files the run loaded them from (``ModelFamily.load_encoders``), with the same
dtype, fp8 and fp32-VAE settings, only while something needs them: a full fine-tune's single-file export, and
previews of a family that cannot take pre-encoded prompts or of a prompt list changed mid-run; then they are released
again. Previews otherwise need only the VAE, which a run with previews keeps in host memory (``keep``): their prompts
are encoded before the release (:mod:`trainer.sample_prompts`). Validation needs none of them: its images and
captions are encoded before the release (:meth:`trainer.validation.Validator.prepare`). The sweep runs after
``train()`` returns, on models it loads itself, and a resumed run fills its caches again before releasing.

Kept in host memory (moved off the device only, as before):

* a text encoder that trains, and any encoder whose cache is off (it encodes in every step);
* encoders handed to ``train(components=…)`` — the caller owns them — and a family without ``load_encoders``: on
  ComfyUI's MODEL path the CLIP and VAE are ComfyUI's objects, left to ComfyUI's model management;
* everything with ``training.release_encoders`` off (the Training Options' ``keep in RAM``).
* the VAE, on a process that renders previews (:mod:`trainer.sample_prompts`; ~0.2 GiB).

Multi-process runs release them too: the encoders are never wrapped by DDP (only trained modules are), each process
drops its own copy, and only the main process reads them back (for a single-file export, or previews it could not
pre-encode) while the others wait at the barrier (tested on 2 CPU processes under gloo; on GPUs the same code path,
unmeasured).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Sequence

import torch

log = logging.getLogger("crucible")

GIB = 1024 ** 3


class ReleasedEncoder:
    """Stands where a released encoder was: it keeps the module's ``config`` (SDXL's time ids read the VAE's) and
    ``dtype`` (a diffusers pipeline rendering pre-encoded prompts reads both of its text encoders) and refuses
    everything else with a message naming the encoder."""

    def __init__(self, name: str, config: Any, dtype: Any = None):
        self.__dict__.update(released_name=name, config=config, dtype=dtype)

    def __getattr__(self, attr: str):
        raise AttributeError(f"the {self.released_name} was released from memory after the caches were filled, "
                             f"but the run asked it for '{attr}' (set training.release_encoders false to keep it)")


def module_bytes(module: Any) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _signature(module: Any) -> tuple:
    """Names, dtypes and shapes of a module's tensors: a reloaded encoder must match the one it replaces."""
    return tuple((k, str(v.dtype), tuple(v.shape)) for k, v in module.state_dict().items())


class EncoderResidency:
    """Where the encoders the caches replaced are: on the device (while needed), off it, or released."""

    def __init__(self, trainer: Any, cached: Sequence[str], owned: bool, keep: Sequence[str] = ()):
        """``keep``: of the ``cached`` encoders, those that stay in host memory (off the device) even where the
        others are released: the VAE, when previews render from pre-encoded prompts (:mod:`trainer.sample_prompts`)."""
        self.trainer = trainer
        self.cached = [n for n in cached if self._module(n) is not None]  # component names ("vae", "text_encoder"…)
        self.away: list[str] = []  # off the device
        self.released: dict[str, tuple] = {}  # name -> signature of what was released
        can_release = self._can_release(owned)
        self.releasable = [n for n in self.cached if n not in keep] if can_release else []
        self.kept = [n for n in self.cached if n in keep] if can_release else []
        self.releases = bool(self.releasable)
        self.files = self._files_identity() if self.releases else ""  # the model files as they were read

    # --- what may go -------------------------------------------------------------------------------------------
    def _can_release(self, owned: bool) -> bool:
        t = self.trainer
        if not self.cached or not t.cfg.training.release_encoders:
            return False
        if not owned:
            log.info("encoders kept in host memory: they were handed to the run, which does not own them")
            return False
        if not t.family.reloads_encoders:
            log.info("encoders kept in host memory: %s leaves them to their owner", t.family.title)
            return False
        return True

    # --- the views of the components that hold the modules ------------------------------------------------------
    def _views(self) -> list[Any]:
        t = self.trainer
        return [c for c in (t.comps, getattr(t, "train_comps", None)) if c is not None]

    def _module(self, name: str) -> Any:
        comps = self.trainer.comps
        if name == "vae":
            return comps.vae
        return dict(zip(comps.text_encoder_names, comps.text_encoders)).get(name)

    def _put(self, name: str, module: Any) -> None:
        for comps in self._views():
            if name == "vae":
                comps.vae = module
            else:
                comps.text_encoders = [module if n == name else m
                                       for n, m in zip(comps.text_encoder_names, comps.text_encoders)]

    # --- leaving ------------------------------------------------------------------------------------------------
    def leave(self) -> None:
        """Move the cached encoders off the device and, where allowed, out of memory (says which, and how much)."""
        from .run_setup import offload_module

        for name in self.cached:
            offload_module(self._module(name))
        self.away = list(self.cached)
        if self.releases:
            freed = self._release()
            kept = f"; {', '.join(self.kept)} kept in host memory for previews" if self.kept else ""
            log.info("caches filled: released %s from memory (%.2f GiB); read again from the model files only "
                     "while previews need them%s", ", ".join(self.releasable), freed / GIB, kept)
        elif self.cached:
            log.info("caches filled: %s moved off the training device", ", ".join(self.cached))

    def _release(self) -> int:
        from .release import collect, unwrap_forward

        freed = 0
        for name in self.releasable:
            module = self._module(name)
            freed += module_bytes(module)
            self.released[name] = _signature(module)
            unwrap_forward(module)
            self._put(name, ReleasedEncoder(name, getattr(module, "config", None), getattr(module, "dtype", None)))
            module = None
        collect()
        return freed

    # --- coming back --------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def present(self, needed: bool = True, names: Sequence[str] | None = None) -> Iterator[None]:
        """The cached encoders (or those of ``names``) on the training device for the duration (reloaded first if
        released); afterwards off the device again, and released again."""
        names = list(self.away) if names is None else [n for n in names if n in self.away]
        if not needed or not names:
            yield
            return
        if any(n in self.released for n in names):
            self._reload()
        device = self.trainer.acc.device
        for name in names:
            self._module(name).to(device)
        try:
            yield
        finally:
            self._leave_after_use()

    def _leave_after_use(self) -> None:
        from .run_setup import offload_module

        for name in self.away:
            module = self._module(name)
            if not isinstance(module, ReleasedEncoder):
                offload_module(module)
        if self.releases and not self.released:
            self._release()

    def _files_identity(self) -> str:
        from .cache import model_identity

        m = self.trainer.cfg.model
        return model_identity(m.path, m.vae_path, *m.text_encoder_paths)

    def _reload(self) -> None:
        """Read the released encoders again and give them the state the set-up gave them (trainer.run_setup)."""
        from .errors import CrucibleError, ModelLoadError
        from .families.base import check_model_paths
        from .quantized import apply_fp8_base, cast_frozen, fp8_loading
        from .run_setup import DTYPES, load_dtypes

        t = self.trainer
        cfg, family = t.cfg, t.family
        precision = t.resolved["mixed_precision"]
        lowp = precision != "no"
        hint = ("the run released its encoders after caching (training.release_encoders) and reads them again from "
                f"model.path '{cfg.model.path}' (and its VAE / text-encoder paths) for previews")
        if self._files_identity() != self.files:
            raise ModelLoadError(f"the model files changed during training: {hint}, which would no longer give the "
                                 "encoders it cached with. Restore them, or set training.release_encoders false")
        try:
            check_model_paths(cfg.model)
            with fp8_loading(cfg.model.fp8_base):
                modules = family.load_encoders(cfg.model, t.comps, dtype=load_dtypes(cfg, precision, family.vae_fp32))
        except (CrucibleError, OSError) as exc:
            raise ModelLoadError(f"{hint}, and could not: {exc}. Restore the files, or set "
                                 "training.release_encoders false") from exc
        texts = [modules[n] for n in self.released if n != "vae"]
        if cfg.model.fp8_base:
            apply_fp8_base(texts, DTYPES[precision] if lowp else torch.float32)
        if lowp:  # the VAE and text encoders were read in their run dtypes (load_dtypes); T5's wo stays fp32 under fp16
            for module in texts:
                cast_frozen(module, DTYPES[precision])
        for name, signature in self.released.items():
            module = modules[name].requires_grad_(False).eval()
            if _signature(module) != signature:
                raise RuntimeError(f"the reloaded {name} does not match the one released after caching (dtypes or "
                                   "shapes differ); set training.release_encoders false and report this")
            self._put(name, module)
        log.info("reloaded %s from the model files", ", ".join(self.released))
        self.released = {}
