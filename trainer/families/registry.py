"""The names of the model families, in the order menus show them: the one list of families.

Each name is ``trainer/families/<name>.py`` defining ``FAMILY``. A leaf module (it imports nothing), so
:mod:`trainer.config` can offer the choices without importing a family or the family interface, which itself refers to
the config (no import cycle).
"""
FAMILY_NAMES: tuple[str, ...] = ("sd15", "sdxl", "sd3", "flux")
