#!/usr/bin/env bash
# Installs dfkd-bench and everything it needs on a fresh Debian/Ubuntu machine (or in a venv).
# torch is pinned through constraints.txt so that torchvision/timm never pull another (CUDA) build.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
    || echo "note: could not install dataset-fashion-mnist; Fashion-MNIST will be downloaded by torchvision when online" >&2
fi
TORCH=$(grep -E '^torch==' constraints.txt)
$PY -m pip install -q "$TORCH"
$PY -m pip install -q -c constraints.txt -e ".[test]"
echo "dfkd-bench installed: $(command -v bench)"
