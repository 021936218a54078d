"""Crucible — train LoRAs and full fine-tunes inside ComfyUI, then see every checkpoint side by side.

ComfyUI imports this folder as a package (``nodes.load_custom_node``). The nodes reach the library ``trainer/`` by
relative imports from this package (``from ..trainer import …``), never through ``sys.path``: a ``trainer`` package
installed from PyPI (coqui-tts ships one) cannot shadow it. ``python -m trainer`` runs the same library headless
from the repository root.
"""

if __package__:  # ComfyUI imports the folder as a package. pytest imports this file as a plain module "__init__"
    # when the checkout's folder name is not a Python name (ComfyUI-Crucible): there are no nodes to load then.
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./nodes/web"  # shows the nodes' report text under them
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
