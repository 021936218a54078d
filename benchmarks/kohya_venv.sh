#!/usr/bin/env bash
# A separate venv for kohya sd-scripts, for `bench_memory.py --kohya DIR --kohya-python VENV/bin/python`.
# Usage: bash benchmarks/kohya_venv.sh SD_SCRIPTS_DIR [VENV_DIR=/tmp/kohya-venv]
# kohya's requirements.txt is installed as pinned, with these changes (the CPU machine this was written on):
#  - torch: kohya leaves it to the user; the CPU wheel torch==2.13.0 (pinned, so nothing pulls a CUDA torch);
#  - torchvision (kohya imports torchvision.transforms): 0.28.0, the release for torch 2.13. On PyPI it is a CUDA
#    build whose C ops cannot load beside a CPU torch; torchvision copes except for two unguarded register_fake()
#    calls, guarded here (kohya only uses its pure-Python transforms) - as the ComfyUI CPU install script does;
#  - bitsandbytes left out (8-bit optimizers need CUDA; no CPU case uses them); `-e .` installed with --no-deps.
set -euo pipefail
KOHYA="$(cd "${1:?usage: kohya_venv.sh SD_SCRIPTS_DIR [VENV_DIR]}" && pwd)"
VENV="${2:-/tmp/kohya-venv}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/python" -c 'import torch;print("torch==" + torch.__version__.split("+")[0])' > "$VENV/torch-pin.txt"
grep -v -E '^\s*(#|$|bitsandbytes|-e )' "$KOHYA/requirements.txt" > "$VENV/kohya-req.txt"
"$VENV/bin/pip" install -q -c "$VENV/torch-pin.txt" -r "$VENV/kohya-req.txt" torchvision==0.28.0
(cd "$KOHYA" && "$VENV/bin/pip" install -q --no-deps -e .)
TV="$("$VENV/bin/python" -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')/torchvision/_meta_registrations.py"
sed -i -E 's/^@torch\.library\.register_fake\(("torchvision::[a-z_]+")\)$/@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda f: f))/' "$TV"
(cd "$KOHYA" && "$VENV/bin/python" train_network.py --help > /dev/null)
echo "kohya venv ready: $VENV/bin/python"
