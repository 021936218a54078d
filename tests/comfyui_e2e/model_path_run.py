"""Training through the MODEL path in-process, inside a ComfyUI venv, without a server: what the Python-level
adapter check (``checks_model_path_adapters.py``) and ``benchmarks/bench_model_path.py`` share.

* :func:`comfy_sd15` — the ComfyUI-loadable SD1.5 of ``tests/comfy_sd15.py`` through ComfyUI's own
  ``load_state_dict_guess_config``, with its CLIP *and* VAE (what Load Checkpoint hands the Train node).
* :func:`load_comfy_family` — the pack imported as ComfyUI imports a custom node (a package, so the nodes' relative
  imports work), with its ``trainer`` the same module as the top-level one; returns ``nodes.comfy_family``.
* :func:`train_model_path` — ``trainer.train`` on a :class:`ComfyModelFamily` around those objects, the family
  registered for the run as the Train node registers it. The adapter stays in the MODEL afterwards (the caller
  compares, then calls ``family.restore()``).
Needs ComfyUI's root and the pack on ``sys.path`` (``comfy_python.setup_comfy`` does it).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

PACKAGE = "crucible_model_path_pack"
DEMO_DATA = Path(__file__).resolve().parents[2] / "trainer" / "demo_data"


def comfy_sd15(seed: int = 0):
    """(MODEL, CLIP, VAE) of the tiny ComfyUI-detected SD1.5, float32, as Load Checkpoint returns them."""
    import torch

    import comfy.sd

    from comfy_sd15 import comfy_sd15_components
    from trainer.families.single_file import diffusers_to_single_file

    state = diffusers_to_single_file(comfy_sd15_components(seed), "sd15")
    fp32 = {"dtype": torch.float32}
    model, clip, vae, _ = comfy.sd.load_state_dict_guess_config(state, output_vae=True, output_clip=True,
                                                                model_options=fp32, te_model_options=fp32)
    if type(model.model.model_config).__name__ != "SD15" or clip is None or vae is None:
        raise AssertionError(f"ComfyUI loaded the tiny SD1.5 as {type(model.model.model_config).__name__} "
                             f"(CLIP {clip is not None}, VAE {vae is not None})")
    return model, clip, vae


def load_comfy_family(pack_dir: str | Path):
    """``<pack>.nodes.comfy_family``, the pack loaded once as a package whose ``trainer`` is the top-level one."""
    import trainer

    if PACKAGE not in sys.modules:
        init = Path(pack_dir) / "__init__.py"
        spec = importlib.util.spec_from_file_location(PACKAGE, init, submodule_search_locations=[str(pack_dir)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        sys.modules[f"{PACKAGE}.trainer"] = trainer  # one trainer: the family registered is the one train() sees
        spec.loader.exec_module(module)
    return importlib.import_module(f"{PACKAGE}.nodes.comfy_family")


def model_path_config(out: Path, *, network_type: str = "lora", steps: int = 6, rank: int = 4, alpha: float = 4.0,
                      lr: float = 3e-3, seed: int = 7, batch_size: int = 4, preset: str = "all_linear",
                      resolution: int = 64, data: Path = DEMO_DATA, **training: Any):
    """The TrainConfig of a short MODEL-path run (family ``comfy``) on ``data``; ``training`` overrides
    TrainingConfig fields, ``optim_*`` keywords OptimConfig ones."""
    from trainer.config import TrainConfig

    optim = {"learning_rate": lr, "lr_scheduler": "constant"}
    optim.update({k[len("optim_"):]: training.pop(k) for k in list(training) if k.startswith("optim_")})
    return TrainConfig.from_dict({
        "model": {"family": "comfy"},
        "datasets": [{"path": str(data), "resolution": resolution, "repeats": 1}],
        "network": {"network_type": network_type, "network_dim": rank, "network_alpha": alpha, "target_preset": preset},
        "optim": optim,
        "training": {"batch_size": batch_size, "max_train_steps": steps, "seed": seed, "mixed_precision": "no",
                     "validation_split": 0.0, "cache_latents": True, "cache_text_embeddings": True,
                     "caption_variants": 1, **training},
        "save": {"output_dir": str(out / "loras"), "work_dir": str(out / "runs"), "run_name": f"mp_{network_type}",
                 "save_every_n_epochs": 0, "save_precision": "fp32", "save_state": False},
    })


def train_model_path(comfy_family, model, clip, vae, out: Path, callbacks=None, **settings):
    """(RunResult, family): :func:`model_path_config` (``out``, ``settings``) trained on the graph's MODEL / CLIP /
    VAE; the adapter is left in the MODEL."""
    from trainer import hosted_family, train

    family = comfy_family.ComfyModelFamily(model, clip, vae)
    with hosted_family(family):  # the config names family "comfy": it is known only while registered
        result = train(model_path_config(out, **settings), callbacks)
    return result, family
