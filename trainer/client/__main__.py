"""``python -m trainer.client``: see :mod:`trainer.client.cli`."""
import sys

from .cli import main

sys.exit(main())
