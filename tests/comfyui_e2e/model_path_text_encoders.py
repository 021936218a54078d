"""Families Crucible has no diffusers adapter for, with their **real text-encoder classes**, trained through the MODEL
path in ComfyUI's own process (issue 18). Runs inside the ComfyUI 0.8.0 venv (a subprocess of
``checks_model_path_new_families.py``).

ComfyUI fixes these models' sizes in code (detection fixes Z-Image's 3840 width; ``comfy/text_encoders/llama.py``
and ``t5_config_xxl.json`` fix the encoders), so no stock loader gives a tiny one. Each case is built here with
ComfyUI's own classes at tiny size instead:

* **diffusion model**: the family's ``comfy.supported_models`` class (``ZImage``, …) constructed with a small
  ``unet_config`` (the keys its detection fills, smaller width and depth), ``get_model`` → its real ``model_base``
  class and diffusion module, seeded random weights, wrapped in ComfyUI's ``ModelPatcher``; its sampling (flow,
  shift) and latent format are the class's own.
* **text encoder**: the class the family's own ``clip_target()`` names (Z-Image: ``ZImageTokenizer`` +
  ``z_image.te`` → ``Qwen3_4BModel`` → ``llama.Qwen3_4B``) built by ``comfy.sd.CLIP`` with ComfyUI's own size
  override (model option ``<name>_model_config``, read by ``sd1_clip.SDClipModel``), random weights loaded through
  ``CLIP.load_sd``; the tokenizer is ComfyUI's, from the files in its source tree (offline): Qwen's for Z-Image,
  T5's for Chroma. Gemma 2's SentencePiece model is not in the tree (ComfyUI reads it from the encoder file), so a
  small one trained on the demo captions with Gemma's special ids stands in, run by ComfyUI's ``SPieceTokenizer``.
  So the chat template, hidden-layer choice (``layer_idx``), attention masks and unpadded lengths are ComfyUI's
  real code. Substituted: the sizes (:data:`CASES`), the weights (random), Gemma's vocabulary.
* **VAE**: ComfyUI's ``comfy.sd.VAE`` with its own ``AutoencoderKL`` class from an explicit config (as for a
  checkpoint's yaml), 32 base channels instead of 128, the family's 16 latent channels (``latent_formats.Flux``).

Per case (``model_path_training.train_family``): 12 steps of LoRA (all_linear, dim 4, no gradient checkpointing)
with cached latents and text embeddings through :class:`ComfyModelFamily`, batch 2, on 4 demo images whose captions
have 1–4 comma-separated parts (so every batch holds captions of different token lengths); the loss falls; every
exported module is in ComfyUI's key map (``comfy.lora.model_lora_keys_unet``) and ComfyUI's loader patches one
weight per trained module with no unloaded key; a preview renders through the family's sampler; ComfyUI's sampler
renders the LoRA-patched MODEL unlike the base; the MODEL is unchanged after the run; on Z-Image, Cancel after step
6 → resume equals the whole run (the other two skip it for the stage's time; the server checks resume them).
Not here: Qwen-Image, whose Qwen2.5-VL encoder class always builds its fixed vision tower (32 layers, 1280 wide,
about 0.6 G weights) whatever the text size, and whose VAE is Wan's 3-D one.
"""
from __future__ import annotations

import gc
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tests/: the model fixtures
from comfy_python import report, setup_comfy  # noqa: E402
from model_path_training import CaseSettings, pack_modules  # noqa: E402

TEXT_WIDTH = 64  # the tiny encoders' hidden size = the diffusion models' caption width
PROMPTS = ("crucible, red circle, black background",)
TRAINING = {"gradient_checkpointing": False}  # tiny models: no recomputation (the stage's time)
DATA = ("00_red_circle", "05_blue_square", "08_red_triangle", "11_yellow_triangle")  # 4 of the 12 demo images


@dataclass(frozen=True)
class EncoderCase:
    name: str  # comfy.supported_models class
    unet_config: dict  # what its detection would fill, at tiny width/depth
    encoder: str  # the SDClipModel's model_name: model option "<encoder>_model_config" resizes it
    encoder_config: dict
    settings: CaseSettings = field(default_factory=lambda: CaseSettings(2, 1e-2, 1.0, resume=False, training=TRAINING))
    real: str = ""  # the released sizes, for the report
    spiece: bool = False  # the tokenizer's SentencePiece model travels in the encoder file (Gemma): one is trained


CASES = {
    "zimage": EncoderCase(
        "ZImage",
        # detection's Z-Image keys (comfy/model_detection.py, dim 3840 → 30 heads of 128): heads of 128 kept
        dict(image_model="lumina2", patch_size=2, in_channels=16, dim=256, cap_feat_dim=TEXT_WIDTH, n_layers=1,
             qk_norm=True, n_heads=2, n_kv_heads=2, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
             rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True, time_scale=1000.0,
             pad_tokens_multiple=32),
        "qwen3_4b",
        dict(hidden_size=TEXT_WIDTH, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
             num_key_value_heads=1),
        settings=CaseSettings(2, 1e-2, 1.0, training=TRAINING),  # Cancel → resume on this case only
        real="NextDiT 3840 wide × 30 layers; Qwen3-4B 2560 wide × 36 layers"),
    "chroma": EncoderCase(
        "Chroma",
        # the keys comfy_new_families uses for Chroma (detection: Flux's 3072 width, heads of 128): heads of 128 kept
        dict(image_model="chroma", in_channels=64, out_channels=64, hidden_size=256, context_in_dim=TEXT_WIDTH,
             mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000,
             qkv_bias=True, in_dim=64, out_dim=256, hidden_dim=128, n_layers=2, patch_size=2, txt_ids_dims=[],
             vec_in_dim=None),
        "t5xxl",
        dict(d_model=TEXT_WIDTH, d_ff=128, d_kv=32, num_heads=2, num_layers=2),
        real="Chroma 3072 wide, 19 + 38 blocks; T5-XXL 4096 wide × 24 layers"),
    "lumina2": EncoderCase(
        "Lumina2",
        # detection's Lumina 2 keys (dim 2304 → 24 heads of 96, 8 KV heads): heads of 96 kept
        dict(image_model="lumina2", patch_size=2, in_channels=16, dim=192, cap_feat_dim=TEXT_WIDTH, n_layers=1,
             qk_norm=True, n_heads=2, n_kv_heads=1, axes_dims=[32, 32, 32], axes_lens=[300, 512, 512],
             rope_theta=10000.0, ffn_dim_multiplier=4.0),
        "gemma2_2b",
        dict(vocab_size=512, hidden_size=TEXT_WIDTH, intermediate_size=128, num_hidden_layers=3,
             num_attention_heads=1, num_key_value_heads=1),
        real="NextDiT 2304 wide × 26 layers; Gemma 2 2B 2304 wide × 26 layers, 256k-piece vocabulary",
        spiece=True),
}


def small_dataset(folder: Path) -> Path:
    """:data:`DATA` from the demo set, each image with the first 1, 2, 3, 4 comma-separated parts of its caption:
    captions of clearly different token lengths in every batch, and a third of the caching work."""
    import shutil

    demo = Path(__file__).resolve().parents[2] / "trainer" / "demo_data" / "10_crucible shapes"
    target = folder / "data" / "1_crucible shapes"
    target.mkdir(parents=True)
    for parts, stem in enumerate(DATA, 1):
        shutil.copy2(demo / f"{stem}.png", target / f"{stem}.png")
        caption = (demo / f"{stem}.txt").read_text().strip().split(", ")
        (target / f"{stem}.txt").write_text(", ".join(caption[:parts]))
    return target.parent


def spiece_model(vocab: int) -> bytes:
    """A SentencePiece model with Gemma's special ids (pad 0, eos 1, bos 2, unk 3), trained on the demo captions:
    ComfyUI reads Gemma's tokenizer from the encoder file (``spiece_model``), and none ships in its source tree.
    ComfyUI's own ``SPieceTokenizer`` runs it."""
    import io

    import sentencepiece

    demo = Path(__file__).resolve().parents[2] / "trainer" / "demo_data"
    lines = [p.read_text().strip() for p in sorted(demo.rglob("*.txt"))] + list(PROMPTS)
    lines += [f"{a} {b} on a {c} background" for a in ("a red", "a blue", "a small", "a large")
              for b in ("circle", "square", "triangle", "dot") for c in ("black", "white", "grey")]
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab,
                                             pad_id=0, eos_id=1, bos_id=2, unk_id=3, hard_vocab_limit=False,
                                             num_threads=1, minloglevel=2)
    return out.getvalue()


def random_state(layout: dict, seed: int) -> dict:
    import torch

    from comfy_new_families import random_weights

    return {k: v.to(torch.float32) for k, v in random_weights(layout, seed).items()}


def build_model(case: EncoderCase, seed: int):
    """ComfyUI's MODEL of ``case``: its supported-model class, model_base and diffusion module, random weights."""
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    config = getattr(comfy.supported_models, case.name)(dict(case.unet_config))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    model.diffusion_model.load_state_dict(random_state(model.diffusion_model.state_dict(), seed), strict=True)
    device = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device), config


def tiny_vae(channels: int = 16, seed: int = 2):
    """ComfyUI's VAE object around its own AutoencoderKL at 32 base channels (8× down, ``channels`` latent
    channels), random weights: ComfyUI's detection would build the 84 M-weight released size from any SD-style file."""
    import comfy.ldm.models.autoencoder as ae
    import comfy.sd
    import torch

    ddconfig = dict(double_z=True, z_channels=channels, resolution=64, in_channels=3, out_ch=3, ch=32,
                    ch_mult=[1, 2, 2, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    with torch.device("meta"):
        layout = ae.AutoencoderKL(ddconfig=ddconfig, embed_dim=channels).state_dict()
    vae = comfy.sd.VAE(sd=random_state(layout, seed), config={"params": {"ddconfig": ddconfig, "embed_dim": channels}})
    vae.latent_channels = channels  # set by detection only; the config path keeps SD's 4
    return vae


def build_clip(case: EncoderCase, config, seed: int):
    """ComfyUI's CLIP of ``case``: the tokenizer and text-encoder classes the family's ``clip_target`` names, at the
    tiny size, random weights loaded through ``CLIP.load_sd`` (every weight must be taken)."""
    import comfy.sd
    import torch

    target = config.clip_target({})
    options = {"dtype": torch.float32, f"{case.encoder}_model_config": dict(case.encoder_config)}
    if case.encoder not in ("t5xxl",):  # T5XXLModel names itself; the LLM models take the name from the options
        options["model_name"] = case.encoder
    tokenizer_data = {"spiece_model": spiece_model(256)} if case.spiece else {}
    clip = comfy.sd.CLIP(target, model_options=options, tokenizer_data=tokenizer_data)
    inner = getattr(clip.cond_stage_model, case.encoder).transformer
    missing, unexpected = clip.load_sd(random_state(inner.state_dict(), seed))
    if missing or unexpected:
        raise AssertionError(f"{case.name}: CLIP.load_sd left missing {missing[:3]} / unexpected {unexpected[:3]}")
    return clip


def describe(case: EncoderCase, model, clip) -> str:
    encoder = getattr(clip.cond_stage_model, case.encoder)
    widths = {len(clip.encode_from_tokens(clip.tokenize(t), return_dict=True)["cond"][0])
              for t in ("a", "a red circle on a black background")}
    weights = sum(p.numel() for p in model.model.diffusion_model.parameters()) / 1e6
    return (f"{type(model.model).__name__} ({type(model.model.model_config).__name__}) {weights:.1f} M weights, "
            f"{type(model.model.model_sampling).__name__}; text encoder {type(encoder).__name__} → "
            f"{type(encoder.transformer).__name__}, {sum(p.numel() for p in encoder.parameters()) / 1e6:.1f} M, "
            f"caption lengths {sorted(widths)} tokens; tokenizer {type(clip.tokenizer).__name__} "
            f"(real: {case.real})")


def key_map_check(path: Path, model) -> tuple[str, str]:
    """Every module of the saved LoRA is a key of ComfyUI's own key map for this model."""
    import comfy.lora
    import comfy.utils

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    modules = {k.rsplit(".lora_down.weight", 1)[0] for k in comfy.utils.load_torch_file(str(path), safe_load=True)
               if k.endswith(".lora_down.weight")}
    outside = sorted(modules - set(key_map))
    return ("fail" if outside or not modules else "pass",
            f"{len(outside)} of {len(modules)} modules outside the key map: {outside[:3]}" if outside else
            f"{len(modules)} modules, each in model_lora_keys_unet")


def run_case(args, pack, module, name: str, out: Path) -> None:
    from model_path_training import train_family

    case = CASES[name]
    started = time.perf_counter()
    model, config = build_model(case, seed=0)
    clip = build_clip(case, config, seed=1)
    vae = tiny_vae(16)
    label = f"{name} MODEL path"
    report("pass", f"{label}: ComfyUI's own classes at tiny size", describe(case, model, clip)
           + f" ({time.perf_counter() - started:.0f}s)")

    def keys_in_map(path: Path) -> tuple[str, str, str]:
        status, detail = key_map_check(path, model)
        return status, f"{label}: every LoRA module is in ComfyUI's key map", detail

    train_family(args, pack, module, name, out, objects=(model, clip, vae), settings=case.settings,
                 sample_prompts=PROMPTS, lora_extra=keys_in_map, data=small_dataset(out))


def main() -> None:
    args = setup_comfy()
    module, pack = pack_modules(args.pack_dir)
    wanted = [n for n in args.only.split(",") if n] or list(CASES)
    for name in wanted:
        with tempfile.TemporaryDirectory(prefix=f"crucible-te-{name}-") as tmp:
            try:
                run_case(args, pack, module, name, Path(tmp))
            except Exception:  # noqa: BLE001 - report and go on with the next case
                report("fail", f"{name} MODEL path with its real text encoder", traceback.format_exc()[-3000:])
        gc.collect()


if __name__ == "__main__":
    main()
