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
        help="the paper's ordering (HybridNorm* < HybridNorm < Pre-Norm) tested at a size a "
             "2-core CPU trains in under 45 minutes: 3 schemes x 4 seeds x 600 steps, paired "
             "95%% intervals",
        flags=dict(schemes="prenorm,hybridnorm,hybridnorm_star", seeds=4, steps=600,
                   eval_interval=60, eval_batches=8),
    ),
    "baselines": Preset(
        help="HybridNorm and HybridNorm* against the baselines teams use today (Pre-Norm + "
             "QK-Norm, Peri-LN, OLMo 2's reordered norm) on the prose corpus, sized for a 2-core "
             "CPU in under an hour: 5 schemes x 4 seeds x 400 steps, paired 95%% intervals",
        flags=dict(schemes="prenorm_qknorm,periln,olmo2,hybridnorm,hybridnorm_star", seeds=4,
                   steps=400, eval_interval=50, eval_batches=8, corpus="austen"),
    ),
    "lr-sweep": Preset(
        help="stability: Pre-Norm, Post-Norm, HybridNorm and HybridNorm* at peak learning rates "
             "1e-3 to 1e-1 on a deeper, narrower model (12 layers, d 128), a few minutes on a "
             "2-core CPU",
        flags=dict(schemes="prenorm,postnorm,hybridnorm,hybridnorm_star",
                   lr_sweep="1e-3,3e-3,1e-2,3e-2,1e-1", layers=12, hidden=128, heads=4,
                   kv_heads=2, steps=100, eval_interval=25),
    ),
}
