"""``pretrain_hybrid.py --spec megatron_hybridnorm.hybrid.entrypoints <scheme>``; the entry points
live in ``megatron_hybridnorm.models.hybrid.entrypoints``."""

from megatron_hybridnorm.models.hybrid.entrypoints import *  # noqa: F401,F403 - one per scheme
from megatron_hybridnorm.models.hybrid.entrypoints import ENTRY_POINTS  # noqa: F401
