"""Test shim: ``python -m trainer`` with accelerate's FSDP switched on for CPU (gloo) processes.

accelerate 1.16 turns ``distributed_type: FSDP`` on only for GPU-like devices; on CPU processes it silently runs
DDP (``MULTI_CPU``). torch's FSDP2 (``fully_shard``) itself works on the CPU with gloo, so this shim sets the
accelerator state to FSDP after accelerate built it, and the trainer then runs with its denoiser really sharded
(``tests/test_multi_gpu_recipe.py``). Launch: ``accelerate launch --config_file <fsdp yaml> -m fsdp_cpu_shim ...``
with ``tests/`` on ``PYTHONPATH``. Nothing in ``trainer/`` imports it.

Around ``Accelerator.prepare`` it reports, per rank, the bytes of real (non-meta) weights the trained module held
before sharding and the bytes of its local shards after, and rank 0 the sha256 of the whole weights gathered back
from the shards (``report_sharding``): what the rank-0 loading test compares with the model file
(``FSDP_CPU_SHIM_DIGEST=0`` leaves that gathering out, as a memory benchmark must).

At exit each process prints its peak resident set (``report_peak_at_exit``).

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
            # a later AcceleratorState() (accelerate makes several) keeps the plugin the run set up
            self.fsdp_plugin = (kwargs.get("fsdp_plugin") or getattr(self, "fsdp_plugin", None)
                                or FullyShardedDataParallelPlugin())
            print(f"fsdp_cpu_shim: FSDP version {self.fsdp_plugin.fsdp_version} on CPU rank {self.process_index}",
                  flush=True)

    state.AcceleratorState.__init__ = init


def _digest(state: dict) -> str:
    import hashlib

    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def report_sharding() -> None:
    import accelerate
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    original = accelerate.Accelerator.prepare

    def real_bytes(modules, local: bool) -> int:
        tensors = [p.to_local() if local and isinstance(p, DTensor) else p for m in modules for p in m.parameters()]
        return sum(t.numel() * t.element_size() for t in tensors if not t.is_meta)

    def prepare(self, *args, **kwargs):
        modules = [a for a in args if isinstance(a, torch.nn.Module)]
        rank = self.process_index
        print(f"fsdp_cpu_shim: rank {rank} weight bytes before sharding {real_bytes(modules, False)}", flush=True)
        out = original(self, *args, **kwargs)
        print(f"fsdp_cpu_shim: rank {rank} shard bytes after sharding {real_bytes(modules, True)}", flush=True)
        print(f"fsdp_cpu_shim: rank {rank} peak rss kib {peak_rss_kib()}", flush=True)
        if os.environ.get("FSDP_CPU_SHIM_DIGEST", "1") == "1":  # gathers the whole weights into rank 0's RAM
            state = get_model_state_dict(modules[0], options=StateDictOptions(full_state_dict=True,
                                                                              cpu_offload=True))
            if rank == 0:
                print(f"fsdp_cpu_shim: sharded weights sha256 {_digest(state)}", flush=True)
        return out

    accelerate.Accelerator.prepare = prepare


def cancel_on_rank0_at(step: int) -> None:
    from trainer.callbacks import MultiCallbacks

    on_step = MultiCallbacks.on_step

    def record(self, info):
        self.last_step = info.step
        on_step(self, info)

    MultiCallbacks.on_step = record
    MultiCallbacks.should_stop = lambda self: getattr(self, "last_step", 0) >= step


def peak_rss_kib() -> int:
    """This process's peak resident set so far, in KiB: ``VmHWM`` where Linux has it. ``ru_maxrss`` is the fallback
    only: it survives ``exec``, so a process started from a large one (a pytest worker) reports its parent's RSS."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def report_peak_at_exit() -> None:
    """At exit, this process's peak resident set: what ``benchmarks/bench_fsdp_memory.py`` reads per rank."""
    import atexit

    def report():
        rank = os.environ.get("RANK", "0")
        print(f"fsdp_cpu_shim: rank {rank} exit peak rss kib {peak_rss_kib()}", flush=True)

    atexit.register(report)


if __name__ == "__main__":
    report_peak_at_exit()
    enable_fsdp_on_cpu()
    report_sharding()
    if os.environ.get("CRUCIBLE_TEST_CANCEL_AT_STEP"):
        cancel_on_rank0_at(int(os.environ["CRUCIBLE_TEST_CANCEL_AT_STEP"]))
    sys.argv = ["trainer", *sys.argv[1:]]
    runpy.run_module("trainer", run_name="__main__", alter_sys=True)
