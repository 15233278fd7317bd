#!/usr/bin/env bash
# Build an isolated venv holding the PyPI `angelslim` package, apart from the project's .venv: angelslim
# pulls ray, lm_eval, datasets, triton... (~3 GB here; ~6.5 GB if pip is left to pick a CUDA torch).
# Usage: bash tools/angelslim/build_env.sh [VENV_DIR]   (default .venv-angelslim; idempotent)
# See tools/angelslim/README.md for why each pin and workaround is there.
set -euo pipefail

VENV_DIR="${1:-.venv-angelslim}"
PYTHON="${PYTHON:-python3.11}"
ANGELSLIM_VERSION="0.5.0"
TORCH_VERSION="2.13.0"          # the project's CPU torch; angelslim only needs torch>=2.6
TRANSFORMERS_VERSION="5.23.0"   # 5.24.0 removed transformers.modeling_attn_mask_utils, which angelslim imports
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STAMP="$VENV_DIR/.angelslim-$ANGELSLIM_VERSION-built"

if [ -f "$STAMP" ]; then
    echo "angelslim env already built: $VENV_DIR"
    exit 0
fi

test -x "$VENV_DIR/bin/python" || "$PYTHON" -m venv "$VENV_DIR"
PY="$VENV_DIR/bin/python"
# uv, given the sources pip is configured with (tools/uv_sources.py), installs what pip would in a fraction
# of the time; bytecode is compiled at install because PYTHONDONTWRITEBYTECODE may be set.
"$PY" -m pip install --quiet "${UV_VERSION:-uv==0.13.9}"
UV="$VENV_DIR/bin/uv"
SOURCES="$("$PY" "$HERE/../uv_sources.py")"  # an assignment, so that set -e stops on a failure to read them
# Pinning torch in the same resolution keeps the CPU torch: alone, `angelslim` takes the newest
# torchvision, which requires a newer (CUDA) torch.
# shellcheck disable=SC2086  # the sources are separate arguments
"$UV" pip install --quiet --python "$PY" $SOURCES --compile-bytecode "angelslim==$ANGELSLIM_VERSION" \
    "torch==$TORCH_VERSION" "transformers==$TRANSFORMERS_VERSION"
# The only torchvision builds the index offers are CUDA builds; with the CPU torch their C++ ops fail to
# register and transformers' lazy import of Qwen3 then fails. angelslim's LLM PTQ never imports torchvision.
"$UV" pip uninstall --quiet --python "$PY" torchvision
"$PY" - "$TORCH_VERSION" <<'PY'
import importlib.metadata as md
import sys

torch_version = md.version("torch")
print(f"torch in the angelslim env: {torch_version}")
if not torch_version.startswith(sys.argv[1]):
    sys.exit(f"the install replaced torch {sys.argv[1]} by {torch_version}; review build_env.sh")
PY

# Add stand-ins for angelslim.compressor.qat, which the 0.5.0 wheel lacks (verified, idempotent).
"$PY" "$HERE/patch_env.py"
"$PY" -c "from angelslim.engine import Engine; print('angelslim Engine imports OK')"
touch "$STAMP"
echo "angelslim env ready: $VENV_DIR"
