"""A LoRA with the denoiser sharded (FSDP2, 2 CPU processes, gloo, ``tests/fsdp_cpu_shim.py``) for the families the
SD1.5 tests of ``tests/test_multi_gpu_recipe.py`` leave out, each from the files a ComfyUI user has: SDXL from its
single-file checkpoint, SD3 from its split diffusion-model, text-encoder and VAE files. Then a full fine-tune of SDXL,
SD3 and Flux sharded (FSDP2) and under DeepSpeed ZeRO-2 (``tests/deepspeed_cpu_shim.py``), each against DDP.

Both runs fill the latent and text caches first, each rank its share, then release the encoders and read the
denoiser (the order of ``trainer/run_setup.py``), so this is also the sharded run with caches. Each sharded run
trains as the same launch unsharded (DDP) does: the same losses and validation loss, the same LoRA file (every key,
each tensor within float noise) and a resumable state that holds the adapters alone, whole."""
from __future__ import annotations

from pathlib import Path

import pytest

from test_multi_gpu_recipe import _checkpoint, _lora_config, _run_record, _unsharded_and_sharded

TOLERANCE = 1e-5


def _model(name: str, request) -> dict:
    from trainer.tiny import single_file_path

    tiny = request.getfixturevalue(f"tiny_{name}")
    if name == "sdxl":
        return {"family": "sdxl", "path": str(single_file_path(tiny))}
    return {"family": name, "path": str(tiny.transformer_file), "vae_path": str(tiny.vae_file),
            "text_encoder_paths": [str(p) for p in tiny.text_encoder_files]}


@pytest.fixture(scope="module", params=["sdxl", "sd3"])
def family_runs(request, tiny_sd15, demo_dataset, tmp_path_factory) -> tuple[str, Path, Path]:
    """(family, unsharded run folder, sharded run folder) of a cached LoRA run from the family's files."""
    name = request.param
    model = _model(name, request)

    def config(out: Path) -> dict:
        cfg = _lora_config(tiny_sd15, demo_dataset, out)
        cfg["model"] = model
        cfg["training"].update(cache_latents=True, cache_text_embeddings=True)
        return cfg

    unsharded, sharded = _unsharded_and_sharded(config, tmp_path_factory, name)
    return name, unsharded, sharded


@pytest.mark.slow
def test_fsdp2_lora_of_each_family_trains_and_saves_the_unsharded_runs_lora(family_runs):
    import torch

    name, unsharded, sharded = family_runs
    record, reference = _run_record(sharded), _run_record(unsharded)
    assert record["status"] == "finished" and len(record["losses"]) == 2, record
    assert record["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    assert record["checkpoints"][0]["val_loss"] == pytest.approx(reference["checkpoints"][0]["val_loss"], rel=1e-5)
    state, want = _checkpoint(sharded, 2), _checkpoint(unsharded, 2)
    prefix, up = ("lora_unet_", "lora_up.weight") if name == "sdxl" else ("transformer.", "lora_B.weight")
    assert state.keys() == want.keys() and all(k.startswith(prefix) for k in state), sorted(state)[:4]
    assert any(k.endswith(up) for k in state)
    off = {k: float((state[k].float() - want[k].float()).abs().max()) for k in state}
    assert max(off.values()) <= TOLERANCE, sorted(off.items(), key=lambda kv: -kv[1])[:3]
    moved = max(float(want[k].float().abs().max()) for k in want if k.endswith(up))
    assert moved > 10 * TOLERANCE, moved  # peft starts the up factor at zero: the comparison is finer than one step
    blob = torch.load(sharded / "state" / "state.pt", map_location="cpu", weights_only=True)
    reference_blob = torch.load(unsharded / "state" / "state.pt", map_location="cpu", weights_only=True)
    adapters, reference_adapters = (next(iter(b["network"].values())) for b in (blob, reference_blob))
    assert adapters and not any(k.endswith("base_layer.weight") for k in adapters)
    # whole tensors, not one rank's shards: the unsharded state's shapes (it names them without peft's adapter name)
    shapes = {k.replace(".default.", "."): tuple(t.shape) for k, t in adapters.items()}
    assert shapes == {k: tuple(t.shape) for k, t in reference_adapters.items()}


@pytest.fixture(scope="module", params=["sdxl", "sd3", "flux"])
def full_finetune_runs(request, tiny_sd15, demo_dataset, tmp_path_factory) -> tuple[str, dict[str, Path]]:
    """(family, {launch: run folder}) of a cached full fine-tune from the family's files, launched as data parallel
    (DDP), sharded (FSDP2) and, where DeepSpeed is installed, under ZeRO-2."""
    import importlib.util

    from test_deepspeed_zero2 import _zero2_launch
    from test_multi_gpu_recipe import _full_finetune_config, _launch
    from test_multiprocess import assert_ranks_agree

    name = request.param
    runs = {}
    launches = ["ddp", "fsdp2"] + (["zero2"] if importlib.util.find_spec("deepspeed") else [])
    for launch in launches:
        folder = tmp_path_factory.mktemp(f"{name}-full-{launch}")
        cfg = _full_finetune_config(tiny_sd15, demo_dataset, folder / "out")
        cfg["model"] = _model(name, request)
        cfg["training"].update(cache_latents=True, cache_text_embeddings=True)
        cfg["sample"]["sample_every_n_steps"] = 0
        output = _zero2_launch(folder, cfg) if launch == "zero2" else _launch(folder, cfg, launch == "fsdp2")
        assert_ranks_agree(output)
        runs[launch] = folder / "out" / "fsdp"
    return name, runs


@pytest.mark.slow
def test_a_full_finetune_of_each_family_trains_alike_sharded_and_under_zero2(full_finetune_runs, request):
    """SDXL (single file), SD3 and Flux (split files) full fine-tunes: FSDP2 (weights split) and ZeRO-2 (optimizer split)
    train what data parallelism trains: the same losses and validation loss, a checkpoint of the whole denoiser
    within 1% of what training changed."""
    import torch

    name, runs = full_finetune_runs
    reference = _run_record(runs["ddp"])
    base = _denoiser_weights(name, request)
    want = _checkpoint(runs["ddp"], 2)
    assert want.keys() == base.keys(), sorted(set(want) ^ set(base))[:4]
    update = torch.sqrt(sum(((want[k].float() - base[k].float()) ** 2).sum() for k in want))
    assert update > 0
    for launch in [n for n in runs if n != "ddp"]:
        record = _run_record(runs[launch])
        assert record["status"] == "finished" and len(record["losses"]) == 2, (launch, record)
        assert record["losses"] == pytest.approx(reference["losses"], rel=1e-5), launch
        assert record["checkpoints"][0]["val_loss"] == pytest.approx(reference["checkpoints"][0]["val_loss"],
                                                                     rel=1e-5), launch
        state = _checkpoint(runs[launch], 2)
        assert state.keys() == want.keys(), launch
        difference = torch.sqrt(sum(((state[k].float() - want[k].float()) ** 2).sum() for k in state))
        assert difference <= 0.01 * update, (launch, float(difference), float(update))


def _denoiser_weights(name: str, request) -> dict:
    """The denoiser the run started from, keyed as its full fine-tune's checkpoint is."""
    from trainer.families import get_family
    from trainer.config import ModelConfig

    model = _model(name, request)
    comps = get_family(name).load(ModelConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                 for k, v in model.items()}), device="cpu")
    return comps.denoiser.state_dict()
