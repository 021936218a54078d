"""benchmarks/kohya_side_by_side.py without kohya: the Crucible settings -> kohya flags mapping, the inputs it writes
for kohya, the peak-RSS measurement of a fresh process, the ratio line and the record."""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_memory  # noqa: E402
import kohya_side_by_side as kohya  # noqa: E402


def _plan(case: str, precision: str = "bf16", steps: int = 1, tmp=Path("/nonexistent")):
    cfg = bench_memory.case_config(tuple(case.split("-")), 512, tmp / "data", tmp / "out", steps, False)
    return kohya.kohya_flags(cfg, precision)


def _value(flags: list, name: str) -> str:
    return flags[flags.index(name) + 1]


def test_sd15_default_maps_every_setting_to_its_kohya_flag():
    plan = _plan("sd15-lora-default")
    f = plan.flags
    assert plan.script == "train_network.py"
    assert {name: _value(f, name) for name in (
        "--network_module", "--network_dim", "--network_alpha", "--resolution", "--train_batch_size",
        "--optimizer_type", "--learning_rate", "--lr_scheduler", "--mixed_precision", "--max_train_steps",
        "--max_data_loader_n_workers", "--seed", "--optimizer_args", "--max_grad_norm")} == {
        "--network_module": "networks.lora", "--network_dim": "16", "--network_alpha": "16", "--resolution": "512",
        "--train_batch_size": "1", "--optimizer_type": "AdamW", "--learning_rate": "0.0001",
        "--lr_scheduler": "constant", "--mixed_precision": "bf16", "--max_train_steps": "1",
        "--max_data_loader_n_workers": "0", "--seed": "42", "--optimizer_args": "weight_decay=0.01",
        "--max_grad_norm": "1"}
    assert "--network_train_unet_only" in f and "--sdpa" in f
    # the SD1.5 default: no checkpointing, no caches, VAE in the mixed-precision dtype
    for absent in ("--gradient_checkpointing", "--cache_latents", "--cache_text_encoder_outputs", "--no_half_vae",
                   "--fp8_base", "--xformers"):
        assert absent not in f, absent
    assert any("proj_in/proj_out" in note for note in plan.unmatched)


def test_sd15_low_caches_latents_and_says_kohya_has_no_sd15_text_cache():
    plan = _plan("sd15-lora-low")
    assert "--gradient_checkpointing" in plan.flags and "--cache_latents" in plan.flags
    assert "--cache_text_encoder_outputs" not in plan.flags  # train_network.py has no such flag for SD1.5
    assert any(note.startswith("text cache:") for note in plan.unmatched)


def test_sdxl_uses_its_own_script_its_text_cache_fp32_vae_and_default_checkpointing():
    low = _plan("sdxl-lora-low")
    assert low.script == "sdxl_train_network.py"
    assert {"--gradient_checkpointing", "--cache_latents", "--cache_text_encoder_outputs",
            "--no_half_vae"} <= set(low.flags)
    assert not any(note.startswith("text cache:") for note in low.unmatched)
    default = _plan("sdxl-lora-default")  # checkpointing is the SDXL default ("auto"), caches are not
    assert "--gradient_checkpointing" in default.flags and "--cache_latents" not in default.flags


def test_precision_and_epochs_map_and_unmappable_configs_are_refused():
    assert _value(_plan("sd15-lora-default", precision="fp32").flags, "--mixed_precision") == "no"
    epochs = _plan("sd15-lora-default", steps=0).flags
    assert "--max_train_steps" not in epochs and _value(epochs, "--max_train_epochs") == "10"
    with pytest.raises(ValueError, match="LoRA cases"):
        kohya.kohya_flags(bench_memory.case_config(("sd3", "full", "low"), 512, Path("d"), Path("o"), 1, False),
                          "bf16")
    with pytest.raises(ValueError, match="mixed_precision"):
        _plan("sd15-lora-default", precision="fp8")


def test_kohya_argv_puts_the_script_and_paths_first(tmp_path):
    plan = _plan("sdxl-lora-low")
    argv = kohya.kohya_argv(tmp_path / "sd-scripts", "/venv/bin/python", plan, tmp_path / "m.safetensors",
                            tmp_path / "tok", tmp_path / "data", tmp_path / "out")
    assert argv[:2] == ["/venv/bin/python", str(tmp_path / "sd-scripts" / "sdxl_train_network.py")]
    assert _value(argv, "--pretrained_model_name_or_path") == str(tmp_path / "m.safetensors")
    assert _value(argv, "--tokenizer_cache_dir") == str(tmp_path / "tok")
    assert _value(argv, "--train_data_dir") == str(tmp_path / "data") and argv[-len(plan.flags):] == plan.flags


def test_inputs_are_where_kohya_and_crucible_look(tmp_path):
    from transformers import CLIPTokenizer

    kohya.kohya_tokenizers(tmp_path / "tok", "sdxl")
    kohya.crucible_tokenizers(tmp_path / "ours", "sdxl")
    first = CLIPTokenizer.from_pretrained(tmp_path / "tok" / "openai_clip-vit-large-patch14")
    second = CLIPTokenizer.from_pretrained(tmp_path / "tok" / "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k")
    assert first.model_max_length == 77 and first.pad_token == "<|endoftext|>" and second.pad_token == "!"
    assert (tmp_path / "ours" / "tokenizer_2" / "vocab.json").is_file()
    data = kohya.kohya_dataset(tmp_path / "data", 64)
    assert sorted(p.name for p in (data / "1_thing").iterdir()) == ["a.png", "a.txt"]  # one repeat


def test_peak_rss_of_a_fresh_process_sees_its_allocation(tmp_path):
    script = ("import sys, time\nblock = bytearray(300 * 2**20)\nblock[::4096] = b'x' * len(block[::4096])\n"
              "print('steps: go', flush=True)\ntime.sleep(1.0)\nsys.exit(3)\n")
    code, peak, after_marker = kohya.peak_rss_of([sys.executable, "-c", script], tmp_path, tmp_path / "log", 120,
                                                 marker="steps:")
    assert code == 3
    assert 0.29 < peak < 2.0
    assert after_marker is None or 0.29 < after_marker <= peak + 0.01
    assert "steps: go" in (tmp_path / "log").read_text()


def test_ratio_line_reads_crucible_over_kohya():
    line = kohya.ratio_line("sd15-lora-default", 6.4, 3.2)
    assert re.fullmatch(r"case=sd15-lora-default kohya_peak_gib=6\.40 crucible_peak_gib=3\.20 ratio=0\.50", line)


def test_without_kohya_nothing_runs_and_nothing_is_recorded(tmp_path):
    parser = argparse.ArgumentParser()
    kohya.add_arguments(parser)
    args = parser.parse_args(["--kohya-record", str(tmp_path / "k.json")])
    assert args.kohya is None
    kohya.finish(args, [{"case": "sd15-lora-default"}], "CPU")
    assert not (tmp_path / "k.json").exists()


def test_record_keeps_other_cases_and_names_the_kohya_commit(tmp_path):
    parser = argparse.ArgumentParser()
    kohya.add_arguments(parser)
    path = tmp_path / "k.json"
    args = parser.parse_args(["--kohya", str(tmp_path), "--kohya-python", sys.executable, "--kohya-commit", "abc123",
                              "--kohya-record", str(path)])
    kohya.finish(args, [{"case": "sd15-lora-default", "ratio": 0.6}, {"case": "sd15-lora-low", "ratio": 0.5}], "CPU")
    kohya.finish(args, [{"case": "sd15-lora-low", "ratio": 0.4}], "CPU")
    record = json.loads(path.read_text())
    assert [(r["case"], r["ratio"]) for r in record["rows"]] == [("sd15-lora-default", 0.6), ("sd15-lora-low", 0.4)]
    assert record["kohya_commit"] == "abc123" and record["rows"][1]["kohya_env"]["torch"].startswith("2.")
    assert "bitsandbytes" in record["kohya_env_notes"] and "torchvision" in record["kohya_env_notes"]
