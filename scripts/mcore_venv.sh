#!/usr/bin/env bash
# A venv for one megatron-core version (and optionally another torch), beside the project's .venv:
#   scripts/mcore_venv.sh 0.17.1                 megatron-core 0.17.1 from PyPI
#   scripts/mcore_venv.sh path/to/megatron_core-0.20.0-*.whl
#   TORCH=2.9.1 scripts/mcore_venv.sh 0.19.2     with another torch (a download of its own)
#   BRIDGE=0.6.2 scripts/mcore_venv.sh 0.19.2    with Megatron-Bridge (tests/test_bridge.py)
# It prints the venv's python. The venv is .venv-mcore/<name>: a new venv whose site-packages are
# hard links to .venv's (no second torch download, no extra disk), less megatron-core, which is
# then installed with --no-deps. megatron is a namespace package, so a .pth onto .venv would let
# one version's megatron.training leak into another's: hence the copy.
set -euo pipefail
cd "$(dirname "$0")/.."
spec=${1:?usage: scripts/mcore_venv.sh VERSION|WHEEL}

[ -x .venv/bin/python ] || { echo "error: .venv missing: run scripts/dev.sh test --collect-only first" >&2; exit 1; }
name=$(basename "$spec" | sed -E 's/^megatron_core-([^-]+)-.*/\1/')
[ -n "${TORCH:-}" ] && name="$name-torch$TORCH"
[ -n "${BRIDGE:-}" ] && name="$name-bridge$BRIDGE"
dest=.venv-mcore/$name
stamp="$dest/.ready-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  rm -rf "$dest"
  base=$(.venv/bin/python -c 'import sys; print(sys.base_prefix)')
  "$base/bin/python3" -m venv --without-pip "$dest"
  src=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  dst=$("$dest/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  rmdir "$dst" 2>/dev/null || rm -rf "$dst"
  cp -al "$src" "$dst"
  rm -rf "$dst"/megatron "$dst"/megatron_core-*.dist-info
  pip=("$dest/bin/python" -m pip -q --disable-pip-version-check)
  if [ -n "${TORCH:-}" ]; then
    "${pip[@]}" uninstall -y torch triton >/dev/null
    "${pip[@]}" install "torch==$TORCH" 2>&1 | grep -v '^WARNING: Location' || true
  fi
  if [ -f "$spec" ]; then
    "${pip[@]}" install --no-deps "$spec"
  else
    "${pip[@]}" install --no-deps "megatron-core==$spec" 2>&1 | grep -v '^WARNING: Location' || true
  fi
  if [ -n "${BRIDGE:-}" ]; then
    # Megatron-Bridge's full requirement set does not install here (fast-hadamard-transform
    # builds a CUDA extension): the wheel alone, then what its import and pretrain() need, none
    # of them allowed to replace a package the venv has (torch, transformers, ...)
    "${pip[@]}" freeze --exclude-editable | grep -v '^megatron' > "$dest/constraints.txt"
    "${pip[@]}" install -c "$dest/constraints.txt" omegaconf hydra-core einops six datasets \
      "megatron-energon~=7.0" tensorboard nvidia-modelopt requests IPython 2>&1 | grep -v '^WARNING: Location' || true
    "${pip[@]}" install --no-deps "megatron-bridge==$BRIDGE" 2>&1 | grep -v '^WARNING: Location' || true
    "$dest/bin/python" -c 'import importlib.util as u; assert u.find_spec("megatron.bridge")' ||
      { echo "error: megatron-bridge $BRIDGE did not install into $dest" >&2; exit 1; }
  fi
  "$dest/bin/python" -c 'import megatron.core, torch' 2>/dev/null || { echo "error: $dest does not import" >&2; exit 1; }
  touch "$stamp"
fi
echo "$dest/bin/python"
