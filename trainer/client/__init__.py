"""A small client for a running ComfyUI server: queue API-format workflows, follow them, fetch their images.

Its main job is the checkpoint sweep: run one workflow once per saved checkpoint (patching the loader node's file
name) and compose the results into one labelled strip::

    python -m trainer.client sweep --server 127.0.0.1:8188 --workflow workflows/api/sd15_lora.json \\
        --checkpoints ComfyUI/models/loras/myrun --name-prefix myrun/ --out strip.png

(``python -m trainer.comfy_client`` is the same command under its older name.)

Only the standard library is needed to talk to ComfyUI. Progress is followed over ComfyUI's websocket when the
optional ``websocket-client`` package is installed (``pip install websocket-client``); otherwise, or when the socket
fails, ``/history/<prompt_id>`` is polled. Every wait has a deadline, so nothing hangs. Checkpoints are the run
record's :class:`~trainer.run_record.CheckpointRecord` (step and validation loss from the files' metadata).

ComfyUI endpoints used: ``POST /prompt``, ``GET /history/<id>``, ``GET /view``, ``GET /ws?clientId=<id>``.

Modules: :mod:`.server` (HTTP, queue, waiting), :mod:`.websocket` (messages, connection), :mod:`.workflow` (reading
and patching workflows), :mod:`.sweep` (the sweep and its strip), :mod:`.cli` (the command line).
"""
from __future__ import annotations

from ..run_record import CheckpointRecord, checkpoint_step, checkpoint_val_loss, list_checkpoints, \
    read_safetensors_metadata
from .cli import build_parser, main
from .errors import (ComfyConnectionError, ComfyError, ComfyTimeoutError, ExecutionFailedError, PromptRejectedError,
                     WorkflowError)
from .server import DEFAULT_SERVER, ComfyClient, parse_server
from .sweep import SweepResult, compose_sweep, run_sweep
from .websocket import WsEvent, parse_ws_message
from .workflow import (DEFAULT_LOADER_TITLE, LOADER_INPUTS, LoaderRef, find_loader, load_workflow,
                       positive_text_nodes, prepare_workflow, seed_nodes, validate_workflow)

Checkpoint = CheckpointRecord  # the client's name for a checkpoint: the run record's entry

__all__ = ["Checkpoint", "CheckpointRecord", "ComfyClient", "ComfyConnectionError", "ComfyError", "ComfyTimeoutError",
           "DEFAULT_LOADER_TITLE", "DEFAULT_SERVER", "ExecutionFailedError", "LOADER_INPUTS", "LoaderRef",
           "PromptRejectedError", "SweepResult", "WorkflowError", "WsEvent", "build_parser", "checkpoint_step",
           "checkpoint_val_loss", "compose_sweep", "find_loader", "list_checkpoints", "load_workflow", "main",
           "parse_server", "parse_ws_message", "positive_text_nodes", "prepare_workflow", "read_safetensors_metadata",
           "run_sweep", "seed_nodes", "validate_workflow"]
