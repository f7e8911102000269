"""Faults the check can switch on, for its own negative controls (a hidden ``--fault`` flag; a
case's ``fault`` key): with one of them the check must fail and name what broke.

    v_norm_tp           the V norm without tensor-parallel gradient handling, as a plain norm
                        module added to Megatron would be: TP ranks' V-norm weights diverge
    first_block_every_stage
                        every pipeline stage builds its layers as if it were the first, so
                        HybridNorm*'s special block (or Mix-LN's Post-Norm layers) repeats
"""

from __future__ import annotations

FAULTS = ("v_norm_tp", "first_block_every_stage")


def check(case: dict) -> None:
    fault = case.get("fault")
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; one of {FAULTS}")


def build_options(case: dict) -> dict:
    """Spec-builder options the fault changes."""
    check(case)
    return {"pp_rank": 0} if case.get("fault") == "first_block_every_stage" else {}


def apply(case: dict, model) -> None:
    """Change a built model as the fault says."""
    if case.get("fault") != "v_norm_tp":
        return
    for name, module in model.named_modules():
        if name.endswith("v_layernorm"):
            module.tp_size = 1
            for p in module.parameters():
                del p.average_gradients_across_tp_domain
