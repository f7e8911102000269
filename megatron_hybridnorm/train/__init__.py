"""The ``hybridnorm-train`` command: compare norm schemes on one machine or many."""
