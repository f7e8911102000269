"""Megatron dist checkpoints of every scheme save and load back exactly (one rank)."""

import pytest
import torch

import megatron_hybridnorm as mh
from helpers import build_gpt, randomize_norms, tiny_config


@pytest.mark.parametrize("scheme", mh.SCHEMES)
def test_dist_checkpoint_roundtrip(megatron_single_rank, tmp_path, scheme):
    from megatron.core import dist_checkpointing

    torch.manual_seed(0)
    saved = build_gpt(tiny_config(), scheme)
    randomize_norms(saved, seed=3)
    dist_checkpointing.save(saved.sharded_state_dict(), str(tmp_path))

    torch.manual_seed(1)
    loaded = build_gpt(tiny_config(), scheme)
    state = dist_checkpointing.load(loaded.sharded_state_dict(), str(tmp_path))
    loaded.load_state_dict(state)
    a, b = dict(saved.named_parameters()), dict(loaded.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
