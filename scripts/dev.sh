#!/usr/bin/env bash
# One entry point that sets everything up on a fresh machine, then runs the main job or the tests.
#   scripts/dev.sh train [flags]   the main job
#   scripts/dev.sh test  [pytest args]
# It finds a Python >= 3.12 ($PYTHON, python3.12/python3.13 on PATH, or pyenv's versions), creates
# .venv and installs the package with its test and Hugging Face extras; later runs reuse the venv.
# It also fetches the second corpus (Jane Austen's novels, 1.6 MB from Debian) into the cache.
set -euo pipefail
cd "$(dirname "$0")/.."

is_312() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; }

find_python() {
  local c
  for c in "${PYTHON:-}" python3.12 python3.13 python3.14 python3; do
    [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && is_312 "$(command -v "$c")" && { command -v "$c"; return; }
  done
  for c in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3; do
    [ -x "$c" ] && is_312 "$c" && { echo "$c"; return; }
  done
  echo "error: no Python >= 3.12 found (megatron-core needs it). Set PYTHON=/path/to/python3.12," \
       "or install one (e.g. 'pyenv install 3.12')." >&2
  exit 1
}

VENV=.venv
STAMP="$VENV/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  if [ ! -x "$VENV/bin/python" ] || ! is_312 "$VENV/bin/python"; then
    PY=$(find_python)
    echo "setting up $VENV with $PY ($("$PY" --version))"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[test,hf,train]"
  rm -f "$VENV"/.installed-* && touch "$STAMP"
fi
# the second corpus (--corpus austen), once into the cache (apt-get download, by name), so that
# runs and tests need no network; where that fails the set-up still completes
"$VENV/bin/python" -m megatron_hybridnorm.train.corpora fetch austen --if-missing ||
  echo "warning: the austen corpus was not fetched (the reason is above): --corpus austen is" \
    "unavailable and its tests skip until 'python -m megatron_hybridnorm.train.corpora fetch" \
    "austen' succeeds" >&2

cmd=${1:-}
shift || true
case "$cmd" in
  train) exec "$VENV/bin/hybridnorm-train" "$@" ;;
  test) exec "$VENV/bin/python" -m pytest "$@" ;;
  *) echo "usage: scripts/dev.sh {train|test} [args...]" >&2; exit 2 ;;
esac
