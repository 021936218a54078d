"""The MODEL-path family checks' graph surgery, without a server: *Load Checkpoint* in the CI sweep graph becomes
the family's three loaders and every link to it follows (checks_model_path_families.loaders_prompt)."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from checks_model_path_families import LOADER_IDS, loaders_prompt  # noqa: E402

LOADERS = [{"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_sd3.safetensors"}},
           {"class_type": "CLIPLoader", "inputs": {"clip_name": "clip_l.safetensors", "type": "sd3"}},
           {"class_type": "VAELoader", "inputs": {"vae_name": "sd3_vae.safetensors"}}]


def fake_ctx() -> SimpleNamespace:
    required = {"CrucibleTrainingOptions": {"seed": ["INT", {"default": 0}]},
                "UNETLoader": {"unet_name": [[]], "weight_dtype": [["default", "fp8_e4m3fn"]]},
                "CLIPLoader": {"clip_name": [[]], "type": [["stable_diffusion", "sd3"]]},
                "VAELoader": {"vae_name": [["pixel_space"]]}}
    return SimpleNamespace(pack_dir=REPO, variables={"comfy_sd15": "sd15.safetensors", "demo_data": "demo"},
                           object_info={k: {"input": {"required": v}} for k, v in required.items()})


def links(prompt: dict) -> list[tuple[str, str, list]]:
    return [(node_id, name, value) for node_id, node in prompt.items() for name, value in node["inputs"].items()
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)]


def test_load_checkpoint_is_replaced_by_the_three_loaders_and_every_link_follows():
    prompt, ids = loaders_prompt(fake_ctx(), "run", LOADERS)
    assert "CheckpointLoaderSimple" not in {n["class_type"] for n in prompt.values()}
    assert [prompt[i]["class_type"] for i in LOADER_IDS] == ["UNETLoader", "CLIPLoader", "VAELoader"]
    assert prompt[LOADER_IDS[0]]["inputs"] == {"unet_name": "tiny_sd3.safetensors", "weight_dtype": "default"}
    assert prompt[LOADER_IDS[1]]["inputs"]["type"] == "sd3"
    train = prompt[ids["CrucibleTrain"]]["inputs"]
    assert (train["comfy_model"], train["comfy_clip"], train["comfy_vae"]) == tuple([i, 0] for i in LOADER_IDS)
    sweep = prompt[ids["CrucibleCheckpointSweep"]]["inputs"]
    assert (sweep["model"], sweep["clip"]) == ([LOADER_IDS[0], 0], [LOADER_IDS[1], 0])
    assert prompt[ids["VAEDecode"]]["inputs"]["vae"] == [LOADER_IDS[2], 0]
    dangling = [(n, k, v) for n, k, v in links(prompt) if v[0] not in prompt]
    assert not dangling
    assert all(v[1] == 0 for n, k, v in links(prompt) if v[0] in LOADER_IDS)  # each loader has one output


def test_training_only_graph_keeps_just_the_loaders_and_the_train_inputs():
    prompt, ids = loaders_prompt(fake_ctx(), "run", LOADERS, resume=True, sweep=False)
    assert prompt[ids["CrucibleTrain"]]["inputs"]["resume"] is True
    kinds = {n["class_type"] for n in prompt.values()}
    assert {"KSampler", "CrucibleCheckpointSweep", "VAEDecode"}.isdisjoint(kinds)
    assert not [(n, k, v) for n, k, v in links(prompt) if v[0] not in prompt]
