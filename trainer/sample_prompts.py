"""Previews without the text encoders (issue 16): the preview prompts encoded once, before the encoders leave.

With the text cache on (and no text encoder training), the text encoders leave the training device after caching,
and host memory too (:mod:`trainer.encoder_residency`). Reading them back for every preview (Flux's T5 alone is
~9 GiB) would make each preview slow and spike host memory mid-run. Instead, while the encoders are still present,
:func:`encode_preview_prompts` encodes every ``sample.prompts`` entry and the negative prompt, exactly as a preview
would (same device, autocast and family code: :meth:`ModelFamily.sample_conditioning`), and keeps the embeddings
on the CPU (a few MiB). Each preview then hands them to :meth:`ModelFamily.sample` and needs only the VAE
(kohya ``--cache_text_encoder_outputs`` with ``--sample_prompts``; SimpleTuner does the same).

The VAE stays in host memory (off the device during the steps) when the run has previews, rather than being
read back from the model files for each: it is ~0.16 GiB in half precision (~0.3 GiB in fp32, the SDXL VAE), and
reading it back means opening the model files again (a 6.5 GiB SDXL single file, a Flux split set) through
``load_encoders``, which reads the text encoders too.

A prompt list that differs from the one encoded (edited mid-run by a caller that changes ``cfg.sample``) is encoded
again with the text encoders brought back once (read from the files where they were released), then released
again. A resumed run encodes its own (possibly edited) list before it releases the encoders.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import torch

log = logging.getLogger("crucible")


@dataclass
class PreviewPrompts:
    """The preview prompts' pipeline embeddings (on the CPU) and what they were encoded from."""

    key: tuple
    conditioning: list[dict[str, torch.Tensor]]

    def on(self, device: Any) -> list[dict[str, torch.Tensor]]:
        return [{k: v.to(device) for k, v in c.items()} for c in self.conditioning]


def prompts_key(sample: Any) -> tuple:
    """What the embeddings depend on in ``cfg.sample``: the prompts, the negative prompt and whether CFG uses it."""
    return tuple(sample.prompts), sample.negative_prompt, float(sample.cfg)


def renders_previews(trainer: Any) -> bool:
    """Whether this process renders preview samples (every rank of a sharded run; otherwise the main process)."""
    return bool(trainer.cfg.sample.prompts) and (trainer.acc.is_main_process or trainer.sharded)


def encode_preview_prompts(trainer: Any) -> PreviewPrompts | None:
    """Encode ``cfg.sample``'s prompts with the text encoders as they are now (present); ``None`` when the family
    encodes prompts only while rendering (:meth:`ModelFamily.sample_conditioning`)."""
    s, family, comps = trainer.cfg.sample, trainer.family, trainer.comps
    with torch.no_grad(), trainer.acc.autocast():
        encoded = [family.sample_conditioning(comps, prompt, s.negative_prompt, s.cfg) for prompt in s.prompts]
    if not encoded or any(c is None for c in encoded):
        return None
    return PreviewPrompts(prompts_key(s), [{k: v.detach().cpu() for k, v in c.items()} for c in encoded])


@contextlib.contextmanager
def preview_conditioning(trainer: Any) -> Iterator[list[dict[str, torch.Tensor]] | None]:
    """For the duration of one preview: the prompts' embeddings on the device with the VAE there too, or ``None``
    with every encoder the caches replaced brought back (no pre-encoded prompts: the old way)."""
    residency = trainer.residency
    prompts: PreviewPrompts | None = getattr(trainer, "preview_prompts", None)
    if prompts is None or residency is None:
        with trainer._encoders_on_device():
            yield None
        return
    if prompts.key != prompts_key(trainer.cfg.sample):
        texts = trainer.comps.text_encoder_names
        log.info("the preview prompts changed since they were encoded: encoding them again (%s brought back once)",
                 ", ".join(texts))
        with residency.present(names=texts):
            prompts = trainer.preview_prompts = encode_preview_prompts(trainer)
    with residency.present(names=("vae",)):
        yield prompts.on(trainer.acc.device)
