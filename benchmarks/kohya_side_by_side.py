"""kohya sd-scripts beside Crucible in the memory benchmark (issue 16): the same case on the same machine.

``bench_memory.py --kohya DIR --kohya-python PY`` runs, after each Crucible case, kohya's ``train_network.py``
(``sdxl_train_network.py`` for SDXL) from ``DIR`` with the interpreter ``PY`` (kohya's own venv) on the same case:

* the same full-size random weights: the Crucible row's ``trainer.full_size.random_components`` (same seed, same
  dtype), written as one SD/SDXL single-file checkpoint (the LDM layout ComfyUI and kohya load);
* the same dataset (one generated image and its caption; kohya's ``1_<name>`` folder = 1 repeat), the same
  resolution, batch, LoRA rank/alpha, optimizer, learning rate, scheduler, precision, checkpointing, caches, seed
  and number of steps (:func:`kohya_flags` maps the config; what kohya has no flag for is listed, not hidden);
* the same measurement: the peak resident set size of a fresh process (``ru_maxrss`` of the child from ``wait4``,
  the kernel's ``VmHWM``), with no data-loader worker processes.

It prints ``case=<name> kohya_peak_gib=<x> crucible_peak_gib=<y> ratio=<y/x>`` (``ratio`` below 1: Crucible
needs less). Kohya's tokenizers come from the hub; offline, the tiny CLIP tokenizer Crucible's row also uses is put
where kohya's ``--tokenizer_cache_dir`` looks. Without ``--kohya`` nothing here runs and nothing extra is printed.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

KOHYA_SCRIPTS = {"sd15": "train_network.py", "sdxl": "sdxl_train_network.py"}
# the hub ids kohya loads its tokenizers from (library/strategy_sd.py, strategy_sdxl.py), with their pad tokens
KOHYA_TOKENIZERS = {"sd15": (("openai/clip-vit-large-patch14", "<|endoftext|>"),),
                    "sdxl": (("openai/clip-vit-large-patch14", "<|endoftext|>"),
                             ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", "!"))}
KOHYA_OPTIMIZERS = {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "adafactor": "Adafactor", "lion": "Lion",
                    "prodigy": "Prodigy", "sgd": "SGDNesterov", "dadaptation": "DAdaptation"}
KOHYA_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no", "no": "no"}
# how kohya's venv differs from its requirements.txt (benchmarks/kohya_venv.sh), written into the record
KOHYA_ENV_NOTES = ("requirements.txt installed as pinned, except: bitsandbytes not installed (8-bit optimizers need CUDA; "
                   "no CPU case uses them); torch 2.13.0 CPU wheel (kohya leaves torch to the user); torchvision "
                   "0.28.0, a CUDA build on PyPI whose C ops cannot load beside a CPU torch, with its two unguarded "
                   "register_fake() calls guarded (kohya uses only its pure-Python transforms); -e . with --no-deps")
RESULT = re.compile(r"avr_loss=([0-9.]+(?:e-?\d+)?)")


@dataclass(frozen=True)
class KohyaPlan:
    """kohya's script and flags for one Crucible config, and what could not be matched (in words)."""
    script: str
    flags: list = field(default_factory=list)
    unmatched: list = field(default_factory=list)


def kohya_flags(cfg, precision: str) -> KohyaPlan:
    """Map a Crucible :class:`~trainer.config.TrainConfig` (LoRA, SD1.5 / SDXL) to kohya sd-scripts flags.

    ``precision`` is the resolved mixed precision (``auto`` already decided). Paths (model, data, output,
    tokenizers) are added by :func:`kohya_argv`. Raises ``ValueError`` for a config kohya cannot run at all here."""
    from trainer.defaults import resolved_settings
    from trainer.families import get_family

    family, net, opt, tr, ds = cfg.model.family, cfg.network, cfg.optim, cfg.training, cfg.datasets[0]
    if family not in KOHYA_SCRIPTS:
        raise ValueError(f"kohya side-by-side covers {', '.join(KOHYA_SCRIPTS)} LoRA cases, not {family}")
    if net.network_type != "lora":
        raise ValueError(f"kohya side-by-side maps LoRA cases (networks.lora), not network_type {net.network_type}")
    if opt.optimizer not in KOHYA_OPTIMIZERS:
        raise ValueError(f"no kohya optimizer_type for {opt.optimizer!r}")
    if precision not in KOHYA_PRECISION:
        raise ValueError(f"no kohya mixed_precision for {precision!r}")
    if tr.blocks_to_swap:
        raise ValueError(f"kohya's {KOHYA_SCRIPTS[family]} has no blocks_to_swap")
    flags = ["--network_module", "networks.lora", "--network_dim", str(net.network_dim),
             "--network_alpha", f"{net.network_alpha:g}",
             "--resolution", str(ds.resolution), "--train_batch_size", str(tr.batch_size),
             "--caption_extension", ds.caption_extension,
             "--optimizer_type", KOHYA_OPTIMIZERS[opt.optimizer], "--learning_rate", f"{opt.learning_rate:g}",
             "--optimizer_args", f"weight_decay={opt.weight_decay:g}", "--max_grad_norm", f"{opt.max_grad_norm:g}",
             "--lr_scheduler", opt.lr_scheduler, "--lr_warmup_steps", str(opt.lr_warmup_steps),
             "--mixed_precision", KOHYA_PRECISION[precision], "--save_precision", cfg.save.save_precision,
             "--seed", str(tr.seed),
             *(["--max_train_steps", str(tr.max_train_steps)] if tr.max_train_steps
               else ["--max_train_epochs", str(tr.epochs)]),
             "--gradient_accumulation_steps", str(tr.gradient_accumulation_steps),
             "--max_data_loader_n_workers", "0", "--save_model_as", "safetensors",
             "--xformers" if cfg.model.attention == "xformers" else "--sdpa"]
    unmatched = []
    if not net.train_text_encoder:
        flags.append("--network_train_unet_only")
    elif not net.train_unet:
        flags.append("--network_train_text_encoder_only")
    unmatched.append(f"LoRA targets: Crucible's {net.target_preset} preset; kohya's networks.lora trains every "
                     "Linear and 1x1 conv inside the transformer blocks (attention, feed-forward and "
                     "proj_in/proj_out)")
    if cfg.model.clip_skip != 1:
        flags += ["--clip_skip", str(cfg.model.clip_skip)]
    resolved = resolved_settings(cfg)  # the family's checkpointing and cache defaults where the config leaves them
    if resolved["gradient_checkpointing"]:
        flags.append("--gradient_checkpointing")
    if resolved["cache_latents"]:
        flags.append("--cache_latents")
    if tr.cache_latents_to_disk:
        flags.append("--cache_latents_to_disk")
    if resolved["cache_text_embeddings"]:
        if family == "sdxl":
            flags.append("--cache_text_encoder_outputs")
        else:
            unmatched.append("text cache: kohya's train_network.py has no text-encoder output cache for SD1.5; "
                             "its text encoder stays resident (in the mixed-precision dtype) and encodes every step")
    if get_family(family).vae_fp32:
        flags.append("--no_half_vae")
    for name, on in (("fp8_base", cfg.model.fp8_base), ("full_bf16", tr.full_bf16)):
        if on:
            flags.append(f"--{name}")
    if tr.fused_backward_pass:
        raise ValueError("kohya's fused_backward_pass is for full fine-tunes (sdxl_train.py), not LoRA")
    if tr.min_snr_gamma:
        flags += ["--min_snr_gamma", f"{tr.min_snr_gamma:g}"]
    if tr.noise_offset:
        flags += ["--noise_offset", f"{tr.noise_offset:g}"]
    return KohyaPlan(KOHYA_SCRIPTS[family], flags, unmatched)


def kohya_argv(kohya_dir: Path, python: str, plan: KohyaPlan, checkpoint: Path, tokenizers: Path, data: Path,
               out: Path) -> list:
    """The whole command line (run with ``cwd=kohya_dir``)."""
    return [python, str(Path(kohya_dir) / plan.script), "--pretrained_model_name_or_path", str(checkpoint),
            "--tokenizer_cache_dir", str(tokenizers), "--train_data_dir", str(data), "--output_dir", str(out),
            "--output_name", "bench", *plan.flags]


def kohya_dataset(folder: Path, res: int) -> Path:
    """The benchmark's one image and caption in kohya's layout (``<folder>/1_thing/``: one repeat)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_memory import one_image_dataset

    one_image_dataset(Path(folder) / "1_thing", res)
    return Path(folder)


def kohya_tokenizers(folder: Path, family: str) -> Path:
    """The tiny CLIP tokenizer(s) where kohya's ``--tokenizer_cache_dir`` looks (``<dir>/<hub id with _>``)."""
    from trainer.tiny import build_tiny_tokenizer

    for hub_id, pad in KOHYA_TOKENIZERS[family]:
        build_tiny_tokenizer(Path(folder) / hub_id.replace("/", "_"), pad_token=pad)
    return Path(folder)


def write_checkpoint(path: Path, family: str, precision: str, seed: int = 0) -> Path:
    """The Crucible row's full-size random weights (same builder, seed and dtype) as one single-file checkpoint.
    Run in its own process (:func:`prepare`): building SDXL takes several GiB."""
    import torch

    from trainer.families.single_file import diffusers_to_single_file
    from trainer.fileio import save_safetensors
    from trainer.full_size import random_components

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    comps = random_components(family, dtype=dtype, seed=seed)
    return save_safetensors(path, {k: v.contiguous() for k, v in diffusers_to_single_file(comps, family).items()})


def peak_rss_of(argv: list, cwd: Path, log: Path, timeout: float, env: dict | None = None,
                marker: str = "") -> tuple[int, float, float | None]:
    """Run ``argv`` as a fresh process: its exit code, its peak resident set size in GiB (``ru_maxrss`` from
    ``wait4``, KiB on Linux: the kernel's ``VmHWM`` of that process, or of a waited-for child of it if larger), and
    the largest ``VmRSS`` sampled (every 0.2 s) after ``marker`` first appears in its output (None without one)."""
    after = {"seen": False, "gib": None}
    done = threading.Event()

    def sample(pid: int) -> None:
        while not done.wait(0.2):
            try:
                if not after["seen"]:
                    after["seen"] = marker in log.read_text(encoding="utf-8", errors="replace")
                if after["seen"]:
                    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
                        rss = next(int(ln.split()[1]) for ln in fh if ln.startswith("VmRSS:")) / 2**20
                    after["gib"] = max(after["gib"] or 0.0, rss)
            except (OSError, StopIteration):
                pass

    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        timer = threading.Timer(timeout, proc.kill)
        sampler = threading.Thread(target=sample, args=(proc.pid,), daemon=True)
        timer.start()
        if marker:
            sampler.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
            done.set()
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 2**20, after["gib"]


def crucible_tokenizers(folder: Path, family: str) -> Path:
    """The same tiny tokenizer(s) in the layout ``model.tokenizer_path`` reads (``tokenizer/``, ``tokenizer_2/``)."""
    from trainer.tiny import build_tiny_tokenizer

    for sub, (_, pad) in zip(("tokenizer", "tokenizer_2"), KOHYA_TOKENIZERS[family]):
        build_tiny_tokenizer(Path(folder) / sub, pad_token=pad)
    return Path(folder)


def crucible_from_file(case: str, res: int, steps: int, folder: Path) -> dict:
    """Crucible on kohya's inputs (runs in a fresh process): the same checkpoint file and dataset folder, loaded as
    a user's run loads them; the peak is taken as in ``bench_memory.child`` (set-up, then the run)."""
    import dataclasses

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_memory import _peak_gib, _phase_peaks_class, case_config, rss_gib, warm_up
    from trainer.defaults import resolve_mixed_precision
    from trainer.loop import train

    folder = Path(folder)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    warm_up(folder / "warm")
    base = rss_gib("VmRSS")
    cfg = case_config(tuple(case.split("-")), res, folder / "data", folder / "crucible-out", steps, False)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, path=str(folder / "model.safetensors"), tokenizer_path=str(folder / "crucible-tokenizers")))
    phases = _phase_peaks_class()(False)
    result = train(cfg, callbacks=phases)
    training = _peak_gib(False)
    setup = phases.setup_gib if phases.setup_gib is not None else training
    return {"peak_gib": round(max(setup, training), 3), "setup_peak_gib": round(setup, 3),
            "train_peak_gib": round(training, 3), "base_gib": round(base, 3),
            "precision": resolve_mixed_precision(cfg.training.mixed_precision),
            "losses": [round(x, 5) for x in result.losses]}


def ratio_line(case: str, kohya_gib: float, crucible_gib: float) -> str:
    return (f"case={case} kohya_peak_gib={kohya_gib:.2f} crucible_peak_gib={crucible_gib:.2f} "
            f"ratio={crucible_gib / kohya_gib:.2f}")


# --- bench_memory.py's hooks ----------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("--kohya", type=Path, help="kohya sd-scripts folder: run its trainer on each case too")
    parser.add_argument("--kohya-python", help="the Python of kohya's own venv (with --kohya)")
    parser.add_argument("--kohya-commit", default="", help="kohya's commit for the record (default: git in --kohya)")
    parser.add_argument("--kohya-record", type=Path, help="write the side-by-side rows to this JSON file")


def compare_case(args, case, res: int, steps: int, row: dict, cuda: bool) -> dict | None:
    """Run Crucible and kohya on the same inputs (checkpoint file, dataset folder) in fresh processes, print the
    ratio line; the record row, or None (and a ``#`` line saying why) when either did not finish.

    ``crucible_peak_gib`` is Crucible loading the same file (like for like: both processes run with glibc's default
    malloc settings); the benchmark's own row (``row``: its own files or modules built in memory, glibc's mmap
    threshold pinned) is kept beside it as ``crucible_row_peak_gib``."""
    import tempfile

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_memory import case_config

    if not args.kohya_python:
        raise SystemExit("--kohya needs --kohya-python (the interpreter of kohya's venv)")
    if cuda:
        print(f"# {case.name}: kohya side-by-side measures host RSS; not run on CUDA", flush=True)
        return None
    with tempfile.TemporaryDirectory(prefix="crucible-kohya-") as tmp:
        tmp = Path(tmp)
        cfg = case_config(tuple(case.name.split("-")), res, tmp / "data", tmp / "out", steps, cuda)
        try:
            plan = kohya_flags(cfg, row["precision"])
        except ValueError as err:
            print(f"# {case.name}: kohya not run: {err}", flush=True)
            return None
        here = [sys.executable, __file__]
        prep = subprocess.run(here + ["--prepare", case.family, row["precision"], str(res), str(tmp)],
                              capture_output=True, text=True, cwd=ROOT, timeout=args.timeout)
        if prep.returncode != 0:
            print(f"# {case.name}: kohya inputs not written: {prep.stderr.strip()[-800:]}", flush=True)
            return None
        ours = subprocess.run(here + ["--crucible-from-file", case.name, str(res), str(steps), str(tmp)],
                              capture_output=True, text=True, cwd=ROOT, timeout=args.timeout)
        line = next((ln for ln in ours.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if ours.returncode != 0 or line is None:
            print(f"# {case.name}: Crucible from the file failed: {ours.stderr.strip()[-800:]}", flush=True)
            return None
        crucible = json.loads(line[len("RESULT "):])
        argv = kohya_argv(args.kohya, args.kohya_python, plan, tmp / "model.safetensors", tmp / "tokenizers",
                          tmp / "data", tmp / "out")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
        code, peak, train_sampled = peak_rss_of(argv, args.kohya, tmp / "kohya.log", args.timeout, env,
                                                marker="steps:")
        log = (tmp / "kohya.log").read_text(encoding="utf-8", errors="replace")
        trained = (tmp / "out" / "bench.safetensors").exists()
        if code != 0 or not trained:
            print(f"# {case.name}: kohya failed (exit {code}, LoRA written: {trained}): {log.strip()[-1500:]}",
                  flush=True)
            return None
        shown = [a.replace(str(tmp), "$TMP") for a in argv]
    print(ratio_line(case.name, peak, crucible["peak_gib"]), flush=True)
    losses = [float(x) for x in RESULT.findall(log)][-1:]
    print(f"#   Crucible from the same file: set-up {crucible['setup_peak_gib']:.2f}, training "
          f"{crucible['train_peak_gib']:.2f} GiB (the benchmark's own row, {row.get('weights', 'in-memory')}: "
          f"{row['peak_gib']:.2f}); kohya "
          f"{plan.script}: training ~{train_sampled or 0:.2f} GiB (sampled), loss {losses}; not matched: "
          f"{'; '.join(plan.unmatched) or 'nothing'}", flush=True)
    return {"case": case.name, "res": res, "steps": steps, "kohya_peak_gib": round(peak, 3),
            "kohya_train_rss_sampled_gib": round(train_sampled, 3) if train_sampled else None,
            "crucible_peak_gib": crucible["peak_gib"], "crucible_setup_peak_gib": crucible["setup_peak_gib"],
            "crucible_train_peak_gib": crucible["train_peak_gib"], "crucible_row_peak_gib": row["peak_gib"],
            "ratio": round(crucible["peak_gib"] / peak, 3), "precision": row["precision"],
            "kohya_losses": losses, "crucible_losses": crucible["losses"],
            "kohya_command": shown, "unmatched": plan.unmatched}


def finish(args, rows: list, device: str) -> None:
    """Write the side-by-side rows (``--kohya-record``), replacing rows of the same case."""
    if not (args.kohya and args.kohya_record and rows):
        return
    from trainer.fileio import atomic_write_bytes

    commit = args.kohya_commit or subprocess.run(["git", "-C", str(args.kohya), "rev-parse", "HEAD"],
                                                 capture_output=True, text=True).stdout.strip() or "unknown"
    version = subprocess.run([args.kohya_python, "-c", "import torch, diffusers, transformers, accelerate; print("
                              "torch.__version__, diffusers.__version__, transformers.__version__, "
                              "accelerate.__version__)"], capture_output=True, text=True).stdout.split()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    path = args.kohya_record
    old = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    for row in rows:
        row.update(date=date, kohya_commit=commit,
                   kohya_env=dict(zip(("torch", "diffusers", "transformers", "accelerate"), version)))
    kept = [r for r in old.get("rows", []) if r["case"] not in {r2["case"] for r2 in rows}]
    # the command of this run (kept rows came from earlier runs: each row has its own date)
    argv = [a.replace(str(ROOT) + os.sep, "") for a in sys.argv[1:]]
    command = " ".join(["python", "benchmarks/bench_memory.py", *argv])
    merged = {**old, "device": device, "date": date, "kohya_commit": commit, "kohya_env_notes": KOHYA_ENV_NOTES,
              "run_command": command, "rows": sorted(kept + rows, key=lambda r: r["case"])}
    atomic_write_bytes(path, (json.dumps(merged, indent=2) + "\n").encode("utf-8"))


def prepare(family: str, precision: str, res: int, folder: Path) -> None:
    """Write kohya's inputs for one case into ``folder``: model.safetensors, tokenizers/, data/."""
    folder = Path(folder)
    kohya_dataset(folder / "data", res)
    kohya_tokenizers(folder / "tokenizers", family)
    crucible_tokenizers(folder / "crucible-tokenizers", family)
    write_checkpoint(folder / "model.safetensors", family, precision)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[1:2] == ["--prepare"]:  # FAMILY PRECISION RES FOLDER
        prepare(sys.argv[2], sys.argv[3], int(sys.argv[4]), Path(sys.argv[5]))
    elif sys.argv[1:2] == ["--crucible-from-file"]:  # CASE RES STEPS FOLDER
        print("RESULT " + json.dumps(crucible_from_file(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
                                                        Path(sys.argv[5]))), flush=True)
