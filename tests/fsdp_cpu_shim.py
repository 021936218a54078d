"""Test shim: ``python -m trainer`` with accelerate's FSDP switched on for CPU (gloo) processes.

accelerate 1.16 turns ``distributed_type: FSDP`` on only for GPU-like devices; on CPU processes it silently runs
DDP (``MULTI_CPU``). torch's FSDP2 (``fully_shard``) itself works on the CPU with gloo, so this shim sets the
accelerator state to FSDP after accelerate built it, and the trainer then runs with its denoiser really sharded
(``tests/test_multi_gpu_recipe.py``). Launch: ``accelerate launch --config_file <fsdp yaml> -m fsdp_cpu_shim ...``
with ``tests/`` on ``PYTHONPATH``. Nothing in ``trainer/`` imports it.

``CRUCIBLE_TEST_CANCEL_AT_STEP=N`` presses Cancel on rank 0 once step N has run (the ComfyUI node's Cancel: only
the main process's callbacks are asked), to check that every rank stops there together.
"""
from __future__ import annotations

import os
import runpy
import sys


def enable_fsdp_on_cpu() -> None:
    import accelerate.state as state
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    original = state.AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        wanted = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        if wanted and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()
            print(f"fsdp_cpu_shim: FSDP version {self.fsdp_plugin.fsdp_version} on CPU rank {self.process_index}",
                  flush=True)

    state.AcceleratorState.__init__ = init


def cancel_on_rank0_at(step: int) -> None:
    from trainer.callbacks import MultiCallbacks

    on_step = MultiCallbacks.on_step

    def record(self, info):
        self.last_step = info.step
        on_step(self, info)

    MultiCallbacks.on_step = record
    MultiCallbacks.should_stop = lambda self: getattr(self, "last_step", 0) >= step


if __name__ == "__main__":
    enable_fsdp_on_cpu()
    if os.environ.get("CRUCIBLE_TEST_CANCEL_AT_STEP"):
        cancel_on_rank0_at(int(os.environ["CRUCIBLE_TEST_CANCEL_AT_STEP"]))
    sys.argv = ["trainer", *sys.argv[1:]]
    runpy.run_module("trainer", run_name="__main__", alter_sys=True)
