"""Validation loss: how well a checkpoint denoises images it never trained on, on identical inputs every time.

The validation set is, in order of precedence:

* ``validation_datasets`` (a separate folder, the Train node's optional ``validation_dataset`` input), or
* ``training.validation_split``: a fraction of the training images held out, chosen by the seed. It applies only
  when the datasets hold at least :data:`MIN_IMAGES_FOR_SPLIT` training images (a LoRA on 6 images needs all of
  them); the default 0.1 therefore holds out 1 image of 10–14, 2 of 15–24 … Regularization images are never held
  out. Held-out images get no repeats, so the step plan counts only what is trained.
* otherwise none, and the run says so (report text and log).

At every save each validation image is scored at the fixed points :data:`FRACTIONS` of the noise schedule
(DDPM timestep ``round(f·T)-1``; flow σ = ``f``, as ai-toolkit does), with noise drawn from a generator keyed by
``(seed, image, point)`` and a deterministic caption (no shuffle or dropout). The loss is the plain MSE against the
objective's target (no min-SNR / flow weighting), averaged over images per point and then over points. Nothing here
touches the global RNG or the training generators, so training and resume are unchanged by validation.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # pragma: no cover
    from .config import TrainConfig
    from .dataset import DataSource

log = logging.getLogger("crucible")

MIN_IMAGES_FOR_SPLIT = 10
FRACTIONS = (0.25, 0.5, 0.75, 1.0)
_NOISE_KEY = 7_777_777  # keeps validation noise apart from the training generators' (step, micro, rank) keys


def holdout_items(items: Sequence[Any], fraction: float, seed: int) -> tuple[tuple[int, ...], str]:
    """Indices of the images to hold out, and a one-line note saying what was (or was not) done.

    The choice ranks each training image by a hash of ``(seed, file name, folder)``, so it is the same on every
    machine, and adding an image moves at most that image in or out of the set.
    """
    candidates = [i for i, item in enumerate(items) if not item.is_reg]
    if fraction <= 0:
        return (), ""
    if len(candidates) < MIN_IMAGES_FOR_SPLIT:
        return (), (f"Validation: off — {len(candidates)} training images are fewer than {MIN_IMAGES_FOR_SPLIT}, so "
                    "none are held out (connect a validation dataset to get a validation loss)")
    count = max(1, round(fraction * len(candidates)))

    def rank(i: int) -> bytes:
        item = items[i]
        return hashlib.sha256(f"{seed}|{item.path.parent.name}|{item.path.name}".encode("utf-8", "surrogatepass")).digest()

    chosen = tuple(sorted(sorted(candidates, key=rank)[:count]))
    names = ", ".join(items[i].path.name for i in chosen[:5]) + (" …" if count > 5 else "")
    return chosen, (f"Validation: {count} of {len(candidates)} training images held out "
                    f"(validation_split {fraction:g}, never trained on): {names}")


def training_source(cfg: "TrainConfig") -> "DataSource":
    """The run's training data: the configured datasets minus the held-out validation images."""
    from .dataset import DataSource

    split = 0.0 if cfg.validation_datasets else cfg.training.validation_split
    return DataSource(cfg.datasets, seed=cfg.training.seed, validation_split=split)


@dataclass(frozen=True)
class ValidationResult:
    loss: float  # mean over FRACTIONS of the per-point mean over images
    per_point: dict[str, float]  # {"0.25": loss, …}

    def to_json(self) -> dict[str, float]:
        return dict(self.per_point)


class Validator:
    """Scores the current weights of a run on its validation set (see the module docstring)."""

    def __init__(self, trainer: Any, source: "DataSource", indices: Sequence[int], description: str):
        self.trainer = trainer
        self.source = source
        self.indices = tuple(indices)
        self.description = description
        self._latents: dict[int, torch.Tensor] = {}
        self._conds: dict[int, dict[str, torch.Tensor]] = {}  # filled by prepare (the text encoders leave after)

    @classmethod
    def for_run(cls, trainer: Any) -> "Validator":
        cfg = trainer.cfg
        if cfg.validation_datasets:
            from .dataset import DataSource

            source = DataSource(cfg.validation_datasets, seed=cfg.training.seed)
            indices = [i for i, item in enumerate(source.items) if not item.is_reg]
            note = f"Validation: {len(indices)} images of the validation dataset"
        else:
            source, indices, note = trainer.source, trainer.source.validation_items, trainer.source.validation_note
        note = note or "Validation: off (validation_split 0 and no validation dataset): no validation loss"
        log.info("%s", note)
        return cls(trainer, source, indices, note)

    def __len__(self) -> int:
        return len(self.indices)

    # --- inputs (identical at every call) ------------------------------------------------------------------------
    def _caption(self, index: int):
        from .captions import process_caption

        item = self.source.items[index]
        plain = dataclasses.replace(self.source.datasets[item.dataset_index].captions, shuffle_caption=False,
                                    caption_dropout_rate=0.0, caption_tag_dropout_rate=0.0,
                                    caption_dropout_every_n_epochs=0)
        return process_caption(item.caption_raw, plain, seed=self.source.seed, epoch=1, item=index)

    def _latent(self, index: int) -> torch.Tensor:
        """The image without augmentation (centre crop, no flip or colour jitter), encoded once: the VAE is frozen."""
        if index not in self._latents:
            from .dataset import load_image

            t = self.trainer
            item = self.source.items[index]
            width, height = self.source.buckets[index]
            ds = self.source.datasets[item.dataset_index]
            plain = dataclasses.replace(ds, flip_aug=False, color_aug=False,
                                        crop_style="center" if ds.crop_style == "random" else ds.crop_style)
            pixels = load_image(item, width, height, plain, seed=self.source.seed, epoch=1, repeat=0)[None]
            vae_dtype = next(t.comps.vae.parameters()).dtype
            with torch.no_grad():
                self._latents[index] = t.family.encode_images(t.comps, pixels.to(t.acc.device, dtype=vae_dtype)).float()
        return self._latents[index]

    def _cond(self, index: int) -> dict[str, torch.Tensor]:
        """The caption's conditioning: encoded by :meth:`prepare` before the text encoders left, or now."""
        t = self.trainer
        if index in self._conds:
            return {k: v.to(t.acc.device) for k, v in self._conds[index].items()}
        caption = self._caption(index)
        extra = {"weights": [caption.weights]} if caption.weights is not None else {}
        with t.acc.autocast():
            return t.family.encode_text(t.comps, [caption.text], clip_skip=t.cfg.model.clip_skip,
                                        max_token_length=t.max_token_length, **extra)

    def prepare(self, captions: bool) -> None:
        """Encode every validation image (and with ``captions``, caption) now, before the run releases the encoders
        after caching (:mod:`trainer.encoder_residency`). Captions only when the text encoders go: they are frozen
        then, so the conditioning never changes (a trained one's does)."""
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for index in self.indices:
                self._latent(index)
                if captions:
                    self._conds[index] = {k: v.detach().cpu() for k, v in self._cond(index).items()}

    @staticmethod
    def noise_generator(seed: int, image: int, point: int) -> torch.Generator:
        digest = hashlib.sha256(repr((seed, _NOISE_KEY, image, point)).encode()).digest()
        return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))

    # --- scoring -------------------------------------------------------------------------------------------------
    def evaluate(self) -> ValidationResult | None:
        """The validation loss of the trainer's current weights; None without a validation set."""
        if not self.indices:
            return None
        t = self.trainer
        fam, comps, cfg = t.family, t.comps, t.cfg
        modules = list(t.net.modules.values())
        modes = [m.training for m in modules]
        sums = [0.0] * len(FRACTIONS)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for m in modules:
                m.eval()
            try:
                for n, index in enumerate(self.indices):
                    latents = self._latent(index)
                    cond = self._cond(index)
                    for k, fraction in enumerate(FRACTIONS):
                        noise = torch.randn(latents.shape, generator=self.noise_generator(cfg.training.seed, n, k))
                        noised = t.objective.noise_at(latents, noise.to(latents), fraction)
                        with t.acc.autocast():
                            pred = fam.predict(comps, noised.noisy, noised.timesteps, cond)
                        sums[k] += float(F.mse_loss(pred.float(), noised.target.float()))
            finally:
                for m, mode in zip(modules, modes):
                    m.train(mode)
        per_point = {f"{f:.2f}": s / len(self.indices) for f, s in zip(FRACTIONS, sums)}
        return ValidationResult(sum(per_point.values()) / len(per_point), per_point)


def validation_summary(validator: Validator | None, checkpoints: Sequence[Any]) -> dict[str, Any]:
    """run.json's ``validation`` entry: the set used, the schedule points and the recommended checkpoint."""
    from .sweep import best_index

    if validator is None:
        return {"images": 0}
    best = best_index([c.val_loss for c in checkpoints])
    return {"images": len(validator), "note": validator.description, "points": list(FRACTIONS),
            "best": checkpoints[best].path.name if best is not None else None,
            "best_val_loss": checkpoints[best].val_loss if best is not None else None}
