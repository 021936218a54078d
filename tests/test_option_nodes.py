"""The option nodes (nodes/options.py) derive their widgets from the config dataclasses.

``tests/data/option_node_widgets.json`` is what these nodes offered before their ``INPUT_TYPES`` were derived
(written by hand then): every widget's name, position, type, default and range. Saved workflows address widgets by
position, so each must stay exactly as it was; new widgets may only be appended.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import comfy_stubs

SNAPSHOT = json.loads((Path(__file__).parent / "data" / "option_node_widgets.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    _stub, restore = comfy_stubs.install(tmp_path_factory.mktemp("comfyui"))
    yield comfy_stubs.load_pack()
    restore()


def _widgets(cls) -> dict[str, list]:
    spec = cls.INPUT_TYPES()
    return {section: [[name, {k: v for k, v in options.items() if k != "tooltip"} | {"type": kind}]
                      for name, (kind, options) in spec.get(section, {}).items()]
            for section in ("required", "optional") if section in spec}


def widget_drift(before: dict, now: dict) -> list[str]:
    """Widgets of ``before`` that moved or changed in ``now`` (widgets appended after them are fine)."""
    problems = []
    for section, widgets in before.items():
        current = now.get(section, [])
        for position, (name, spec) in enumerate(widgets):
            if position >= len(current) or current[position][0] != name:
                problems.append(f"{section}[{position}] was {name!r}, now "
                                f"{current[position][0] if position < len(current) else 'missing'!r}")
            elif current[position][1] != spec:
                problems.append(f"{section}.{name}: was {spec}, now {current[position][1]}")
    return problems


@pytest.mark.parametrize("node_id", sorted(SNAPSHOT))
def test_option_node_widgets_are_unchanged(pack, node_id):
    problems = widget_drift(SNAPSHOT[node_id], _widgets(pack.NODE_CLASS_MAPPINGS[node_id]))
    assert not problems, f"{node_id}: " + "; ".join(problems)


def test_widget_drift_is_detected():
    before = {"required": [["a", {"default": 1, "type": "INT"}], ["b", {"default": "", "type": "STRING"}]]}
    assert widget_drift(before, {"required": before["required"] + [["c", {"default": 0, "type": "INT"}]]}) == []
    assert widget_drift(before, {"required": before["required"][::-1]})  # moved
    assert widget_drift(before, {"required": [["a", {"default": 2, "type": "INT"}], before["required"][1]]})


@pytest.mark.parametrize("node_id", sorted(SNAPSHOT))
def test_option_node_defaults_build_the_config_defaults(pack, node_id):
    """A fresh node (every widget at its default) returns the config section's defaults."""
    cls = pack.NODE_CLASS_MAPPINGS[node_id]
    (built,) = comfy_stubs.run_node(pack.NODE_CLASS_MAPPINGS, node_id)
    expected = cls.CONFIG()
    if node_id == "CrucibleTrainingOptions":  # the toggles off + "family default" are the fields' None
        assert built.gradient_checkpointing is None
        assert built.cache_latents is None and built.cache_text_embeddings is None
    assert dataclasses.asdict(built) == dataclasses.asdict(expected)


def test_option_nodes_share_the_base(pack):
    from importlib import import_module

    options = import_module(f"{comfy_stubs.PACK_NAME}.nodes.options")
    assert all(issubclass(pack.NODE_CLASS_MAPPINGS[n], options.OptionNode) for n in SNAPSHOT)
