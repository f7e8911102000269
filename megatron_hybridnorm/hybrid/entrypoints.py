"""Entry points for Megatron-LM's ``pretrain_hybrid.py``:
``--spec megatron_hybridnorm.hybrid.entrypoints <scheme> --hybrid-layer-pattern '*-*-...'``.

One stack spec per scheme: ``pretrain_hybrid.py`` imports the object and calls nothing, so the
stack reads at build time what ``--spec`` cannot pass: the pattern (``--hybrid-layer-pattern``),
the backend (``--transformer-impl``) and the scheme options from the environment, as the GPT
entry points do (``HYBRIDNORM_QKV_NORM``, ``HYBRIDNORM_MIXLN_FRACTION``,
``HYBRIDNORM_TE_FFN_NORM``). At start-up rank 0 prints ``megatron-hybridnorm: built <scheme>
hybrid stack ...``: Megatron-LM 0.19 builds its default stack when a ``--spec`` module fails
to import, and only logs it. A ``--load`` of another scheme is refused before anything loads.
"""

from __future__ import annotations

from megatron.core.transformer.spec_utils import ModuleSpec

from ..entrypoints import (
    _megatron_lm_args,
    _megatron_lm_load_path,
    _rank0,
    check_load_matches,
    options_from_env,
    untested_notes,
)
from ..schemes import SCHEMES
from .specs import megatron_layer_specs
from .stack import HybridNormStack, HybridNormStackSubmodules


class MegatronLMHybridNormStack(HybridNormStack):
    """``HybridNormStack`` configured from Megatron-LM's arguments and the environment."""

    def __init__(self, config, submodules, *, scheme: str, **kwargs):
        use_te = getattr(config, "transformer_impl", "transformer_engine") == "transformer_engine"
        options, notes = options_from_env(scheme)
        notes = notes + check_load_matches(scheme, options, _megatron_lm_load_path(), __name__)
        notes = notes + untested_notes(scheme, config, _megatron_lm_args())
        super().__init__(config, submodules, scheme=scheme, use_transformer_engine=use_te,
                         options=options, **kwargs)
        if _rank0():
            shown = ", ".join(f"{k}={v}" for k, v in options.items())
            ours = sum(1 for layer in self.layers if hasattr(layer, "norms"))
            print(f"megatron-hybridnorm: built {scheme}{f' ({shown})' if shown else ''} hybrid "
                  f"stack on {'transformer_engine' if use_te else 'local'} modules, pattern "
                  f"{self.hybrid_layer_pattern!r}, {len(self.layers)} layers on this stage "
                  f"({ours} with the scheme's norms)", flush=True)
            for note in notes:
                print(f"megatron-hybridnorm: {note}", flush=True)


def _make(scheme: str) -> ModuleSpec:
    return ModuleSpec(module=MegatronLMHybridNormStack, params={"scheme": scheme},
                      submodules=HybridNormStackSubmodules(**megatron_layer_specs()))


prenorm = _make("prenorm")
postnorm = _make("postnorm")
postnorm_official = _make("postnorm_official")
prenorm_qknorm = _make("prenorm_qknorm")
mixln = _make("mixln")
mixln_official = _make("mixln_official")
hybridnorm = _make("hybridnorm")
hybridnorm_star = _make("hybridnorm_star")

ENTRY_POINTS = {s: globals()[s] for s in SCHEMES}  # one for every scheme (a KeyError if not)
