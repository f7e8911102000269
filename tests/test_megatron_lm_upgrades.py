"""A checkpoint Megatron-LM saved on one megatron-core, resumed by Megatron-LM on another: on
every newer version it resumes and its model computes the same loss; on 0.16 to 0.18 one saved
on 0.19 or later (whose common state moved into the shards) is refused before loading, with the
version to use.

Needs every version's python: ``MCORE_VERSION_PYTHONS="0.16.1=PATH,0.17.1=PATH,..."`` (the
version matrix, scripts/version_matrix.py, sets it after building each version's venv), and each
version's Megatron-LM tree (megatron_lm_loop.tree_for).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from megatron_lm_loop import BASE, SPEC, rehearse_many, tree_for

pytestmark = pytest.mark.slow

ENV = "MCORE_VERSION_PYTHONS"


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in version.split(".")[:3])


def _pythons() -> dict[str, str]:
    pairs = [p.split("=", 1) for p in os.environ.get(ENV, "").split(",") if "=" in p]
    return dict(sorted(((v, py) for v, py in pairs), key=lambda vp: _key(vp[0])))


PYTHONS = _pythons()
if len(PYTHONS) < 2:
    pytest.skip(f"set {ENV}=VERSION=PYTHON,... (two megatron-core versions at least) to run "
                "these; the version matrix does", allow_module_level=True)
TREES = {v: tree_for(v) for v in PYTHONS}
MISSING = [f"{v}: {why}" for v, (tree, why) in TREES.items() if tree is None]
if MISSING:
    pytest.skip("; ".join(MISSING), allow_module_level=True)
VERSIONS = list(PYTHONS)
PAIRS = [(old, new) for i, old in enumerate(VERSIONS) for new in VERSIONS[i + 1:]]
NEW_FORMAT = (0, 19)  # common state inside the shards, from 0.19
DOWNGRADES = [(new, old) for old, new in PAIRS
              if _key(new)[:2] >= NEW_FORMAT and _key(old)[:2] < NEW_FORMAT]


def _spec(scheme="hybridnorm_star"):
    return ["--spec", SPEC, scheme]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{version: Megatron-LM's save folder}: 10 iterations, saved at 5 and 10."""
    out = tmp_path_factory.mktemp("upgrades")
    folders = {v: out / f"saved_on_{v}" for v in VERSIONS}
    runs = rehearse_many(out, [dict(name=f"save_{v}", nproc=1, python=PYTHONS[v],
                                    tree=TREES[v][0], args=[*BASE, *_spec(), "--save",
                                                            str(folders[v]), "--save-interval",
                                                            "5"]) for v in VERSIONS])
    for run in runs.values():
        run.assert_trained()
    return out, folders


def _loads(saved, pairs, kind):
    """{(saved on, loaded on): Megatron-LM resuming that checkpoint from iteration 5}."""
    out, folders = saved
    jobs = [dict(name=f"{kind}_{old}_on_{new}", nproc=1, python=PYTHONS[new], tree=TREES[new][0],
                 args=[*BASE, *_spec(), "--load", str(folders[old]), "--ckpt-step", "5"])
            for old, new in pairs]
    runs = rehearse_many(out, jobs)
    return {(old, new): runs[f"{kind}_{old}_on_{new}"] for old, new in pairs}


@pytest.fixture(scope="module")
def resumed(saved):
    return _loads(saved, PAIRS, "resume")


@pytest.fixture(scope="module")
def refused(saved):
    return _loads(saved, DOWNGRADES, "refuse")


@pytest.fixture(scope="module")
def losses(saved):
    """{(saved on, loaded on): the loss on fixed tokens}, each version loading every checkpoint
    saved on it or before (tests/megatron_lm_logits.py)."""
    _, folders = saved
    here = Path(__file__).parent
    found = {}
    for i, v in enumerate(VERSIONS):
        mine = [str(folders[old]) for old in VERSIONS[:i + 1]]
        proc = subprocess.run([PYTHONS[v], str(here / "megatron_lm_logits.py"),
                               str(TREES[v][0]), *mine], capture_output=True, text=True,
                              cwd=here.parent, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        lines = [line.split() for line in proc.stdout.splitlines() if line.count(" ") == 2]
        by_folder = {folder: float(loss) for _, folder, loss in lines}
        for old in VERSIONS[:i + 1]:
            found[old, v] = by_folder[str(folders[old])]
    return found


@pytest.mark.parametrize("old,new", PAIRS, ids=[f"{o}-to-{n}" for o, n in PAIRS])
def test_a_checkpoint_resumes_on_a_newer_version(resumed, losses, old, new):
    run = resumed[old, new]
    assert run.returncode == 0, run.tail()
    assert sorted(run.logged) == [6, 7, 8, 9, 10], run.tail()
    # the same weights: the newer version's model of the checkpoint computes the saver's loss
    assert abs(losses[old, new] - losses[old, old]) < 1e-6, (losses[old, new], losses[old, old])


@pytest.mark.parametrize("new,old", DOWNGRADES, ids=[f"{n}-to-{o}" for n, o in DOWNGRADES])
def test_a_newer_format_checkpoint_is_refused_on_an_older_version(refused, new, old):
    run = refused[new, old]
    assert run.returncode != 0 and not run.logged, run.tail()
    assert "was saved by megatron-core 0.19 or later" in run.log, run.tail()
    assert "resume it on megatron-core >= 0.19" in run.log
