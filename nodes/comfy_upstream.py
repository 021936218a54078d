"""What the graph did to a MODEL before it reached Crucible Train's ``comfy_model`` (issue 18), and what training does
with each kind of patch. ComfyUI keeps every patch on the ``ModelPatcher``, not in the weights:

* **Weight patches** (``patcher.patches``: LoraLoader / LoraLoaderModelOnly, model merges, …) are part of the base the
  user sees: ComfyUI applies them when it loads the MODEL for training (in place, or per forward in low-VRAM mode), so
  the adapter trains on top of them. They stay ComfyUI's: the export holds only the new adapter, and the run records
  what was underneath (:func:`upstream_of`, in run.json's ``base_patches`` and the LoRA's ``crucible_base_patches``).
* **Object patches** (``add_object_patch``: ModelSamplingDiscrete / ModelSamplingSD3 / ModelSamplingFlux replace
  ``model_sampling``) are applied too; the family reads the patched object (:func:`model_sampling_of`).
* **Sampling hooks** (``model_options``: attention replacements, block patches, ``set_model_unet_function_wrapper``,
  CFG functions; the patcher's wrappers, callbacks and hooks) belong to ComfyUI's sampler and are not part of the
  training forward (kohya trains without them too). They are named in a warning and in the record; the previews,
  rendered by ComfyUI's sampler, still use them.

Nothing here imports ComfyUI: the patcher is read through its attributes (``comfy/model_patcher.py`` of 0.8.0).
"""
from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger("crucible")


def model_sampling_of(patcher) -> Any:
    """The ``model_sampling`` the MODEL samples with: an object patch (ModelSampling* nodes) if there is one, else the
    model's own. ``patcher.model.model_sampling`` alone is the patched object only while ComfyUI has it loaded."""
    getter = getattr(patcher, "get_model_object", None)
    return getter("model_sampling") if getter is not None else patcher.model.model_sampling


def _patch_kind(patch: Any) -> str:
    """ComfyUI's name of one weight patch: an adapter's ``name`` (lora, loha, lokr, oft, …), "diff" for a plain
    weight (model merges), or the tuple's type tag."""
    name = getattr(patch, "name", None)
    if isinstance(name, str):
        return name
    if isinstance(patch, tuple) and patch:
        return "diff" if len(patch) == 1 else str(patch[0])
    return type(patch).__name__


def _number(value: Any) -> float | None:
    try:
        return round(float(value), 6)
    except (TypeError, ValueError):
        return None  # a per-key function or a tensor strength


def weight_patch_groups(patches: dict) -> list[dict[str, Any]]:
    """``patcher.patches`` (weight key → [(strength_patch, patch, strength_model, offset, function), …]) grouped by
    (kind, strength, strength_model): how many weights each group patches. One LoRA at one strength is one group."""
    groups: dict[tuple, dict[str, Any]] = {}
    for key, entries in patches.items():
        for entry in entries:
            strength, patch, strength_model = entry[0], entry[1], entry[2] if len(entry) > 2 else 1.0
            group = (_patch_kind(patch), _number(strength), _number(strength_model))
            row = groups.setdefault(group, {"kind": group[0], "strength": group[1], "strength_model": group[2],
                                            "weights": 0})
            row["weights"] += 1
    return sorted(groups.values(), key=lambda r: (r["kind"], str(r["strength"]), str(r["strength_model"])))


def sampling_hooks(patcher) -> list[str]:
    """Names of the MODEL's sampling-time hooks, which the training forward does not run (the module docstring)."""
    options = getattr(patcher, "model_options", None) or {}
    names = [name for name, value in options.items() if name != "transformer_options" and value]
    transformer = options.get("transformer_options") or {}
    for name, value in transformer.items():
        if name in ("patches", "patches_replace", "wrappers", "callbacks") and isinstance(value, dict):
            names += [f"transformer_options.{name}.{k}" for k, v in value.items() if v]
        elif value:
            names.append(f"transformer_options.{name}")
    for name in ("wrappers", "callbacks", "hook_patches", "weight_wrapper_patches"):
        value = getattr(patcher, name, None)
        if isinstance(value, dict) and any(value.values()):
            names.append(f"patcher.{name}")
    return sorted(names)


def _tensors(value: Any) -> list:
    """The tensors inside one patch (an adapter's ``weights``, a tuple's items, a module's state) in a fixed order."""
    import torch

    if torch.is_tensor(value):
        return [value]
    if isinstance(value, torch.nn.Module):
        return [t for _, t in sorted(value.state_dict().items())]
    if hasattr(value, "weights"):
        value = value.weights
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


def patches_digest(patches: dict, objects: dict) -> str:
    """A digest of the weight patches (keys, strengths, every patch tensor's bytes) and the object patches (class,
    ``shift``, tensors): the base a run trained on, compared when it resumes (trainer.state)."""
    import hashlib

    import torch

    digest = hashlib.blake2b(digest_size=8)
    for key in sorted(patches):
        for entry in patches[key]:
            digest.update(f"{key}|{_number(entry[0])}|{_number(entry[2] if len(entry) > 2 else 1.0)}|"
                          f"{_patch_kind(entry[1])}".encode())
            for tensor in _tensors(entry[1]):
                digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for name in sorted(objects):
        obj = objects[name]
        digest.update(f"{name}|{type(obj).__name__}|{getattr(obj, 'shift', '')}".encode())
        for tensor in _tensors(obj) if isinstance(obj, torch.nn.Module) else []:
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def upstream_of(patcher) -> dict[str, Any]:
    """What was applied to the MODEL upstream of Crucible Train (empty when nothing): the weight patch groups and the
    number of patched weights, the object patches by name, the sampling hooks training does not apply, and a digest
    of the patches (a resumed run must train on the same base)."""
    patches = getattr(patcher, "patches", None) or {}
    objects = getattr(patcher, "object_patches", None) or {}
    record: dict[str, Any] = {}
    if patches:
        record["patched_weights"] = len(patches)
        record["weight_patches"] = weight_patch_groups(patches)
    if objects:
        record["object_patches"] = sorted(objects)
    if patches or objects:
        record["digest"] = patches_digest(patches, objects)
    hooks = sampling_hooks(patcher)
    if hooks:
        record["not_in_training"] = hooks
    return record


def describe(record: dict[str, Any]) -> list[str]:
    """Log lines for :func:`upstream_of`'s record (none when nothing was applied upstream)."""
    lines = []
    for group in record.get("weight_patches", []):
        lines.append(f"training on top of an upstream {group['kind']} patch (strength {group['strength']}, "
                     f"model strength {group['strength_model']}) on {group['weights']} weights; the exported "
                     "adapter holds only what this run trains")
    if record.get("object_patches"):
        lines.append(f"the MODEL's object patches apply while training: {', '.join(record['object_patches'])}")
    if record.get("not_in_training"):
        lines.append("these sampling-time patches of the MODEL are not applied in the training forward (previews "
                     f"still use them): {', '.join(record['not_in_training'])}")
    return lines


def patch_state(patcher) -> dict[str, Any]:
    """The MODEL's patch state by identity (weight patches per key, object patches, model_options' keys), compared
    before and after a run: training adds nothing to the user's MODEL and removes nothing from it."""
    patches = getattr(patcher, "patches", None) or {}
    options = getattr(patcher, "model_options", None) or {}
    return {"patches": {k: [id(e[1]) for e in v] for k, v in patches.items()},
            "object_patches": {k: id(v) for k, v in (getattr(patcher, "object_patches", None) or {}).items()},
            "model_options": sorted(options), "transformer_options": sorted(options.get("transformer_options") or {})}


def warn_upstream(record: dict[str, Any]) -> None:
    for line in describe(record):
        log.warning("Crucible Train (comfy_model): %s", line)


def ddpm_scheduler(sigmas: torch.Tensor, prediction: str):
    """A DDPMScheduler whose ᾱ are the model's own (ᾱ = 1/(1+σ²)), so t ↔ σ is ComfyUI's table."""
    from diffusers import DDPMScheduler

    alphas_cumprod = 1.0 / (1.0 + sigmas.double() ** 2)
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    betas = (1.0 - alphas_cumprod / previous).clamp(0.0, 0.999999)
    return DDPMScheduler(num_train_timesteps=len(sigmas), trained_betas=betas.tolist(), prediction_type=prediction)
