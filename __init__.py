"""Crucible — train LoRAs and full fine-tunes inside ComfyUI, then see every checkpoint side by side.

ComfyUI imports this file as a package. ``trainer`` (the framework-free library) is put on ``sys.path`` so the node
modules and the headless CLI import it the same way.
"""
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.append(_here)  # after ComfyUI's own root, so its top-level "nodes" module is never shadowed

if __package__:  # ComfyUI imports the folder as a package. pytest imports this file as a plain module "__init__"
    # when the checkout's folder name is not a Python name (ComfyUI-Crucible): there are no nodes to load then.
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = "./nodes/web"  # shows the nodes' report text under them
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
