"""The graph ``checks_model_path_new_families.py`` sends to the real server, checked without one: Load Checkpoint is
replaced by Load Diffusion Model / Load CLIP / Load VAE everywhere, with the files the builder writes."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import checks_model_path_new_families as check  # noqa: E402
from comfy_new_families import CLIP_FILE, FAMILIES, VAE_FILE  # noqa: E402


def links(prompt: dict):
    for node_id, node in prompt.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                yield node_id, name, value


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_the_graph_loads_the_built_files_through_the_three_stock_loaders(family, comfyui_reference):
    ctx = SimpleNamespace(pack_dir=HERE.parents[1], variables={"demo_data": "crucible_demo"},
                          object_info={"CrucibleTrainingOptions": {"input": {"required": {}}}})
    prompt, ids = check.family_prompt(ctx, family, "run")
    classes = {n["class_type"] for n in prompt.values()}
    assert "CheckpointLoaderSimple" not in classes and "CrucibleModel" not in classes
    assert all(target in prompt for _, _, (target, _) in links(prompt))  # no link to a removed node
    source = {(node_id, name): prompt[target]["class_type"] for node_id, name, (target, _) in links(prompt)}
    train, sweep = ids["CrucibleTrain"], ids["CrucibleCheckpointSweep"]
    assert (source[train, "comfy_model"], source[train, "comfy_clip"], source[train, "comfy_vae"]) == \
        ("UNETLoader", "CLIPLoader", "VAELoader")
    assert (source[sweep, "model"], source[sweep, "clip"], source[ids["VAEDecode"], "vae"]) == \
        ("UNETLoader", "CLIPLoader", "VAELoader")
    assert "model" not in prompt[train]["inputs"]
    assert prompt[ids["UNETLoader"]]["inputs"]["unet_name"] == family.unet_file
    assert prompt[ids["CLIPLoader"]]["inputs"] == {"clip_name": CLIP_FILE, "type": "stable_diffusion"}
    assert prompt[ids["VAELoader"]]["inputs"]["vae_name"] == VAE_FILE
    reference = comfyui_reference.object_info()
    for cls in ("UNETLoader", "VAELoader"):  # every required widget of ComfyUI 0.8.0's loader is given, no other
        assert set(prompt[ids[cls]]["inputs"]) == set(reference[cls]["input"]["required"])
    assert prompt[train]["inputs"]["max_train_steps"] == check.STEPS
