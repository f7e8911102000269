"""docker/Dockerfile, checked statically (no Docker engine runs here)."""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()


def test_base_image_and_megatron_lm_are_pinned():
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE, re.M).group(1)
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base), base
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", DOCKERFILE, re.M)
    ref = re.search(r"^ARG MEGATRON_LM_REF=(\S+)$", DOCKERFILE, re.M).group(1)
    assert re.fullmatch(r"core_v0\.19\.\d+", ref)
    assert "--branch ${MEGATRON_LM_REF}" in DOCKERFILE


def test_package_is_installed_and_its_sources_exist():
    assert re.search(r"pip install [^\n]*--no-deps /opt/megatron-hybridnorm", DOCKERFILE)
    for src in re.findall(r"^COPY (.+) /opt/megatron-hybridnorm/?\S*$", DOCKERFILE, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), path
    # the dependencies the no-deps install skips are installed by name
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {re.match(r"[A-Za-z0-9_-]+", d).group(0) for d in project["dependencies"]}
    for dep in deps - {"torch", "megatron-core", "numpy"}:  # torch and numpy: in the image
        assert re.search(rf"pip install [^\n]*\b{dep}\b", DOCKERFILE), dep
    assert "ENV MEGATRON_LM=/opt/Megatron-LM" in DOCKERFILE
    assert "WORKDIR /opt/Megatron-LM" in DOCKERFILE


@pytest.mark.slow
def test_entry_points_import_from_an_installed_copy_run_from_another_directory(tmp_path):
    """As in the image: a non-editable install, imported with Megatron-LM's folder as cwd."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(site), str(ROOT)], check=True, capture_output=True)
    cwd = tmp_path / "Megatron-LM"
    cwd.mkdir()
    (cwd / "pretrain_gpt.py").write_text("")
    code = ("import megatron_hybridnorm.entrypoints as e, megatron_hybridnorm.inspect, "
            "megatron_hybridnorm.train.cli; print(e.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith(str(site))
