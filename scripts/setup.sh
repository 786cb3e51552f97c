#!/usr/bin/env bash
# Creates .venv with the pinned development set (requirements-dev.txt) and senet installed editable.
# Idempotent: a second run only checks what is there. Python >= 3.10 must be on PATH as python3.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.senet-setup
want=$(cat requirements-dev.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt 2>&1 \
        | grep -v "is ignored: it is neither a file nor a directory" || true
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e . 2>&1 \
        | grep -v "is ignored: it is neither a file nor a directory" || true
    .venv/bin/python -c "import torch, torchvision, senet; print('senet', senet.__version__, 'torch', torch.__version__, 'torchvision', torchvision.__version__)"
    echo "$want" > "$stamp"
fi
