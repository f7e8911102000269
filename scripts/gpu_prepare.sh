#!/usr/bin/env bash
# Fills .gpu/extra (git-ignored) with what scripts/gpu_check.py needs on a GPU machine that has
# no network, beyond torch, Triton, megatron-core and Transformer Engine:
#   .gpu/extra/wheels/       pytest and the small packages megatron-core's training code imports
#                            (the versions of this project's venv; installed there only if missing)
#   .gpu/extra/megatron-lm/  Megatron-LM's pretrain_gpt.py, gpt_builders.py and model_provider.py
#                            at core_v0.19.0, read from a Megatron-LM git repository (a clone or a
#                            bare mirror); never committed here
#
#   MEGATRON_LM_GIT=/path/to/Megatron-LM bash scripts/gpu_prepare.sh
# Then carry .gpu/extra with the call that runs `python3 scripts/gpu_check.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MEGATRON_LM_GIT:?set MEGATRON_LM_GIT to a Megatron-LM git repository with the tag core_v0.19.0}"
TAG=${MEGATRON_LM_TAG:-core_v0.19.0}
PY=${PY:-.venv/bin/python}
PACKAGES=(pytest pluggy iniconfig packaging psutil tqdm numpy)

rm -rf .gpu/extra && mkdir -p .gpu/extra/wheels .gpu/extra/megatron-lm
pins=$("$PY" -c 'import sys, importlib.metadata as m
print(" ".join(f"{p}=={m.version(p)}" for p in sys.argv[1:]))' "${PACKAGES[@]}")
# shellcheck disable=SC2086  # one pin per word
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .gpu/extra/wheels $pins 2>&1 | grep -v '^WARNING: Location' || true
for p in "${PACKAGES[@]}"; do
  ls .gpu/extra/wheels/"$p"-*.whl >/dev/null 2>&1 || { echo "error: no wheel of $p downloaded" >&2; exit 1; }
done
for f in pretrain_gpt.py gpt_builders.py model_provider.py; do
  git -C "$MEGATRON_LM_GIT" show "$TAG:$f" > ".gpu/extra/megatron-lm/$f"
done
echo "$TAG" > .gpu/extra/megatron-lm/TAG
du -sh .gpu/extra/wheels .gpu/extra/megatron-lm
