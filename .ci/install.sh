#!/usr/bin/env bash
# Create the virtual environment and install maestro with its test extra.
# CPU machines get the CPU build of torch (never the CUDA wheels); CUDA machines get the CUDA
# build and PyTorch SDPA attention. flash-attn is opt-in (a source build can take 30 minutes):
# FLASH_ATTN_WHEELS=dir installs a prebuilt wheel from a local folder, FLASH_ATTN=1 builds it.
set -euo pipefail
venv=${1:-.venv}
torch_version=2.13.0
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
export DS_BUILD_OPS=0 PIP_DISABLE_PIP_VERSION_CHECK=1

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    cuda=1
    "$py" -m pip install -q "torch==${torch_version}"
else
    cuda=0
    # A local CPU wheel (find-links) satisfies this directly; elsewhere the PyTorch CPU index does.
    "$py" -m pip install -q "torch==${torch_version}+cpu" 2>/dev/null \
        || "$py" -m pip install -q --index-url https://download.pytorch.org/whl/cpu "torch==${torch_version}+cpu"
fi

# Pin the torch that is now installed so that nothing below replaces it.
installed=$("$py" -c "import torch; print(torch.__version__)")
{ cat constraints.txt; echo "torch==${installed}"; } > "$venv/constraints.txt"
"$py" -m pip install -q -c "$venv/constraints.txt" -e ".[test]"

if [ "$cuda" = 1 ] && [ -n "${FLASH_ATTN_WHEELS:-}" ]; then
    "$py" -m pip install -q --no-index --find-links "$FLASH_ATTN_WHEELS" -c "$venv/constraints.txt" \
        "flash-attn>=2.6" \
        || echo "no flash-attn wheel for this torch and CUDA in $FLASH_ATTN_WHEELS; model.attention=sdpa is used"
elif [ "$cuda" = 1 ] && [ "${FLASH_ATTN:-0}" = 1 ]; then
    # flash-attn ships no binary wheels on the registry; a source build needs nvcc and can take long.
    MAX_JOBS=${MAX_JOBS:-8} timeout 1800 "$py" -m pip install -q --no-build-isolation \
        -c "$venv/constraints.txt" "flash-attn>=2.6" \
        || echo "flash-attn could not be installed here; model.attention=sdpa (the default) is used"
elif [ "$cuda" = 1 ]; then
    echo "flash-attn not installed (FLASH_ATTN=1 builds it, FLASH_ATTN_WHEELS=dir installs a wheel); model.attention=sdpa is used"
fi
"$py" -m pip check
echo "installed: torch ${installed} (cuda=${cuda}) into ${venv}"
