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

from megatron_hybridnorm.models.gpt.entrypoints import from_megatron_lm, start_up_line
from megatron_hybridnorm.schemes import SCHEMES, Scheme, get_scheme
from megatron_hybridnorm.models.hybrid.layer_specs import megatron_layer_specs
from megatron_hybridnorm.models.hybrid.stack import HybridNormStack, HybridNormStackSubmodules


class MegatronLMHybridNormStack(HybridNormStack):
    """``HybridNormStack`` configured from Megatron-LM's arguments and the environment."""

    def __init__(self, config, submodules, *, scheme: Scheme, **kwargs):
        use_te, options, notes = from_megatron_lm(scheme, config,
                                                  "megatron_hybridnorm.hybrid.entrypoints")
        super().__init__(config, submodules, scheme=scheme, use_transformer_engine=use_te,
                         options=options, **kwargs)
        ours = sum(1 for layer in self.layers if hasattr(layer, "norms"))
        start_up_line(scheme, options, use_te,
                      f"pattern {self.hybrid_layer_pattern!r}, {len(self.layers)} layers on this "
                      f"stage ({ours} with the scheme's norms)", notes, model=" hybrid stack")


def _make(name: str) -> ModuleSpec:
    return ModuleSpec(module=MegatronLMHybridNormStack, params={"scheme": get_scheme(name)},
                      submodules=HybridNormStackSubmodules(**megatron_layer_specs()))


# one module attribute per scheme, the name --spec gives: prenorm, ..., hybridnorm_star
ENTRY_POINTS = {s: _make(s) for s in SCHEMES}
globals().update(ENTRY_POINTS)

from megatron_hybridnorm.models.spec_names import name_the_schemes  # noqa: E402

name_the_schemes(__name__, ENTRY_POINTS)
