"""ComfyUI node adapters over the ``trainer`` package. Each module exports NODES and NAMES."""
from __future__ import annotations

import logging

from . import _sockets

log = logging.getLogger("crucible")

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

for _module in ("dataset_nodes", "train_nodes", "sweep_nodes", "image_nodes", "tagging_nodes"):
    try:
        _mod = __import__(f"{__name__}.{_module}", fromlist=["NODES", "NAMES"])
    except Exception as exc:  # noqa: BLE001 - one broken module must not hide the others
        log.error("Crucible: could not load nodes/%s.py: %s", _module, exc)
        continue
    for _id, _cls in _mod.NODES.items():  # every node checks its inputs first (nodes/_sockets.py)
        _sockets.guard(_cls, _mod.NAMES.get(_id, _id))
    NODE_CLASS_MAPPINGS.update(_mod.NODES)
    NODE_DISPLAY_NAME_MAPPINGS.update(_mod.NAMES)
