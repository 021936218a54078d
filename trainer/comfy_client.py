"""``python -m trainer.comfy_client``: the older name of ``python -m trainer.client`` (README, scripts and the
shipped workflows' notes use it). The ComfyUI client itself is the :mod:`trainer.client` package."""
import sys

from .client.cli import main

if __name__ == "__main__":
    sys.exit(main())
