"""The runs of one invocation: every scheme under every seed and every peak learning rate.

A seed sets both the init and the data order, the same for every scheme, so two schemes' runs
under one seed differ only by the scheme; the validation windows are the same for all runs.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

VAL_SEED_OFFSET = 7919  # validation windows come from their own generator stream


@dataclass(frozen=True)
class RunKey:
    scheme: str
    seed: int
    lr: float

    def fields(self) -> dict:
        """How a metrics row names its run."""
        return {"scheme": self.scheme, "seed": self.seed, "peak_lr": self.lr}

    def matches(self, row: dict) -> bool:
        return (row["scheme"], row["seed"], row["peak_lr"]) == (self.scheme, self.seed, self.lr)


def seed_list(args) -> list[int]:
    return [args.seed + i for i in range(args.seeds)]


def lr_list(args) -> list[float]:
    return list(args.lr_sweep) if args.lr_sweep else [args.lr]


def run_keys(args) -> list[RunKey]:
    """Seed by seed, then rate by rate, every scheme: a stopped study has whole seeds done."""
    return [RunKey(s, seed, lr) for seed in seed_list(args) for lr in lr_list(args)
            for s in args.scheme_list]


def tag(args, key: RunKey) -> str:
    """A run's folder name: the scheme, plus the seed and the rate where there are several."""
    out = key.scheme
    if args.seeds > 1:
        out += f"-seed{key.seed}"
    if args.lr_sweep:
        out += f"-lr{key.lr:g}"
    return out


def run_args(args, key: RunKey):
    """``args`` as one run sees them: its own seed and peak learning rate."""
    return argparse.Namespace(**{**vars(args), "seed": key.seed, "lr": key.lr,
                                 "val_seed": args.seed + VAL_SEED_OFFSET})
