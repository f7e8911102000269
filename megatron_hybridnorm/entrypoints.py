"""The public path of the GPT entry points, kept for Megatron-LM command lines:
``pretrain_gpt.py --spec megatron_hybridnorm.entrypoints <scheme>``. They live in
``megatron_hybridnorm.models.gpt.entrypoints``."""

from megatron_hybridnorm.models.gpt.entrypoints import *  # noqa: F401,F403 - one per scheme
from megatron_hybridnorm.models.gpt.entrypoints import ENTRY_POINTS  # noqa: F401

from megatron_hybridnorm.models.spec_names import name_the_schemes  # noqa: E402

name_the_schemes(__name__, ENTRY_POINTS)
