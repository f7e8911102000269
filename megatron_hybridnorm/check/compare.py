"""Turn a one-rank reference run and a parallel run into checks: each a measured difference
against a stated tolerance, PASS or FAIL, naming the worst parameter."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from megatron_hybridnorm.norms.names import is_head_norm_parameter, is_norm_parameter
from megatron_hybridnorm.check.builders import rel_err

# Relative tolerances by compute precision. fp32: the same arithmetic in another order (TP/SP
# split reductions, DP all-reduce), 1e-5; parameters after 3 Adam steps 1e-4, because Adam's
# 1/sqrt(v) amplifies last-bit gradient differences of near-zero gradients. bf16: the rounding
# of a 7-bit mantissa, applied at different points (2e-2; parameters 5e-2). fp8: E4M3 linears,
# about 4% each on random data, and amax statistics reduced over the parallel group (1.5e-1).
TOLERANCES = {
    "fp32": dict(loss=1e-5, grads=1e-5, params=1e-4),
    "bf16": dict(loss=2e-2, grads=5e-2, params=5e-2),
    "fp8": dict(loss=1.5e-1, grads=3e-1, params=1.5e-1),
}
# what a gradient (or parameter) check covers, by parameter name: the first group that takes it
GROUPS = (
    ("Q/K/V norm weights", is_head_norm_parameter),
    ("residual-stream norm weights", is_norm_parameter),
    ("router and experts", re.compile(r"\.mlp\.(router|experts|shared_experts)\.").search),
    ("embedding and output layer", re.compile(r"^(embedding|output_layer)\.").search),
    ("attention and MLP weights", lambda name: True),
)


@dataclass
class Check:
    name: str
    measured: float
    tolerance: float
    worst: str = ""  # the parameter (or layer) behind the measured value

    @property
    def ok(self) -> bool:
        return self.measured <= self.tolerance

    def row(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def group_of(name: str) -> str:
    return next(label for label, belongs in GROUPS if belongs(name))


def _grouped(reference: dict, parallel: dict, what: str, tol: float) -> list[Check]:
    """Worst relative error per parameter group, over the parameters this rank holds."""
    worst: dict[str, Check] = {}
    for name, value in parallel.items():
        if name not in reference:  # reported by the parameter-names check
            continue
        label = group_of(name)
        err = rel_err(value, reference[name])
        check = worst.setdefault(label, Check(f"{what}: {label}", 0.0, tol))
        if err >= check.measured:
            check.measured, check.worst = err, name
    return list(worst.values())


def compare(reference: dict, parallel: dict, reloaded: dict | str, precision: str,
            grads: bool) -> list[Check]:
    """This rank's checks. ``reference``/``parallel``: ``train_case`` results; ``reloaded``:
    the parallel run's checkpoint loaded into the one-rank layout (its parameters), or why it
    could not be."""
    tol = TOLERANCES[precision]
    extra = sorted(set(parallel["params"]) - set(reference["params"]))
    checks = [Check("parameters a one-rank model does not have", float(len(extra)), 0.0,
                    extra[0] if extra else "")]
    for step, (a, b) in enumerate(zip(parallel["losses"], reference["losses"])):
        checks.append(Check(f"loss, step {step + 1}", abs(a - b) / abs(b), tol["loss"]))
    if grads:  # (with the distributed optimizer a rank reduces only its shard of them)
        checks += _grouped(reference["grads"], parallel["grads"], "gradients, step 1",
                           tol["grads"])
    checks += _grouped(reference["params"], parallel["params"], "parameters after the last step",
                       tol["params"])
    wrong = [i for i, slots in parallel["slots"].items() if slots != reference["slots"][i]]
    checks.append(Check("norms in the right places (per global layer)", float(len(wrong)), 0.0,
                        f"layer {wrong[0]}: {parallel['slots'][wrong[0]]}, one rank: "
                        f"{reference['slots'][wrong[0]]}" if wrong else ""))
    checks.append(Check("norm weights identical across TP ranks",
                        0.0 if parallel["norms_identical"] else 1.0, 0.0))
    checks.append(Check("norm weights identical across DP ranks",
                        0.0 if parallel["norms_identical_dp"] else 1.0, 0.0))
    ckpt = "checkpoint saved in this layout, loaded at one rank (max abs)"
    if isinstance(reloaded, str):
        checks.append(Check(ckpt, float("inf"), 0.0, reloaded))
    else:
        diffs = {n: (reloaded[n] - v.to(reloaded[n].dtype)).abs().max().item()
                 for n, v in parallel["params"].items() if n in reloaded}
        name = max(diffs, key=diffs.get)
        checks.append(Check(ckpt, diffs[name], 0.0, name if diffs[name] else ""))
    return checks


def merge(per_rank: list[list[Check]]) -> list[Check]:
    """One list of checks from every rank's: the worst measured value of each."""
    merged: dict[str, Check] = {}
    for checks in per_rank:
        for c in checks:
            if c.name not in merged or c.measured > merged[c.name].measured:
                merged[c.name] = c
    return list(merged.values())


def table(checks: list[Check]) -> str:
    w = max(len(c.name) for c in checks)
    lines = [f"{'check':<{w}}  {'measured':>10}  {'tolerance':>9}  result", "-" * (w + 32)]
    for c in checks:
        lines.append(f"{c.name:<{w}}  {c.measured:>10.3g}  {c.tolerance:>9.3g}  "
                     f"{'PASS' if c.ok else 'FAIL'}{'  ' + c.worst if c.worst and not c.ok else ''}")
    return "\n".join(lines)
