#!/usr/bin/env bash
# benchmarks/gpu_checks.sh: issue 16's GPU checks in one command, for a session lent a CUDA GPU (the device tool).
# Nothing of it has run on a GPU yet (docs/memory.md, "GPU checks").
#
# Runs, in order of importance, within a time budget (CRUCIBLE_GPU_BUDGET_S, default 540 s: 9 minutes), each stage
# under `timeout`; a stage that would not fit in what is left is skipped, and the summary says so:
#   env    nvidia-smi, which python, torch / CUDA / package versions
#   tests  pytest -m cuda tests/test_cuda.py (block swap's CUDA streams, fp16 + scaler, fp8 base, SDXL VAE fp32,
#          fused AdamW, cache-first GPU memory), at most 150 s
#   quick  bench_memory.py --quick (SD1.5, SDXL) at 1024 px, rows recorded to $OUT/memory-cuda.json
#   sd3    bench_memory.py --cases sd3-full-lowest sd3-full-low
#   flux   bench_memory.py --cases flux-lora-low flux-lora-lowest flux-lora-default (writes ~17 GB of random fp8
#          model files first; rarely fits after the others: run it alone, CRUCIBLE_GPU_STAGES=flux, or before sd3)
# The bench writes its full-size random model files under CRUCIBLE_GPU_FILES_DIR (default ./.gpu-bench-files, on the
# machine's disk rather than a RAM-backed /tmp) and the folder is deleted at the end.
#
# The device machine has no internet, and its image has torch (CUDA), transformers, peft, accelerate, safetensors,
# pytest, but not diffusers or bitsandbytes. Prepare once, here, on a machine that reaches the package registry:
#     bash benchmarks/gpu_checks.sh --prepare
# It downloads into .gpu-wheels/ (git-ignored) the wheels of diffusers and importlib_metadata (the versions in
# constraints.txt) and bitsandbytes (for the adamw8bit cases, its CUDA 11/12, ROCm and XPU libraries left out:
# ~13 MB in all, within the 64 MiB a call carries; in the checkout the session started in: the device tool sends that
# one). The image's transformers 5.17, accelerate 1.15 and huggingface_hub 1.33 pass the CPU tests of these paths.
# Then call, from the repository root:
#     device run: command="bash benchmarks/gpu_checks.sh", carry=[".gpu-wheels"], timeout_s=600
# Do not carry .venv: it holds a CPU-only torch (1.4 GiB, and a symlink in a worktree). The script uses .venv's
# python only where one is there and its torch sees CUDA, else the machine's python3 (the summary says which); it
# unpacks the carried wheels to a folder put first on PYTHONPATH and installs nothing.
#
# Writes to $OUT (a temporary folder when unset, e.g. a local run): summary.txt, env.txt, pytest.txt,
# pytest-junit.xml, bench.log, memory-cuda.json (6 files: the device tool brings back at most 8).
# Exit status: 0 all passed; 1 a CUDA test failed or could not run; 2 the tests passed but a bench stage failed
# (a case crashed, ran out of time or was over its budget).
# CRUCIBLE_GPU_CHECKS_DRY_RUN=1: print each command instead of running it, then exit 0
# (tests/test_gpu_checks_script.py).
# CRUCIBLE_GPU_PYTHON: the python to use (default: as above); CRUCIBLE_GPU_STAGES: the stages to run, the bench
# ones in the order given (default: tests quick sd3 flux; the tests always run first);
# CRUCIBLE_GPU_WHEELS: the folder of wheels to unpack (default: .gpu-wheels).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
DRY=${CRUCIBLE_GPU_CHECKS_DRY_RUN:-0}
BUDGET=${CRUCIBLE_GPU_BUDGET_S:-540}
STAGES=${CRUCIBLE_GPU_STAGES:-tests quick sd3 flux}
WHEELS=${CRUCIBLE_GPU_WHEELS:-$ROOT/.gpu-wheels}
FILES_DIR=${CRUCIBLE_GPU_FILES_DIR:-$ROOT/.gpu-bench-files}
BNB_VERSION=${CRUCIBLE_BNB_VERSION:-0.50.2}

prepare() {
  # the wheels the device image lacks; pip download only (nothing installed here)
  local py=${PYTHON:-python3} pins
  pins=$(grep -iE '^(diffusers|importlib_metadata)==' constraints.txt | tr '\n' ' ')
  mkdir -p "$WHEELS"
  # shellcheck disable=SC2086  # the pins are separate arguments
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHEELS" $pins "bitsandbytes==$BNB_VERSION" || return 1
  # bitsandbytes ships one library per CUDA/ROCm version (43 MB): keep the CPU and CUDA 13 ones (the image's torch
  # is built for CUDA 13); a wheel is a zip, unpacked on the device, so its RECORD is not checked
  "$py" - "$WHEELS" <<'PY' || return 1
import re, sys, zipfile
from pathlib import Path
for wheel in Path(sys.argv[1]).glob("bitsandbytes-*.whl"):
    slim = wheel.with_suffix(".slim")
    drop = re.compile(r"libbitsandbytes_(cuda1[12]\d|rocm\d+|xpu\d+)\.so$")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if not drop.search(item.filename):
                dst.writestr(item, src.read(item))
    slim.replace(wheel)
PY
  ls -l "$WHEELS"
  du -sh "$WHEELS"
  echo "now call the device tool with: command=\"bash benchmarks/gpu_checks.sh\", carry=[\".gpu-wheels\"]"
}

if [ "${1:-}" = "--prepare" ]; then
  prepare
  exit $?
fi

if [ -z "${OUT:-}" ]; then
  OUT=$(mktemp -d "${TMPDIR:-/tmp}/crucible-gpu-checks-XXXXXX")
fi
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
: >"$OUT/bench.log"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET - SECONDS)); }
# run CMD...: the command, or in a dry run its text ("+ CMD") only
run() {
  if [ "$DRY" = "1" ]; then
    echo "+ $*"
    return 0
  fi
  "$@"
}
# the bench's model files (one folder per family under FILES_DIR), gone after each stage and at the end
remove_model_files() {
  [ "$DRY" = "1" ] && return 0
  rm -rf "$FILES_DIR"/sd15 "$FILES_DIR"/sdxl "$FILES_DIR"/sd3 "$FILES_DIR"/flux
  rmdir "$FILES_DIR" 2>/dev/null || true
}
cleanup() { remove_model_files; }
trap cleanup EXIT

say "Crucible GPU checks, $(date -u '+%Y-%m-%d %H:%M UTC'); budget ${BUDGET} s; stages: ${STAGES}"
[ "$DRY" = "1" ] && say "DRY RUN: commands are printed, not run"

# --- env -----------------------------------------------------------------------------------------------------------
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  SITE=${TMPDIR:-/tmp}/crucible-gpu-site
  run python3 -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" \
    "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  say "wheels: $(cd "$WHEELS" && ls -- *.whl | tr '\n' ' ')unpacked to $SITE (first on PYTHONPATH)"
else
  say "wheels: none carried (.gpu-wheels): diffusers must already be installed (see the header: --prepare)"
fi

if [ -n "${CRUCIBLE_GPU_PYTHON:-}" ]; then
  PY=$CRUCIBLE_GPU_PYTHON
  PY_WHY="CRUCIBLE_GPU_PYTHON"
elif [ "$DRY" = "1" ]; then
  PY=python3
  [ -x .venv/bin/python ] && PY=.venv/bin/python
  PY_WHY="dry run: not probed"
elif [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
    2>/dev/null; then
  PY=.venv/bin/python
  PY_WHY=".venv, carried; its torch sees CUDA"
else
  PY=python3
  PY_WHY="the machine's python3 (.venv absent, or its torch has no CUDA)"
fi
say "python: $PY ($PY_WHY)"

{
  run nvidia-smi || echo "nvidia-smi failed or is missing"
  run "$PY" - <<'PY'
import importlib, sys
import torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", "bf16", torch.cuda.is_bf16_supported())
for name in ("diffusers", "transformers", "peft", "accelerate", "safetensors", "bitsandbytes", "pytest"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as exc:  # noqa: BLE001 - reported, the checks go on where they can
        print(name, "MISSING:", type(exc).__name__, str(exc)[:200])
PY
} 2>&1 | tee "$OUT/env.txt"
grep -E "^(torch|device) " "$OUT/env.txt" | tee -a "$SUMMARY"
grep -E "MISSING" "$OUT/env.txt" | tee -a "$SUMMARY"

if [ "$DRY" != "1" ]; then
  if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    say "RESULT: $PY sees no CUDA device: nothing checked (exit 1)"
    exit 1
  fi
  if ! "$PY" -c "import diffusers, transformers, peft, accelerate, safetensors, pytest" 2>/dev/null; then
    say "RESULT: a package the trainer needs is missing (env.txt; carry .gpu-wheels made by --prepare) (exit 1)"
    exit 1
  fi
fi

wanted() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# --- tests ---------------------------------------------------------------------------------------------------------
TESTS_RC=0
if wanted tests; then
  start=$SECONDS
  limit=$(( $(left) < 150 ? $(left) : 150 ))
  if [ "$limit" -lt 60 ]; then
    say "tests: SKIPPED: ${limit} s left of the budget, they need ~60-150 s"
    TESTS_RC=1
  else
    run timeout -k 10 "$limit" "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py -rfEsxX \
      --junitxml "$OUT/pytest-junit.xml" 2>&1 | tee "$OUT/pytest.txt"
    TESTS_RC=${PIPESTATUS[0]}
    line=$(grep -E "(passed|failed|error|skipped|xfailed)" "$OUT/pytest.txt" | tail -1)
    if [ "$TESTS_RC" = "0" ] && grep -qE "[0-9]+ skipped" <<<"$line"; then
      TESTS_RC=1  # every selected test is a CUDA one: a skip here means CUDA was not usable
      line="$line (a CUDA test was skipped on a GPU machine: counted as a failure)"
    fi
    say "tests: rc ${TESTS_RC} in $((SECONDS - start)) s: ${line:-no pytest summary line}"
  fi
fi

# --- benchmark -----------------------------------------------------------------------------------------------------
BENCH_RC=0
# bench STAGE MIN_S ARGS...: bench_memory.py ARGS at 1024 px when at least MIN_S seconds are left, under a timeout of
# what is left (less a margin for the summary); the cases it finished are recorded even when the timeout stops it
bench() {
  local stage=$1 need=$2 start=$SECONDS limit rc
  shift 2
  limit=$(( $(left) - 15 ))
  if [ "$limit" -lt "$need" ]; then
    say "bench $stage: SKIPPED: ${limit} s left of the budget, it needs ~${need} s ($*)"
    return 0
  fi
  echo "== bench $stage: $* (timeout ${limit} s)" >>"$OUT/bench.log"
  run timeout -k 10 "$limit" "$PY" benchmarks/bench_memory.py "$@" --cuda-res 1024 --files-dir "$FILES_DIR" \
    --record "$OUT/memory-cuda.json" 2>&1 | tee "$OUT/bench-stage.log"
  rc=${PIPESTATUS[0]}
  cat "$OUT/bench-stage.log" >>"$OUT/bench.log"
  say "bench $stage: rc ${rc} in $((SECONDS - start)) s$([ "$rc" = 124 ] && echo ' (stopped by the timeout)')"
  grep -E "^(case=|# .*failed)" "$OUT/bench-stage.log" | sed 's/^/  /' | tee -a "$SUMMARY"
  rm -f "$OUT/bench-stage.log"
  remove_model_files
  [ "$rc" = "0" ] || BENCH_RC=$rc
}

# the bench stages in the order CRUCIBLE_GPU_STAGES names them (default: quick, sd3, flux)
for stage in $STAGES; do
  case $stage in
    quick) bench quick 150 --quick ;;
    sd3) bench sd3 120 --cases sd3-full-lowest sd3-full-low ;;
    flux) bench flux 240 --cases flux-lora-low flux-lora-lowest flux-lora-default ;;
    tests) ;;  # run first, above
    *) say "unknown stage '$stage' in CRUCIBLE_GPU_STAGES (known: tests quick sd3 flux)"; BENCH_RC=1 ;;
  esac
done

# --- result --------------------------------------------------------------------------------------------------------
if [ "$DRY" = "1" ]; then
  say "RESULT: dry run, nothing ran (exit 0); outputs would be in $OUT"
  exit 0
fi
if [ "$TESTS_RC" != "0" ]; then
  STATUS=1
elif [ "$BENCH_RC" != "0" ]; then
  STATUS=2
else
  STATUS=0
fi
say "RESULT: tests rc ${TESTS_RC}, bench rc ${BENCH_RC}, $SECONDS s in all (exit ${STATUS}); files in $OUT"
exit "$STATUS"
