"""Hugging Face ``transformers`` models of every scheme, exported from Megatron checkpoints and
imported back (``python -m megatron_hybridnorm.hf export|import``; needs the ``[hf]`` extra).

``modeling_hybridnorm.py`` is the model (copied into each export; torch and transformers only),
``architecture.py`` what a checkpoint's architecture is, ``convert.py`` the two directions,
``tokenizer.py`` the byte-level tokenizer of ``hybridnorm-train``'s text runs.
"""
