"""``pretrain_hybrid.py --spec megatron_hybridnorm.hybrid.entrypoints <scheme>``; the entry points
live in ``megatron_hybridnorm.models.hybrid.entrypoints``."""

from megatron_hybridnorm.models.hybrid.entrypoints import *  # noqa: F401,F403 - one per scheme
from megatron_hybridnorm.models.hybrid.entrypoints import ENTRY_POINTS  # noqa: F401

from megatron_hybridnorm.models.spec_names import name_the_schemes  # noqa: E402

name_the_schemes(__name__, ENTRY_POINTS)
