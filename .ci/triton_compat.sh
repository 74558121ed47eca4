#!/usr/bin/env bash
# The GPU machines run an older Triton than CI (3.6.0 against 3.8.0). Compile every kernel
# variant for sm_90 with that version too, through Triton's own launcher (the launcher test of
# tests/kernels/test_triton_compile.py: a superset of the recorded launches, plus everything the
# GPU tests launch), in a venv over the host's site-packages with only triton replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${ZOO_GPU_TRITON:-3.6.0}"
T="$(mktemp -d)"
trap 'rm -rf "$T"' EXIT
start=$SECONDS
python -m venv --system-site-packages "$T/venv"
"$T/venv/bin/python" -m pip install -q --no-deps "triton==$VERSION"
"$T/venv/bin/python" - "$VERSION" <<'PY'
import sys, triton
assert triton.__version__ == sys.argv[1], f"the venv has triton {triton.__version__}, not {sys.argv[1]}"
PY
ZOO_TRITON_COMPILER_PYTHON="$T/venv/bin/python" python -m pytest -q -p no:cacheprovider \
    tests/kernels/test_triton_compile.py::test_every_kernel_variant_compiles_through_the_triton_launcher
echo "== triton $VERSION compile check passed [$((SECONDS - start)) s]"
