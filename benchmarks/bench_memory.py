"""Benchmark: peak training memory per family and memory preset, with full-size random weights.

Each case runs in a fresh subprocess: the full-size architecture (``trainer.full_size``, random weights, no
download), a one-image dataset at the case's resolution, LoRA rank 16 on the ``attn_mlp`` preset, batch 1, and
``--steps`` real optimizer steps through ``trainer.loop.train``. Peak memory is ``torch.cuda.max_memory_allocated``
on CUDA and the process's peak resident set size (``VmHWM``) on the CPU; the RSS right after the imports (Python,
torch, diffusers) is reported too (``base_gib``), since a CUDA figure does not include it. A CUDA row also records
``torch.cuda.max_memory_reserved`` (``reserved_peak_gib``: the allocator's reserve, what an out-of-memory is decided
by) and the process's peak host RSS (``host_peak_gib``: the cache-first order's host RAM on a GPU machine).

Presets: ``trainer/memory_presets.py`` (one table: the switches of ``default``, ``low``, ``lowest`` per family, and
the budgets). A CUDA-only switch (block swap) prints ``skipped: CUDA only`` on the CPU; AdamW 8-bit (bitsandbytes,
CUDA) runs as AdamW on the CPU and the row says so.

Every line reads ``case=<family>-<kind>-<preset> res=<px> peak_gib=<x> budget_gib=<y> device=<cpu|cuda>
ok=<true|false>``; the exit status is 1 when a case is over its budget. Budgets are the issue's (1024 px on CUDA;
CPU rows run at ``--cpu-res``, 512 px by default, and say so in ``res``). ``--quick`` runs SD1.5 and SDXL;
``--cases`` picks cases by name; ``--record FILE`` writes the measurements as JSON (device, date, numbers).
On the CPU, cases whose estimate exceeds ``--max-ram-gib`` are not started (they are listed as skipped).

Weights (``weights`` in each row): by default (``files``) the parent process first writes the full-size random
weights as the model files a ComfyUI user has (``benchmarks/model_files.py``: an SD1.5/SDXL single-file checkpoint;
SD3 and Flux split files, Flux's transformer and both T5s in fp8 e4m3fn as ``flux1-dev-fp8`` and
``t5xxl_fp8_e4m3fn``), tensor by tensor, under ``--files-dir`` (a temporary folder, deleted after the family's
cases), and each case's process loads them through the trainer's own loader: ``model.fp8_base`` quantizes while
reading, and the cached encoders leave RAM (read back from the files for previews). ``--in-memory`` is the older
method: the modules are built in RAM (``trainer.full_size.random_components``) and handed to the trainer, so the
encoders stay (nothing to reload from) and ``fp8_base`` quantizes a bf16 model after it is built.

Methods: SD1.5 and SDXL rows are ``method=full-step``: the full-size model, real optimizer steps; so are SD3 and
Flux rows on CUDA (from their model files; not yet run on a GPU). SD3 and Flux rows on the CPU are
``method=setup+reduced-step`` (the issue's "full-size model after set-up plus one step of a same-width model with
fewer blocks", ``benchmarks/bench_memory_reduced.py``). In a full-step row the peak is split at the
run's start (``on_start``, after set-up, before the caches fill): ``setup_peak_gib`` (building the random weights
and converting them, e.g. quantizing to fp8 — host memory on a GPU machine) and ``train_peak_gib`` (caches and steps,
what :mod:`trainer.memory` estimates); ``peak_gib`` is the larger. The training peak is split again where the first
step begins: ``caching_peak_gib`` (the caches filling, every encoder resident) and ``step_peak_gib`` (the steps, after
the encoders left). ``setup_anon_peak_gib`` is the set-up's peak of anonymous memory alone (sampled): a loaded file's
memory-mapped pages count in the RSS while it is read. The process baseline
``base_gib`` is the RSS after the imports *and* one warm-up step of a tiny model (torch's runtime: oneDNN kernels,
thread pools, per-thread allocator arenas), so ``peak_gib - base_gib`` is what the case itself adds.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kohya_side_by_side  # noqa: E402  (beside this file)

BUILDABLE = ("sd15", "sdxl")  # trainer.full_size.random_components: measured with full steps
REDUCED = ("sd3", "flux")  # on the CPU: setup+reduced-step (bench_memory_reduced.py)


def case_config(case, res: int, data: Path, out: Path, steps: int, cuda: bool):
    from trainer.config import TrainConfig
    from trainer.memory_presets import get_case, resolve_case

    resolved = resolve_case(get_case(case), "cuda" if cuda else "cpu")
    if resolved.skip_reason:
        raise SystemExit(f"{resolved.case.name}: {resolved.skip_reason}")
    over = resolved.overrides
    return TrainConfig.from_dict({
        "model": {"family": case[0], **over.get("model", {})},
        "datasets": [{"path": str(data), "resolution": res}],
        "network": {"network_type": "lora" if case[1] == "lora" else "full", "network_dim": 16, "network_alpha": 16,
                    **over.get("network", {})},
        "optim": {"optimizer": "adamw", "lr_scheduler": "constant", **over.get("optim", {})},
        "training": {"batch_size": 1, "max_train_steps": steps, **over.get("training", {})},
        "save": {"output_dir": str(out), "run_name": "bench", "save_every_n_epochs": 0, "save_last": False,
                 "save_state": False},
    })


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def rss_gib(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":")) / 2**20


def one_image_dataset(folder: Path, res: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    Image.new("RGB", (res, res), (120, 90, 60)).save(folder / "a.png")
    (folder / "a.txt").write_text("a photo of a thing", encoding="utf-8")
    return folder


def warm_up(tmp: Path) -> None:
    """One step of a tiny SD1.5 before the baseline reading: torch's runtime (oneDNN kernels, thread pools, the
    allocator arenas of its threads) is then part of the baseline, not of the case."""
    from trainer.config import TrainConfig
    from trainer.loop import train
    from trainer.tiny import build_tiny_pipeline

    model = build_tiny_pipeline(tmp / "tiny", family="sd15", seed=0)
    cfg = TrainConfig.from_dict({
        "model": {"family": "sd15", "path": str(model)},
        "datasets": [{"path": str(one_image_dataset(tmp / "tiny-data", 64)), "resolution": 64}],
        "training": {"max_train_steps": 1, "validation_split": 0},
        "save": {"output_dir": str(tmp / "tiny-out"), "save_every_n_epochs": 0, "save_last": False,
                 "save_state": False}})
    train(cfg)


def _peak_gib(cuda: bool) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if cuda else rss_gib("VmHWM")


def _phase_peaks_class():
    from trainer.callbacks import Callbacks

    class PhasePeaks(Callbacks):
        """Splits the peak at the start of the run (``on_start``: after set-up, before the caches fill): the set-up
        (building and converting the weights: host memory on a GPU machine) and the training phase (caches, steps:
        what the estimate models). On Linux the RSS high-water mark is reset by writing 5 to
        ``/proc/self/clear_refs``; where that fails the training peak is the whole run's."""

        def __init__(self, cuda: bool):
            self.cuda, self.setup_gib, self.anon = cuda, None, None
            if not cuda:
                from bench_fp8_load import AnonPeak

                self.anon = AnonPeak()
                self.anon.thread.start()

        def on_start(self, plan) -> None:
            import torch

            self.setup_gib = _peak_gib(self.cuda)
            if self.anon is not None:
                self.anon.__exit__(None, None, None)
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
                return
            try:
                with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                    fh.write("5")
            except OSError:
                self.setup_gib = None

    return PhasePeaks


def with_files(cfg, files: dict | None):
    """``cfg`` loading the model files ``files`` names (``model`` fields from :mod:`model_files`)."""
    import dataclasses

    if not files:
        return cfg
    fields = {**files, "text_encoder_paths": tuple(files.get("text_encoder_paths", ()))}
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **fields))


class StepPeak:
    """Patches ``Trainer._loop`` for one run: the peak so far and the RSS when the first step begins (the caches
    filled, the encoders released), then the high-water mark is reset so the steps' own peak can be read after."""

    def __init__(self, cuda: bool):
        self.cuda, self.caching_gib, self.ready_gib, self.reset = cuda, None, None, False

    def __enter__(self):
        import trainer.loop as loop

        self.loop, self.original = loop, loop.Trainer._loop
        peaks = self

        def measured_loop(trainer, start_step):
            import torch

            peaks.caching_gib, peaks.ready_gib = _peak_gib(peaks.cuda), rss_gib("VmRSS")
            if peaks.cuda:
                torch.cuda.reset_peak_memory_stats()
                peaks.reset = True
            else:
                peaks.reset = reset_rss_peak()
            return peaks.original(trainer, start_step)

        loop.Trainer._loop = measured_loop
        return self

    def __exit__(self, *exc):
        self.loop.Trainer._loop = self.original


def reset_rss_peak() -> bool:
    """Reset the RSS high-water mark (Linux: ``5`` to ``/proc/self/clear_refs``); False where that fails."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def child(case, res: int, steps: int, files: dict | None = None) -> dict:
    """Runs in the fresh subprocess: one case, returns its numbers. ``files``: load these model files (the
    default method) instead of building random modules in memory."""
    import torch

    from trainer.defaults import resolve_mixed_precision
    from trainer.full_size import random_components
    from trainer.loop import train

    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="crucible-bench-mem-") as tmp:
        warm_up(Path(tmp))
        base = rss_gib("VmRSS")
        data = one_image_dataset(Path(tmp) / "data", res)
        cfg = with_files(case_config(case, res, data, Path(tmp) / "out", steps, cuda), files)
        precision = resolve_mixed_precision(cfg.training.mixed_precision)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision) if case[1] == "lora" else None
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        phases = _phase_peaks_class()(cuda)  # from here: the set-up (building the modules or loading the files)
        comps = None if files else random_components(case[0], dtype=dtype)
        with StepPeak(cuda) as step:
            result = train(cfg, callbacks=phases, components=comps)
        training = _peak_gib(cuda)  # since the first step (since on_start / the whole run where a reset failed)
    setup = phases.setup_gib if phases.setup_gib is not None else training
    caching = step.caching_gib if step.caching_gib is not None else training
    train_peak = max(caching, training) if step.reset else training
    row = {"case": "-".join(case), "res": res, "peak_gib": round(max(setup, train_peak), 3), "base_gib": round(base, 3),
           "setup_peak_gib": round(setup, 3), "train_peak_gib": round(train_peak, 3),
           "device": "cuda" if cuda else "cpu", "method": "full-step", "weights": "files" if files else "in-memory",
           "precision": precision, "steps": steps, "losses": [round(x, 5) for x in result.losses],
           "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc dynamic")}
    if step.reset:
        row.update(caching_peak_gib=round(caching, 3), step_peak_gib=round(training, 3),
                   ready_gib=round(step.ready_gib, 3))
    if phases.anon is not None:
        row["setup_anon_peak_gib"] = round(phases.anon.peak / 2**30, 3)
    if cuda:  # what decides an out-of-memory (the allocator's reserve, since the last reset), and host RAM
        row.update(reserved_peak_gib=round(torch.cuda.max_memory_reserved() / 2**30, 3),
                   host_peak_gib=round(rss_gib("VmHWM"), 3))
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="SD1.5 and SDXL cases only")
    parser.add_argument("--cases", nargs="*", help="case names, e.g. sd15-lora-default")
    parser.add_argument("--cpu-res", type=int, default=512)
    parser.add_argument("--cuda-res", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps per case (default: 3 CUDA, 1 CPU)")
    parser.add_argument("--max-ram-gib", type=float, default=12.0, help="CPU: skip cases estimated above this")
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--record", type=Path, help="write the measurements to this JSON file")
    parser.add_argument("--table", type=Path, help="print a recorded JSON file as the README's markdown rows, then exit")
    parser.add_argument("--in-memory", action="store_true",
                        help="build the random modules in RAM and hand them to the trainer (the older method) instead "
                             "of loading model files written first")
    parser.add_argument("--files-dir", type=Path, help="where the model files are written (default: a temporary "
                        "folder under the system's temp dir, deleted after each family's cases)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--files", help=argparse.SUPPRESS)  # the child's model file fields, JSON
    kohya_side_by_side.add_arguments(parser)
    args = parser.parse_args(argv)

    if args.table:
        print(markdown_rows(json.loads(args.table.read_text(encoding="utf-8"))))
        return 0

    import torch

    cuda = torch.cuda.is_available()
    res = args.cuda_res if cuda else args.cpu_res
    steps = args.steps or (3 if cuda else 1)
    if args.child:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        name, _, phase = args.child.partition(":")
        files = json.loads(args.files) if args.files else None
        result = reduced_child(tuple(name.split("-")), res, phase, files) if phase else \
            child(tuple(name.split("-")), res, steps, files)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    from trainer.memory import estimate_case
    from trainer.memory_presets import CASES, resolve_case

    device = "cuda" if cuda else "cpu"
    cases = [c for c in CASES if not args.quick or c.family in ("sd15", "sdxl")]
    if args.cases:
        unknown = set(args.cases) - {c.name for c in CASES}
        if unknown:
            parser.error(f"unknown case(s) {', '.join(sorted(unknown))}; known: {', '.join(c.name for c in CASES)}")
        cases = [c for c in cases if c.name in args.cases]
    rows, failed, kohya_rows = [], False, []
    device_name = torch.cuda.get_device_name() if cuda else f"CPU: {cpu_model()}, {os.cpu_count()} cores"
    files = ModelFiles(args.files_dir, in_memory=args.in_memory)
    for case in cases:
        resolved = resolve_case(case, device)
        estimate = estimate_case(case.name, res, device=device, model_given=args.in_memory)
        head = f"case={case.name} res={res}"
        if resolved.skip_reason:
            print(f"{head} skipped: {resolved.skip_reason}; estimate {estimate.total_gib:.2f} GiB", flush=True)
            continue
        if case.family not in BUILDABLE + REDUCED or (cuda and args.in_memory and case.family not in BUILDABLE):
            print(f"{head} skipped: not measured (--in-memory builds full steps for {', '.join(BUILDABLE)}; "
                  f"setup+reduced-step runs on the CPU); estimate {estimate.total_gib:.2f} GiB", flush=True)
            continue
        if not cuda and estimate.total_gib > args.max_ram_gib:
            print(f"{head} skipped: estimate {estimate.total_gib:.1f} GiB > --max-ram-gib {args.max_ram_gib}",
                  flush=True)
            continue
        fields = files.of(case.family, remaining=[c.family for c in cases[cases.index(case) + 1:]])
        # on CUDA every family takes full steps from its model files; setup+reduced-step is the CPU's method
        row = measure_reduced(case.name, res, args.timeout, fields) if case.family in REDUCED and not cuda else \
            run_child(case.name, res, steps, args.timeout, fields)
        files.done(case.family, remaining=[c.family for c in cases[cases.index(case) + 1:]])
        if isinstance(row, str):
            print(f"# {case.name}: failed {row}", flush=True)
            failed = True
            continue
        row.update(budget_gib=case.budget_gib, ok=row["peak_gib"] <= case.budget_gib,
                   estimate_gib=round(estimate.total_gib, 3), settings=resolved.settings,
                   substituted=resolved.substituted)
        rows.append(row)
        failed |= not row["ok"]
        print(result_line(row), flush=True)
        if args.record:  # after each case: a later case that fails or is stopped loses nothing measured
            record_rows(args.record, [row], device_name, torch.__version__)
        phases = {k: row[k] for k in ("setup_peak_gib", "setup_anon_peak_gib", "caching_peak_gib", "step_peak_gib",
                                      "ready_gib", "train_peak_gib") if row.get(k) is not None}
        print(f"#   phases (GiB) {phases}", flush=True)
        print(f"#   estimate {estimate.total_gib:.2f} GiB (trainer.memory); process baseline (imports + tiny warm-up "
              f"step) {row['base_gib']:.2f} GiB; precision {row['precision']}; losses {row.get('losses', 'n/a: set-up + reduced step')}"
              + (f"; {'; '.join(resolved.substituted)}" if resolved.substituted else ""), flush=True)
        if args.kohya:
            kohya_rows.append(kohya_side_by_side.compare_case(args, case, res, steps, row, cuda))
    kohya_side_by_side.finish(args, [r for r in kohya_rows if r], device_name)
    return 1 if failed else 0


class ModelFiles:
    """The model files of the family being measured (``benchmarks/model_files.py``), written before its first case
    and deleted after its last, under ``folder`` (default: a new temporary folder); ``in_memory``: no files."""

    def __init__(self, folder: Path | None, in_memory: bool = False):
        self.root, self.fields, self.tmp = folder, {}, None
        self.enabled = not in_memory

    def of(self, family: str, remaining: list) -> dict | None:
        if not self.enabled:
            return None
        if family not in self.fields:
            import model_files

            if self.root is None and self.tmp is None:
                self.tmp = tempfile.mkdtemp(prefix="crucible-bench-files-")
            folder = (self.root or Path(self.tmp)) / family
            print(f"# writing full-size random {family} model files to {folder} ...", flush=True)
            self.fields[family] = model_files.write_full_size_files(family, folder)
            print(f"#   {model_files.files_size_gib(self.fields[family]):.2f} GiB of files", flush=True)
        return self.fields[family]

    def done(self, family: str, remaining: list) -> None:
        import shutil

        if family in self.fields and family not in remaining:
            shutil.rmtree((self.root or Path(self.tmp)) / family, ignore_errors=True)
            del self.fields[family]
            if self.tmp is not None and not self.fields:
                shutil.rmtree(self.tmp, ignore_errors=True)
                self.tmp = None


MMAP_THRESHOLD = 128 * 1024  # glibc's default M_MMAP_THRESHOLD, pinned in the case processes (see child_env)


def child_env(environ=None) -> dict:
    """The case process's environment: glibc's mmap threshold pinned at its default (``MALLOC_MMAP_THRESHOLD_``),
    unless the caller set one. Left dynamic, glibc raises the threshold to the size of the largest block freed so
    far (up to 32 MiB); a file load frees many such blocks (each tensor's read copy), after which the step's
    activations come from the heap and their freed memory is kept: +0.52 GiB of peak RSS on the SD1.5 default case
    (4.02 against 3.50 GiB), depending on the allocation history rather than on what the run holds. Pinned, the rows
    measure the live memory, whichever way the weights arrived."""
    env = dict(os.environ if environ is None else environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    return env


def run_child(name: str, res: int, steps: int, timeout: int, files: dict | None = None) -> dict | str:
    """One fresh process (``--child name`` or ``name:phase``): its RESULT row, or why it failed."""
    argv = [sys.executable, __file__, "--child", name, "--cpu-res", str(res), "--cuda-res", str(res),
            "--steps", str(steps)] + (["--files", json.dumps(files)] if files else [])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=child_env())
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        return f"(exit {proc.returncode}): {proc.stderr.strip()[-800:]}"
    return json.loads(line[len("RESULT "):])


def reduced_child(case, res: int, phase: str, files: dict | None = None) -> dict:
    """A process of setup+reduced-step (``phase``: ``setup`` | ``step``), see bench_memory_reduced.py; the set-up
    loads ``files`` where given."""
    import bench_memory_reduced as reduced

    base = None
    if phase == "setup":
        with tempfile.TemporaryDirectory(prefix="crucible-bench-mem-") as tmp:
            warm_up(Path(tmp))
        base = rss_gib("VmRSS")

    def cfg_for(tmp: Path, steps: int):
        cfg = case_config(case, res, one_image_dataset(tmp / "data", res), tmp / "out", steps, cuda=False)
        return with_files(cfg, files if phase == "setup" else None)

    out = reduced.run_phase(case, cfg_for, res, 1, phase, from_files=bool(files) and phase == "setup")
    out["malloc_mmap_threshold"] = os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc dynamic")
    return {**out, "base_gib": base} if base is not None else out


def measure_reduced(name: str, res: int, timeout: int, files: dict | None = None) -> dict | str:
    """setup+reduced-step: the full-size set-up in one process (from ``files`` where given), the reduced model's step
    in another (built in memory: what a step adds does not depend on where the weights came from)."""
    import bench_memory_reduced as reduced

    setup = run_child(f"{name}:setup", res, 1, timeout, files)
    if isinstance(setup, str):
        return setup
    step = run_child(f"{name}:step", res, 1, timeout)
    if isinstance(step, str):
        return step
    return {**reduced.combine(name, res, setup, step, setup["base_gib"]), "weights": "files" if files else "in-memory",
            "malloc_mmap_threshold": setup["malloc_mmap_threshold"]}


def result_line(row: dict) -> str:
    """``case=<family>-<kind>-<preset> res=<px> peak_gib=<x> budget_gib=<y> device=<cpu|cuda> ok=<true|false>``,
    then how the row was measured."""
    return (f"case={row['case']} res={row['res']} peak_gib={row['peak_gib']:.2f} budget_gib={row['budget_gib']:g} "
            f"device={row['device']} ok={'true' if row['ok'] else 'false'} method={row['method']}"
            f" weights={row.get('weights', 'in-memory')}")


def markdown_rows(record: dict) -> str:
    """The README's rows: case (its switches), method and weights (model files or built in memory), res, peak (and
    its phases where measured: set-up, caches filling, steps), process baseline, budget, estimate + process."""
    lines = []
    for r in record["rows"]:
        switches = ", ".join(f"{k} {v}" for k, v in r.get("settings", {}).items()) or "config defaults"
        over = "" if r["ok"] else " (over)"
        est = r["estimate_gib"] + (r["base_gib"] if r["device"] == "cpu" else 0)
        peak = f"{r['peak_gib']:.2f}"
        phases = [(name, r[key]) for name, key in (("set-up", "setup_peak_gib"), ("caching", "caching_peak_gib"),
                                                   ("steps", "step_peak_gib")) if r.get(key) is not None]
        if "step_peak_gib" not in r and r.get("ready_gib") is not None and r.get("step_gib") is not None:
            phases.append(("steps", r["ready_gib"] + r["step_gib"]))  # setup+reduced-step: ready + the step
        if len(phases) > 1:
            shown = [f"{name} {value:.2f}" for name, value in phases]
            if r.get("setup_anon_peak_gib") is not None:  # without the read file's memory-mapped pages
                shown[0] += f" (anonymous {r['setup_anon_peak_gib']:.2f})"
            peak += " (" + ", ".join(shown) + ")"
        elif r.get("train_peak_gib") is not None and r["setup_peak_gib"] > r["train_peak_gib"]:
            peak += f" (set-up; training {r['train_peak_gib']:.2f})"
        method = f"{r['method']}, {r.get('weights', 'in-memory')}"
        lines.append(f"| {r['case']} ({switches}) | {method} | {r['res']} | {peak} | "
                     f"{r['base_gib']:.2f} | {r['budget_gib']:g}{over} | {est:.2f} |")
    return "\n".join(lines)


def record_rows(path: Path, rows: list, device: str, torch_version: str) -> None:
    """Write ``rows`` into the JSON record at ``path``, replacing rows of the same case (cases run one at a time)."""
    from trainer.fileio import atomic_write_bytes

    old = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    for row in rows:
        row.update(date=date, torch=torch_version)
    kept = [r for r in old.get("rows", []) if r["case"] not in {row["case"] for row in rows}]
    merged = {**old, "device": device, "date": date, "torch": torch_version,
              "rows": sorted(kept + rows, key=lambda r: r["case"])}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(merged, indent=2) + "\n").encode("utf-8"))

if __name__ == "__main__":
    sys.exit(main())
