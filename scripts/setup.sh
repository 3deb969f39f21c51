#!/usr/bin/env bash
# Install OuroMamba Studio on a fresh Debian machine with Python 3.11: Debian packages, then a venv in .venv.
#   scripts/setup.sh          the app (Fashion-MNIST from Debian, Python dependencies)
#   scripts/setup.sh --dev    also the test tools (pytest, ruff, Playwright's driver, Debian's Chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0
[ "${1:-}" = "--dev" ] && dev=1

apt_packages=(dataset-fashion-mnist)
[ "$dev" = 1 ] && apt_packages+=(chromium)
missing=()
for p in "${apt_packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
extras=""; [ "$dev" = 1 ] && extras="[dev]"
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q -e ".$extras"
.venv/bin/python - <<'PY'
import torch
print(f"torch {torch.__version__} (CUDA build {torch.version.cuda}, CUDA available: {torch.cuda.is_available()})")
PY
