"""The public path of the HybridModel entry points, kept for Megatron-LM command lines:
``pretrain_hybrid.py --spec megatron_hybridnorm.hybrid.entrypoints <scheme>``. The HybridModel
support lives in ``megatron_hybridnorm.models.hybrid``."""
