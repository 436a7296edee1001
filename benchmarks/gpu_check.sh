#!/usr/bin/env bash
# The GPU check, on one H100/H200 whose Python already has torch, transformers and safetensors,
# with no vLLM and no network. Finishes in under 8 minutes; prints one summary table and writes it
# to OUT/gpu_check.md (exit code 0 when every check passes). What it checks: benchmarks/README.md.
#
#   benchmarks/gpu_check.sh [OUT] [--bundle DIR] [extra gpu_check.py options]
#
#   OUT           where the summary and the work files go (default: gpu-check)
#   --bundle DIR  files prepared on a machine with network (see benchmarks/README.md):
#                   DIR/wheels/  wheels of what the GPU machine's Python lacks (pydantic, psutil, ...),
#                                installed with --no-index
#                   DIR/zoo/     a toy zoo built with `scf zoo build --out DIR/zoo` (2.3 MB); needed
#                                when lm-eval is not installed here (the zoo build scores with it)
#   PYTHON        the interpreter to use (default: python3)
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=gpu-check
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then OUT=$1; shift; fi
BUNDLE=""
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --bundle) BUNDLE=$2; shift 2 ;;
        *) EXTRA+=("$1"); shift ;;
    esac
done
mkdir -p "$OUT"

# 1. This package, without touching its dependencies (no network).
if ! "$PYTHON" -m pip install --quiet --no-deps --no-index --no-build-isolation -e . 2>"$OUT/pip-install.log"; then
    echo "gpu_check: 'pip install --no-deps -e .' failed (see $OUT/pip-install.log); using PYTHONPATH=$PWD" >&2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# 2. The small pure-Python dependencies the check imports, from the bundle when missing.
missing=$("$PYTHON" - <<'EOF'
import importlib.util
needed = {"torch": "torch", "transformers": "transformers", "safetensors": "safetensors",
          "pydantic": "pydantic", "psutil": "psutil", "yaml": "pyyaml", "tqdm": "tqdm", "numpy": "numpy"}
print(" ".join(pkg for module, pkg in needed.items() if importlib.util.find_spec(module) is None))
EOF
)
if [ -n "$missing" ]; then
    if [ -n "$BUNDLE" ] && [ -d "$BUNDLE/wheels" ]; then
        "$PYTHON" -m pip install --quiet --no-index --find-links "$BUNDLE/wheels" $missing
    else
        echo "gpu_check: this Python lacks: $missing. Download their wheels on a machine with network" >&2
        echo "  (pip download $missing -d BUNDLE/wheels --only-binary=:all: --python-version X.Y)" >&2
        echo "  and pass --bundle BUNDLE." >&2
        exit 2
    fi
fi

# 3. The toy zoo: built here on the CPU when lm-eval is installed, else taken from the bundle.
ZOO_ARGS=()
if [ -n "$BUNDLE" ] && [ -d "$BUNDLE/zoo" ]; then
    ZOO_ARGS=(--zoo "$BUNDLE/zoo")
elif ! "$PYTHON" -c "import lm_eval" 2>/dev/null; then
    echo "gpu_check: lm-eval is not installed here, so the toy zoo cannot be built (its cards are scored" >&2
    echo "  with lm-eval): run 'scf zoo build --out BUNDLE/zoo' on any machine and pass --bundle BUNDLE." >&2
    exit 2
fi

# 4. The check itself; every GPU step runs in a child process of it.
exec timeout 480 "$PYTHON" benchmarks/gpu_check.py --device cuda --out "$OUT" \
    ${ZOO_ARGS[@]+"${ZOO_ARGS[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}
