"""``python -m trainer.comfy_client``: the older name of ``python -m trainer.client`` (README, scripts and the
shipped workflows' notes use it). The ComfyUI client itself is the :mod:`trainer.client` package; its names are
importable from here too, so older scripts keep working."""
import sys

from .client import *  # noqa: F401,F403 - the older import path
from .client import __all__  # noqa: F401
from .client.cli import main

if __name__ == "__main__":
    sys.exit(main())
