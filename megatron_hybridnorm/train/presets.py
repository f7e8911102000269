"""Studies as named settings: ``--preset NAME`` sets these flags' defaults; flags given on the
command line still win."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    help: str
    flags: dict = field(default_factory=dict)


PRESETS = {
    "paper-small": Preset(
        help="the paper's ordering (HybridNorm* < HybridNorm < Pre-Norm) at a size a 2-core CPU "
             "trains in under 45 minutes: 3 schemes x 3 seeds, paired 95%% intervals",
        flags=dict(schemes="prenorm,hybridnorm,hybridnorm_star", seeds=3, steps=1000,
                   eval_interval=100, eval_batches=8),
    ),
}
