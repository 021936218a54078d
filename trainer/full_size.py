"""Full-size architectures of each family, for memory arithmetic and benchmarks (no download, no checkpoint).

Built on the ``meta`` device they cost no memory and give exact parameter counts (:func:`param_counts`);
:func:`random_components` materialises them with random weights for the memory benchmark. The configurations are
the published ones (SD1.5 ``runwayml``, SDXL base 1.0, SD3 medium, Flux.1 dev; CLIP-L, OpenCLIP-G, T5-XXL).
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, Callable


def _sd15_unet():
    import diffusers

    return diffusers.UNet2DConditionModel(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                          attention_head_dim=8, layers_per_block=2)


def _sdxl_unet():
    import diffusers

    return diffusers.UNet2DConditionModel(
        block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20), addition_embed_type="text_time", projection_class_embeddings_input_dim=2816,
        addition_time_embed_dim=256, use_linear_projection=True, layers_per_block=2, sample_size=128,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))


def _sd3_transformer():
    import diffusers

    return diffusers.SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=192)


def _flux_transformer():
    import diffusers

    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))


def _vae(latent_channels: int):
    def build():
        import diffusers

        return diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2, use_quant_conv=latent_channels == 4, use_post_quant_conv=latent_channels == 4)
    return build


def _clip_l():
    import transformers

    return transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=49408,
        max_position_embeddings=77, projection_dim=768))


def _clip_g():
    import transformers

    return transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120, vocab_size=49408,
        max_position_embeddings=77, projection_dim=1280, hidden_act="gelu"))


def _t5_xxl():
    import transformers

    return transformers.T5EncoderModel(transformers.T5Config(
        d_model=4096, num_layers=24, num_heads=64, d_kv=64, d_ff=10240, feed_forward_proj="gated-gelu",
        vocab_size=32128))


# family -> [(component name, builder)]: the denoiser first, then the text encoders, then the VAE
ARCHITECTURES: dict[str, list[tuple[str, Callable[[], Any]]]] = {
    "sd15": [("unet", _sd15_unet), ("text_encoder", _clip_l), ("vae", _vae(4))],
    "sdxl": [("unet", _sdxl_unet), ("text_encoder", _clip_l), ("text_encoder_2", _clip_g), ("vae", _vae(4))],
    "sd3": [("transformer", _sd3_transformer), ("text_encoder", _clip_l), ("text_encoder_2", _clip_g),
            ("text_encoder_3", _t5_xxl), ("vae", _vae(16))],
    "flux": [("transformer", _flux_transformer), ("text_encoder", _clip_l), ("text_encoder_2", _t5_xxl),
             ("vae", _vae(16))],
}


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
    SD1.5 and SDXL only (the families whose components the benchmark builds here)."""
    import tempfile
    from pathlib import Path

    import torch

    from .families.base import Components
    from .families.sd15 import make_noise_scheduler
    from .families.tokenizers import load_clip_tokenizer
    from .tiny import build_tiny_tokenizer

    if family not in ("sd15", "sdxl"):
        raise ValueError(f"random_components builds sd15 and sdxl, not {family}")
    gen = torch.Generator().manual_seed(seed)
    built = {}
    for name, _ in ARCHITECTURES[family]:
        module = build_meta(family, name)
        target = torch.float32 if name == "vae" and family == "sdxl" else (dtype or torch.float32)
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
        kinds = ("clip_l", "clip_g")[: 2 if family == "sdxl" else 1]
        tokenizers = [load_clip_tokenizer(Path(scratch), kind) for kind in kinds]
    names = tuple(n for n in built if n.startswith("text_encoder"))
    return Components(denoiser=built["unet"], vae=built["vae"], text_encoders=[built[n] for n in names],
                      tokenizers=tokenizers, noise_scheduler=make_noise_scheduler(), text_encoder_names=names,
                      source=f"random-full-{family}", extras={"family": family, "clip_skip": 1})
