"""Export → safetensors file → import into a fresh peft model gives the same outputs (tiny SD1.5-shaped UNet and
CLIP-L-shaped text encoder), and diffusers' own kohya loader reads the exported UNet the same way."""
from __future__ import annotations

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from trainer.errors import CrucibleError  # noqa: E402
from trainer.export import export_peft_modules  # noqa: E402
from trainer.lora_import import import_lora, load_lora_into  # noqa: E402
from trainer.lora_metadata import lora_metadata  # noqa: E402
from trainer.fileio import save_safetensors  # noqa: E402
from trainer.lora_targets import lora_target_modules  # noqa: E402



def tiny_unet() -> "diffusers.UNet2DConditionModel":
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def tiny_clip() -> "transformers.CLIPTextModel":
    torch.manual_seed(1)
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000,
        max_position_embeddings=77, projection_dim=32, bos_token_id=0, eos_token_id=2, pad_token_id=1))


BASES = {"unet": tiny_unet(), "text_encoder": tiny_clip()}


def config(network: str, component: str, alpha: float = 8.0):
    """The run's adapter config: LoRA-family with a different rank and alpha on convolutions (conv_dim/alpha)."""
    targets = lora_target_modules("sd15", component, "all_linear_conv")
    patterns = {"rank_pattern": {"conv1": 2, "conv2": 2}, "alpha_pattern": {"conv1": 1.0, "conv2": 1.0}}
    if network in ("lora", "dora"):
        return peft.LoraConfig(r=4, lora_alpha=alpha, target_modules=targets, use_dora=network == "dora", **patterns)
    if network == "loha":
        return peft.LoHaConfig(r=4, alpha=alpha, target_modules=targets, use_effective_conv2d=True, **patterns)
    return peft.LoKrConfig(r=4, alpha=alpha, target_modules=targets, decompose_both=True, **patterns)


def with_adapter(component: str, cfg, randomize: bool) -> torch.nn.Module:
    """A copy of the base component with a peft adapter; ``randomize`` makes every adapter weight non-zero.

    The adapter is injected with peft directly, as ``trainer.network.attach_network`` does: ``model.add_adapter`` is
    transformers' / diffusers' wrapper and carries its own peft version gate (transformers 5.25 refuses peft 0.21)."""
    model = copy.deepcopy(BASES[component])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.inject_adapter_in_model(cfg, model, adapter_name="default")
    if randomize:
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    param.mul_(1.2 + 0.2 * torch.rand(param.shape, generator=generator))
                elif any(tag in name for tag in ("lora_", "hada_", "lokr_")):
                    param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


@torch.no_grad()
def outputs(unet, text_encoder) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 1000, (2, 7), generator=generator)
    hidden = text_encoder(ids).last_hidden_state
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 7, 32, generator=generator)
    return unet(sample, 10, encoder_hidden_states=context).sample, hidden


def roundtrip_file(tmp_path, network: str) -> tuple[dict, tuple]:
    """Train-shaped adapters → exported file on disk; returns the file's tensors and the adapters' outputs."""
    unet = with_adapter("unet", config(network, "unet"), randomize=True)
    te = with_adapter("text_encoder", config(network, "text_encoder"), randomize=True)
    path = save_safetensors(tmp_path / "lora.safetensors", export_peft_modules("sd15", {"unet": unet, "text_encoder": te}))
    return load_file(str(path)), outputs(unet, te)


def assert_close(actual: tuple, expected: tuple, atol: float = 2e-5) -> None:
    for a, e in zip(actual, expected):
        assert torch.allclose(a, e, atol=atol, rtol=1e-4), f"max diff {float((a - e).abs().max())}"


@pytest.mark.parametrize("network", ["lora", "dora", "loha", "lokr"])
def test_export_import_roundtrip_gives_the_same_outputs(tmp_path, network):
    tensors, expected = roundtrip_file(tmp_path, network)
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in tensors)  # text_model. level inserted
    base = outputs(BASES["unet"], BASES["text_encoder"])
    assert all(float((e - b).abs().max()) > 1e-3 for e, b in zip(expected, base)), "the adapter changes nothing"

    # The fresh run uses another alpha: import converts ComfyUI's scale into the new adapter's scaling.
    fresh = {c: with_adapter(c, config(network, c, alpha=2.0), randomize=False) for c in BASES}
    for component, module in fresh.items():
        assert load_lora_into("sd15", component, module, tensors) == []
    assert_close(outputs(fresh["unet"], fresh["text_encoder"]), expected)


def test_plain_lora_file_into_a_dora_adapter_reproduces_the_lora(tmp_path):
    tensors, expected = roundtrip_file(tmp_path, "lora")
    fresh = {c: with_adapter(c, config("dora", c), randomize=False) for c in BASES}
    for component, module in fresh.items():
        load_lora_into("sd15", component, module, tensors)
    assert_close(outputs(fresh["unet"], fresh["text_encoder"]), expected)


def test_diffusers_reads_the_kohya_unet_file_the_same_way(tmp_path):
    """An independent reader: diffusers' kohya conversion (lora_state_dict + load_lora_into_unet)."""
    from packaging.version import Version

    if Version(diffusers.__version__) < Version("0.39"):
        pytest.skip("diffusers < 0.39's kohya converter drops conv_in / conv_out / time_embedding keys (mapped from "
                    "0.39 on), so it cannot read the whole file; the pack itself does not use that converter")
    tensors, expected = roundtrip_file(tmp_path, "lora")
    unet_keys = {k: v for k, v in tensors.items() if k.startswith("lora_unet_")}
    state, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(unet_keys)
    unet = copy.deepcopy(BASES["unet"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        diffusers.StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=unet)
    fresh_te = with_adapter("text_encoder", config("lora", "text_encoder"), randomize=False)
    load_lora_into("sd15", "text_encoder", fresh_te, tensors)
    assert_close(outputs(unet.eval(), fresh_te), expected)


def test_import_refuses_mismatched_runs(tmp_path):
    tensors, _ = roundtrip_file(tmp_path, "lora")
    narrower = with_adapter("unet", peft.LoraConfig(r=4, target_modules=["to_q"]), randomize=False)
    with pytest.raises(CrucibleError, match="not trained by this run's adapter"):
        import_lora("sd15", "unet", tensors, narrower)
    with pytest.raises(CrucibleError, match="holds a lora adapter but this run trains loha"):
        load_lora_into("sd15", "unet", with_adapter("unet", config("loha", "unet"), randomize=False), tensors)
    wider = peft.LoraConfig(r=8, lora_alpha=8, target_modules=lora_target_modules("sd15", "unet", "all_linear_conv"))
    with pytest.raises(CrucibleError, match="set network_dim"):
        load_lora_into("sd15", "unet", with_adapter("unet", wider, randomize=False), tensors)
    with pytest.raises(CrucibleError, match="is not a LoRA"):
        load_lora_into("sd15", "unet", with_adapter("unet", config("lora", "unet"), randomize=False),
                       {**tensors, "lora_unet_conv_in.hada_w9": torch.zeros(1)})


def test_untouched_modules_are_reported(tmp_path):
    tensors, _ = roundtrip_file(tmp_path, "lora")
    only_attn = {k: v for k, v in tensors.items() if "_attn" in k and k.startswith("lora_unet_")}
    module = with_adapter("unet", config("lora", "unet"), randomize=False)
    untouched = load_lora_into("sd15", "unet", module, only_attn)
    assert untouched and all("attn" not in name for name in untouched)
    assert "conv_in" in untouched


def test_metadata_has_the_kohya_and_modelspec_keys():
    from trainer.config import TrainConfig

    cfg = TrainConfig.from_dict({"model": {"family": "sdxl", "path": "/models/sdxl_base.safetensors"},
                                 "datasets": [{"path": "/data/cats", "resolution": 1024,
                                               "captions": {"trigger_word": "ohwx cat"}}],
                                 "network": {"network_type": "loha", "network_dim": 8, "network_alpha": 4}})
    meta = lora_metadata(cfg, step=120, epoch=3, started_at=1_700_000_000.5, num_train_images=12,
                         tag_frequency={"10_cats": {"cat": 12, "sofa": 3}}, output_name="cats-e3")
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert meta["ss_network_args"] == '{"algo": "loha"}'
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("8", "4")
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert (meta["ss_steps"], meta["ss_epoch"], meta["crucible_step"], meta["crucible_epoch"]) == ("120", "3", "120", "3")
    assert meta["ss_resolution"] == "(1024, 1024)" and meta["ss_num_train_images"] == "12"
    assert meta["ss_output_name"] == "cats-e3" and meta["ss_sd_model_name"] == "sdxl_base.safetensors"
    assert meta["ss_training_started_at"] == "1700000000.5" and meta["ss_learning_rate"] == "0.0001"
    assert __import__("json").loads(meta["ss_tag_frequency"]) == {"10_cats": {"cat": 12, "sofa": 3}}
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.title"] == "cats-e3" and meta["modelspec.trigger_phrase"] == "ohwx cat"
    assert TrainConfig.from_dict(__import__("json").loads(meta["crucible_config"])) == cfg
    plain = lora_metadata(cfg.replace(network={"network_type": "lora"}), step=1, epoch=1)
    assert plain["ss_network_module"] == "networks.lora" and "ss_network_args" not in plain
