#!/usr/bin/env bash
# Creates .venv with the pinned requirements and, as root with apt, the system packages q8
# uses: Fashion-MNIST (dataset-fashion-mnist). Safe to rerun: each step is skipped when done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.installed-$(sha1sum requirements.txt | cut -c1-12)
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
  rm -f .venv/.installed-* && touch "$stamp"
fi
apt_install() {  # apt_install PACKAGE...: install missing Debian packages when we can
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "${missing[@]}"; }) >/dev/null
  else
    echo "setup: not root or no apt-get; skipping ${missing[*]}" >&2
  fi
}
apt_install dataset-fashion-mnist
