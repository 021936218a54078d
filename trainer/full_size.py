"""Full-size architectures of each family, for memory arithmetic and benchmarks (no download, no checkpoint).

Each family lists its components in ``ModelFamily.full_size_components`` (its denoiser's builder lives in its own
module); the shared parts (CLIP-L, OpenCLIP-G, T5-XXL, the 4/16-channel VAE) are built here.

Built on the ``meta`` device they cost no memory and give exact parameter counts (:func:`param_counts`);
:func:`random_components` materialises them with random weights for the memory benchmark. The configurations are
the published ones (SD1.5 ``runwayml``, SDXL base 1.0, SD3 medium, Flux.1 dev; CLIP-L, OpenCLIP-G, T5-XXL).
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Callable


def vae(latent_channels: int):
    def build():
        import diffusers

        return diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2, use_quant_conv=latent_channels == 4, use_post_quant_conv=latent_channels == 4)
    return build


def clip_l():
    import transformers

    return transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=49408,
        max_position_embeddings=77, projection_dim=768))


def clip_l_projected():
    """CLIP-L with its 768×768 text projection (SD3 loads it so: the pooled output is projected)."""
    import transformers

    return transformers.CLIPTextModelWithProjection(clip_l().config)


def clip_g():
    import transformers

    return transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120, vocab_size=49408,
        max_position_embeddings=77, projection_dim=1280, hidden_act="gelu"))


def t5_xxl():
    import transformers

    return transformers.T5EncoderModel(transformers.T5Config(
        d_model=4096, num_layers=24, num_heads=64, d_kv=64, d_ff=10240, feed_forward_proj="gated-gelu",
        vocab_size=32128))


class _Architectures(Mapping):
    """``family name -> [(component name, builder)]``, read from the families' ``full_size_components`` (the
    denoiser first, then the text encoders, then the VAE)."""

    def __getitem__(self, family: str) -> list[tuple[str, Callable[[], Any]]]:
        from .families import get_family

        return list(get_family(family).full_size_components)

    def __iter__(self) -> Iterator[str]:
        from .families import FAMILY_NAMES

        return iter(FAMILY_NAMES)

    def __len__(self) -> int:
        from .families import FAMILY_NAMES

        return len(FAMILY_NAMES)


ARCHITECTURES: Mapping[str, list[tuple[str, Callable[[], Any]]]] = _Architectures()


def build_meta(family: str, component: str):
    """The full-size module on the meta device (no memory)."""
    import torch

    builder = dict(ARCHITECTURES[family])[component]
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return builder()


@functools.lru_cache(maxsize=None)
def param_counts(family: str) -> dict[str, int]:
    """Parameters per component of the full-size model (exact, from the meta-device build)."""
    return {name: sum(p.numel() for p in build_meta(family, name).parameters()) for name, _ in ARCHITECTURES[family]}


def random_components(family: str, dtype=None, seed: int = 0):
    """Full-size :class:`~trainer.families.base.Components` with random weights (normal, std 0.02), materialised
    tensor by tensor in ``dtype`` (never a whole fp32 copy first); tiny CLIP tokenizers (ids fit every vocab).
    The UNet families with CLIP text encoders only (SD1.5, SDXL: what the memory benchmark builds here)."""
    import tempfile
    from pathlib import Path

    import torch

    from .families import get_family
    from .families.base import Components
    from .families.sd15 import make_noise_scheduler
    from .families.tokenizers import load_clip_tokenizer
    from .tiny import build_tiny_tokenizer

    fam = get_family(family)
    kinds = [spec.kind for spec in fam.encoders]
    if fam.denoiser_name != "unet" or not set(kinds) <= {"clip_l", "clip_g"}:
        raise ValueError(f"random_components builds the UNet families (CLIP text encoders only), not {family}")
    gen = torch.Generator().manual_seed(seed)
    built = {}
    for name, _ in ARCHITECTURES[family]:
        module = build_meta(family, name)
        target = torch.float32 if name == "vae" and fam.vae_fp32 else (dtype or torch.float32)
        module = module.to(dtype=target).to_empty(device="cpu")  # allocated once, in the target dtype
        with torch.no_grad():
            for t in module.parameters():
                t.normal_(0.0, 0.02, generator=gen)
            for bname, buf in module.named_buffers():  # to_empty leaves buffers uninitialised
                if bname.endswith("position_ids"):
                    buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
                elif buf.is_floating_point():
                    raise ValueError(f"random_components cannot initialise the buffer {bname}")
        module.eval()
        built[name] = module
    with tempfile.TemporaryDirectory(prefix="crucible-tok-") as scratch:
        build_tiny_tokenizer(Path(scratch))
        tokenizers = [load_clip_tokenizer(Path(scratch), kind) for kind in kinds]
    names = tuple(n for n in built if n.startswith("text_encoder"))
    return Components(denoiser=built["unet"], vae=built["vae"], text_encoders=[built[n] for n in names],
                      tokenizers=tokenizers, noise_scheduler=make_noise_scheduler(), text_encoder_names=names,
                      source=f"random-full-{family}", extras={"family": family, "clip_skip": 1})
