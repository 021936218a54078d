"""The client's errors: ComfyUI refused, failed or did not answer, or the workflow file cannot be used."""
from __future__ import annotations

import json
from typing import Any, Mapping

from ..errors import CrucibleError


class ComfyError(CrucibleError):
    """ComfyUI refused, failed or did not answer."""


class ComfyConnectionError(ComfyError):
    """The server could not be reached."""


class ComfyTimeoutError(ComfyError, TimeoutError):
    """A prompt (or the whole sweep) did not finish within its time limit."""


class PromptRejectedError(ComfyError):
    """``POST /prompt`` answered HTTP 400; ``error`` and ``node_errors`` are ComfyUI's own, unchanged."""

    def __init__(self, error: Any, node_errors: Any):
        self.error, self.node_errors = error, node_errors
        super().__init__("ComfyUI rejected the workflow (HTTP 400).\n"
                         f"error: {json.dumps(error, ensure_ascii=False)}\n"
                         f"node_errors: {json.dumps(node_errors, ensure_ascii=False)}\n"
                         "Fix the inputs named above; a 'not in list' file name usually means the checkpoint is not "
                         "in ComfyUI's models folder or --name-prefix is wrong")


class ExecutionFailedError(ComfyError):
    """A node raised while ComfyUI ran the prompt; ``details`` is ComfyUI's ``execution_error`` message."""

    def __init__(self, prompt_id: str, details: Mapping[str, Any]):
        self.prompt_id, self.details = prompt_id, dict(details)
        node = f"node {details.get('node_id', '?')} ({details.get('node_type', '?')})"
        reason = details.get("exception_message") or "interrupted"
        super().__init__(f"ComfyUI failed to run prompt {prompt_id} at {node}: {str(reason).strip()}. "
                         "See the ComfyUI console for the traceback")


class WorkflowError(CrucibleError):
    """The workflow file cannot be used as asked (wrong format, loader node not found, …)."""
