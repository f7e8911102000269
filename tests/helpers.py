"""Small models and gradient plumbing shared by the tests: the check command's (one
implementation), and test-only helpers."""

from __future__ import annotations

from megatron_hybridnorm.check.builders import (  # noqa: F401 - re-exported for the tests
    SEQ,
    VOCAB,
    batch,
    build_gpt,
    randomize_norms,
    rel_err,
    small_config as tiny_config,
)
from megatron_hybridnorm.harness.layout_init import gather_full  # noqa: F401


def on_devices(argnames: str, cases, on_gpu=lambda *case: True):
    """Parametrize ``device`` (the conftest fixture) and ``argnames`` over ``cases``: every case
    on the CPU under Triton's interpreter, those ``on_gpu`` picks on CUDA too (marked gpu). The
    exhaustive grids run on the CPU; a GPU's minutes go to a representative subset."""
    import itertools

    import pytest

    cases = [c if isinstance(c, tuple) else (c,) for c in cases]
    params = [pytest.param(dev, *c, marks=[pytest.mark.gpu] if dev == "cuda" else [])
              for dev, c in itertools.chain((("cpu", c) for c in cases),
                                            (("cuda", c) for c in cases if on_gpu(*c)))]
    return pytest.mark.parametrize(f"device,{argnames}", params, indirect=["device"])
