"""Crucible trainer: a plain Python package (no ComfyUI imports) that trains LoRAs and full fine-tunes of
diffusion models, exports ComfyUI-loadable checkpoints, and renders checkpoint sweeps.

Heavy libraries (torch, diffusers, peft) are imported lazily inside the functions that need them, so importing
``trainer`` is cheap and never fails because an optional package is missing.
"""
__version__ = "0.1.0"
