"""Test shim: ``python -m trainer`` with accelerate's DeepSpeed switched on for CPU (gloo) processes.

accelerate 1.16 hands a model to DeepSpeed only on GPU-like devices (``Accelerator(cpu=True)`` skips it); on CPU
processes a ``distributed_type: DEEPSPEED`` config file silently runs DDP. DeepSpeed itself runs on the CPU (its CPU
accelerator, gloo), so this shim sets the accelerator state to DeepSpeed once accelerate built it, with the plugin
accelerate read from the launch's config file; ``prepare()`` then builds a real ``DeepSpeedEngine`` with its ZeRO-2
optimizer (``tests/test_deepspeed_zero2.py``). Launch: ``accelerate launch --config_file <deepspeed yaml> -m
deepspeed_cpu_shim ...`` with ``tests/`` on ``PYTHONPATH``. Nothing in ``trainer/`` imports it.

Each rank reports its weight bytes around ``prepare()`` and its peak RSS as ``tests/fsdp_cpu_shim.py`` does (ZeRO-2
keeps the weights whole: both figures are the whole module's), for ``benchmarks/bench_fsdp_memory.py``.

``CRUCIBLE_TEST_CANCEL_AT_STEP=N`` presses Cancel on rank 0 once step N has run, as ``tests/fsdp_cpu_shim.py`` does.
"""
from __future__ import annotations

import os
import runpy
import sys


def enable_deepspeed_on_cpu() -> None:
    import accelerate
    import accelerate.state as state
    from accelerate.utils import DistributedType

    original = state.AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        wanted = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        plugin = kwargs.get("deepspeed_plugin") or getattr(self, "deepspeed_plugins", None)
        if not (wanted and plugin is not None and self.distributed_type == DistributedType.MULTI_CPU):
            return
        self.distributed_type = DistributedType.DEEPSPEED
        if getattr(self, "deepspeed_plugins", None) is plugin:
            return  # a later AcceleratorState() without the CPU switch (DeepSpeed's engine makes one)
        plugin.set_mixed_precision(self._mixed_precision)
        plugin.select(_from_accelerator_state=True)
        self.deepspeed_plugins = plugin
        print(f"deepspeed_cpu_shim: DeepSpeed ZeRO stage {plugin.zero_stage} on CPU rank {self.process_index}",
              flush=True)

    state.AcceleratorState.__init__ = init

    prepare = accelerate.Accelerator.prepare

    def report_engine(self, *args, **kwargs):
        out = prepare(self, *args, **kwargs)
        engines = [type(o).__name__ for o in out if type(o).__name__ == "DeepSpeedEngine"]
        optimizer = type(getattr(out[-1], "optimizer", out[-1])).__name__
        print(f"deepspeed_cpu_shim: rank {self.process_index} trains through {engines} with {optimizer}", flush=True)
        return out

    accelerate.Accelerator.prepare = report_engine


if __name__ == "__main__":
    from fsdp_cpu_shim import report_peak_at_exit, report_sharding

    report_peak_at_exit()  # the per-rank figures benchmarks/bench_fsdp_memory.py reads, in the FSDP shim's words
    enable_deepspeed_on_cpu()
    report_sharding()
    if os.environ.get("CRUCIBLE_TEST_CANCEL_AT_STEP"):
        from fsdp_cpu_shim import cancel_on_rank0_at

        cancel_on_rank0_at(int(os.environ["CRUCIBLE_TEST_CANCEL_AT_STEP"]))
    sys.argv = ["trainer", *sys.argv[1:]]
    runpy.run_module("trainer", run_name="__main__", alter_sys=True)
