#!/usr/bin/env bash
# Fetch test-only oracles into .oracles/ (git-ignored).
# uncertainty-metrics 0.0.81 (Google's calibration metrics, numpy backend) ships metadata that pip >= 24.1
# rejects, so an old pip in a throw-away venv downloads the wheel and we unpack it; the tests load one
# numpy-only file from it (general_calibration_error.py).
set -euo pipefail
dest="${1:-.oracles}"
[ -f "$dest/uncertainty_metrics/numpy/general_calibration_error.py" ] && exit 0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q "pip<24.1"
"$tmp/venv/bin/python" -m pip download -q --no-deps "uncertainty-metrics==0.0.81" -d "$tmp/wheel"
mkdir -p "$dest"
python3 -m zipfile -e "$tmp"/wheel/uncertainty_metrics-0.0.81-*.whl "$dest"
echo "oracles in $dest"
