# Sourced by scripts/test.sh: a pinned onnxruntime from PyPI in ./.venv for the
# `sdkit tag` tests (sdkit loads libonnxruntime at run time). Quick when present.
ORT_VERSION=1.31.1
if ! .venv/bin/python -c "import onnxruntime, sys; sys.exit(onnxruntime.__version__ != '$ORT_VERSION')" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check "onnxruntime==$ORT_VERSION"
fi
ORT_DYLIB_PATH=$(ls "$PWD"/.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* | head -n 1)
export ORT_DYLIB_PATH
