"""API-format workflows: reading and checking them, finding the loader node a sweep patches, and replacing the
positive prompt text and the sampler seed."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..run_record import natural_key
from .errors import WorkflowError

DEFAULT_LOADER_TITLE = "Crucible checkpoint"
# Which input of a stock loader node holds the file name.
LOADER_INPUTS = {
    "LoraLoader": "lora_name",
    "LoraLoaderModelOnly": "lora_name",
    "UNETLoader": "unet_name",
    "CheckpointLoaderSimple": "ckpt_name",
}
# Where a sampler takes its positive conditioning, and where it takes its seed.
POSITIVE_INPUTS = {"KSampler": "positive", "KSamplerAdvanced": "positive", "SamplerCustom": "positive",
                   "CFGGuider": "positive", "BasicGuider": "conditioning", "DualCFGGuider": "cond1"}
SEED_INPUTS = {"KSampler": "seed", "KSamplerAdvanced": "noise_seed", "SamplerCustom": "noise_seed",
               "RandomNoise": "noise_seed"}
# Prompt-text inputs of the stock text encoders (CLIPTextEncode, …SDXL, …SD3, …Flux).
TEXT_INPUTS = ("text", "text_g", "text_l", "clip_l", "clip_g", "t5xxl")


def load_workflow(path: str | Path) -> dict:
    """Read an API-format workflow (``{node_id: {class_type, inputs, _meta}}``) from a JSON file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise WorkflowError(f"cannot read workflow '{path}': {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise WorkflowError(f"workflow '{path}' is not valid JSON: {exc}") from exc
    return validate_workflow(data, source=str(path))


def validate_workflow(workflow: Any, source: str = "workflow") -> dict:
    """Check ``workflow`` is API format; a UI-format file gets a message saying how to export the right one."""
    if isinstance(workflow, dict) and "prompt" in workflow and isinstance(workflow["prompt"], dict) \
            and "class_type" not in workflow["prompt"]:
        workflow = workflow["prompt"]  # a saved /prompt request body
    if isinstance(workflow, dict) and "nodes" in workflow and "links" in workflow:
        raise WorkflowError(f"{source} is a UI-format workflow; export it with 'Save (API)' "
                            "(enable dev mode options in older ComfyUI) and pass that file")
    if not isinstance(workflow, dict) or not workflow:
        raise WorkflowError(f"{source} is not an API-format workflow: expected a JSON object of nodes")
    for node_id, node in workflow.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str) \
                or not isinstance(node.get("inputs", {}), dict):
            raise WorkflowError(f"{source}: node {node_id!r} has no class_type/inputs; "
                                "is this an API-format export ('Save (API)')?")
    return workflow


def _title(node: Mapping) -> str:
    meta = node.get("_meta")
    return str(meta.get("title", "")) if isinstance(meta, dict) else ""


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


@dataclass(frozen=True)
class LoaderRef:
    """The loader node the sweep patches: node id, input name and how it was found (for messages)."""

    node_id: str
    input_name: str
    class_type: str
    found_by: str


def find_loader(workflow: Mapping[str, Any], *, title: str | None = None, class_type: str | None = None,
                input_name: str | None = None) -> LoaderRef:
    """Find the one node whose file-name input the sweep patches, by ``_meta.title`` or by ``class_type``.

    With neither given, the title ``"Crucible checkpoint"`` is tried first, then the stock loader classes
    (:data:`LOADER_INPUTS`). The input defaults to the class's file-name input (``lora_name`` for LoraLoader, …).
    Never matches by node id, so re-exported workflows keep working.
    """
    if title and class_type:
        raise WorkflowError("give either a loader title or a loader class, not both")
    if title:
        matches, how = [k for k, n in workflow.items() if _title(n) == title], f"title {title!r}"
    elif class_type:
        matches, how = [k for k, n in workflow.items() if n["class_type"] == class_type], f"class {class_type!r}"
    else:
        matches, how = [k for k, n in workflow.items() if _title(n) == DEFAULT_LOADER_TITLE], \
            f"title {DEFAULT_LOADER_TITLE!r}"
        if not matches:
            matches = [k for k, n in workflow.items() if n["class_type"] in LOADER_INPUTS]
            how = "a loader class (" + ", ".join(LOADER_INPUTS) + ")"
    if not matches:
        raise WorkflowError(f"no node with {how} in the workflow; set the loader node's title to "
                            f"'{DEFAULT_LOADER_TITLE}' or pass --loader-title / --loader-class")
    if len(matches) > 1:
        found = ", ".join(f"{k} ({workflow[k]['class_type']} '{_title(workflow[k])}')" for k in matches)
        raise WorkflowError(f"{len(matches)} nodes match {how}: {found}; give the one to patch a unique title "
                            "and pass it with --loader-title")
    node_id = matches[0]
    node = workflow[node_id]
    name = input_name or LOADER_INPUTS.get(node["class_type"])
    if name is None:
        raise WorkflowError(f"node {node_id} is a {node['class_type']}, whose file-name input is not known; "
                            "pass --input-name")
    inputs = node.get("inputs", {})
    if name not in inputs:
        raise WorkflowError(f"node {node_id} ({node['class_type']}) has no input '{name}' "
                            f"(it has: {', '.join(inputs) or 'none'}); pass the right --input-name")
    if _is_link(inputs[name]):
        raise WorkflowError(f"input '{name}' of node {node_id} is connected to another node; "
                            "make it a plain widget value so it can be patched")
    return LoaderRef(node_id, name, node["class_type"], how)


def positive_text_nodes(workflow: Mapping[str, Any]) -> list[str]:
    """Ids of the text-encoder nodes wired (possibly through conditioning nodes) to a sampler's positive input."""
    queue = [node["inputs"][name][0] for node in workflow.values()
             if (name := POSITIVE_INPUTS.get(node["class_type"])) and _is_link(node.get("inputs", {}).get(name))]
    found, seen = [], set()
    while queue:
        node_id = queue.pop(0)
        if node_id in seen or node_id not in workflow:
            continue
        seen.add(node_id)
        inputs = workflow[node_id].get("inputs", {})
        if any(isinstance(inputs.get(key), str) for key in TEXT_INPUTS):
            found.append(node_id)
            continue
        queue += [value[0] for key, value in inputs.items() if _is_link(value) and
                  ("cond" in key or key == "positive")]
    return sorted(found, key=natural_key)


def seed_nodes(workflow: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(node_id, input_name)`` of every sampler/noise seed widget."""
    return [(k, name) for k, node in sorted(workflow.items(), key=lambda kv: natural_key(kv[0]))
            if (name := SEED_INPUTS.get(node["class_type"])) and isinstance(node.get("inputs", {}).get(name), int)]


def prepare_workflow(workflow: Mapping[str, Any], *, prompt_text: str | None = None,
                     seed: int | None = None) -> dict:
    """A copy of ``workflow`` with the positive prompt text and/or the sampler seed replaced."""
    patched = copy.deepcopy(dict(workflow))
    if prompt_text is not None:
        encoders = positive_text_nodes(patched)
        if not encoders:
            raise WorkflowError("--prompt was given but no text encoder (CLIPTextEncode…) is wired to a sampler's "
                                "positive input; edit the prompt in the workflow instead")
        for node_id in encoders:
            inputs = patched[node_id]["inputs"]
            for key in TEXT_INPUTS:
                if isinstance(inputs.get(key), str):
                    inputs[key] = prompt_text
    if seed is not None:
        targets = seed_nodes(patched)
        if not targets:
            raise WorkflowError("--seed was given but the workflow has no KSampler/RandomNoise seed widget")
        for node_id, name in targets:
            patched[node_id]["inputs"][name] = int(seed)
    return patched
