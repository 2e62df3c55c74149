#!/usr/bin/env bash
# Create one venv per finetuning framework under /work/fw_venvs/NAME (outside the repo) and install the framework,
# then fam_hf from this repo (editable, --no-deps: the framework's own transformers/trl stay), then whatever fam_hf
# needs that the framework did not bring.
#
#   bash tests/frameworks/setup.sh llamafactory     # LLaMA-Factory 0.9.5
#   bash tests/frameworks/setup.sh axolotl          # axolotl 0.19 (about 6 minutes)
#   bash tests/frameworks/setup.sh st               # sentence-transformers 6.x and setfit 1.2 (and TRL), one venv
#   bash tests/frameworks/setup.sh all
#
# Torch is always the CPU build (torch==2.13.0 lies in /opt/wheels here; an open pin would download a CUDA build).
# FW_VENVS overrides the venvs' folder, PYTHON the interpreter (3.11), FW_TORCH the torch pin.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENVS="${FW_VENVS:-/work/fw_venvs}"
PYTHON="${PYTHON:-python3.11}"
TORCH="${FW_TORCH:-torch==2.13.0}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 AXOLOTL_DO_NOT_TRACK=1 DO_NOT_TRACK=1

make_venv() {  # make_venv NAME -> creates the venv (fresh) and a constraints file pinning torch
    local venv="$VENVS/$1"
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip setuptools wheel
    echo "$TORCH" >"$venv/fw-constraints.txt"
}

pip_in() {  # pip_in NAME ARGS...: pip of that venv, torch held at the CPU pin
    local venv="$VENVS/$1"; shift
    nice -n 10 "$venv/bin/pip" install -c "$venv/fw-constraints.txt" "$@"
}

fam_hf_in() {  # fam_hf editable without its dependencies, then the ones the framework did not bring
    local venv="$VENVS/$1"
    pip_in "$1" --no-deps -e "$REPO"
    # fam_hf's own requirements (pyproject.toml); pip leaves those already satisfied as they are
    pip_in "$1" "torch>=2.4,<2.14" "transformers>=4.46" "accelerate>=1.0" "datasets>=2.20" tqdm safetensors
}

# A CUDA torchvision/torchaudio wheel that does not load against the CPU torch: remove torchvision (nothing here
# needs it), and move torchaudio's compiled extensions aside so that its Python part still imports (LLaMA-Factory
# imports torchaudio unconditionally).
fix_vision_audio() {
    local py="$VENVS/$1/bin/python"
    if "$py" -c "import torchvision" 2>/dev/null; then :; elif "$py" -m pip show -q torchvision 2>/dev/null; then
        echo "torchvision does not import against this torch: uninstalling it"
        "$py" -m pip uninstall -y torchvision
    fi
    if "$py" -m pip show -q torchaudio 2>/dev/null && ! "$py" -c "import torchaudio" 2>/dev/null; then
        local dir; dir="$("$py" -c "import importlib.util as u; print(u.find_spec('torchaudio').submodule_search_locations[0])")"
        echo "torchaudio does not import against this torch: moving its .so files aside in $dir"
        find "$dir" -name "*.so" -exec mv {} {}.disabled \;
        "$py" -c "import torchaudio; print('torchaudio', torchaudio.__version__, 'imports now')"
    fi
}

versions() {
    "$VENVS/$1/bin/python" - <<'PY'
import importlib.metadata as m
for name in ["torch", "transformers", "trl", "peft", "accelerate", "datasets", "llamafactory", "axolotl",
             "sentence-transformers", "setfit", "torchvision", "torchaudio", "deepspeed", "fam_hf"]:
    try:
        print(f"  {name}=={m.version(name)}")
    except m.PackageNotFoundError:
        pass
PY
}

setup_one() {
    local name="$1" start=$SECONDS
    echo "== $name: $VENVS/$name"
    case "$name" in
        llamafactory)
            make_venv "$name"
            # 0.9.5 pins transformers>=4.55,<=5.6.0 and trl<=0.24 itself
            pip_in "$name" "$TORCH" "llamafactory==0.9.5"
            fix_vision_audio "$name"
            fam_hf_in "$name"
            fix_vision_audio "$name"
            ;;
        axolotl)
            make_venv "$name"
            pip_in "$name" "$TORCH" "axolotl==0.19.*"
            fix_vision_audio "$name"
            fam_hf_in "$name"
            fix_vision_audio "$name"
            ;;
        st)
            make_venv "$name"
            pip_in "$name" "$TORCH" "sentence-transformers>=6,<7" "setfit==1.2.*"
            # TRL >= 1.0 too (fam_hf's FAMSFTTrainer needs it): the venv also runs the TRL case
            pip_in "$name" "trl>=1.0"
            fix_vision_audio "$name"
            fam_hf_in "$name"
            fix_vision_audio "$name"
            ;;
        *) echo "unknown framework $name (llamafactory, axolotl, st, all)" >&2; return 2 ;;
    esac
    "$VENVS/$name/bin/pip" check || true
    "$VENVS/$name/bin/python" -c "import fam_hf, fam_hf.launch; print('fam_hf imports from', fam_hf.__file__)"
    versions "$name" | tee "$VENVS/$name/fw-versions.txt"
    echo "== $name done in $((SECONDS - start)) s"
}

if [ $# -ne 1 ]; then echo "usage: $0 (llamafactory | axolotl | st | all)" >&2; exit 2; fi
if [ "$1" = all ]; then
    for name in llamafactory axolotl st; do setup_one "$name"; done   # one at a time: 2 cores, shared memory
else
    setup_one "$1"
fi
