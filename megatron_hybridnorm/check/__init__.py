"""``hybridnorm-check``: a small model of a scheme trained in a parallel layout against the same
model at one rank, on the stack it runs on. The test suite runs the same code on gloo CPUs.

    torchrun --nproc-per-node 4 -m megatron_hybridnorm.check --scheme hybridnorm_star --tp 2 --pp 2

``builders.py`` builds the small model and its data, ``training.py`` trains it in a layout,
``compare.py`` turns two runs into checks, ``cli.py`` is the command.
"""
