"""One forward step of Megatron's schedules and the batch loss they return, shared by the
training command and the check (both train through ``get_forward_backward_func``)."""

from __future__ import annotations

import torch


def loss_func(output_tensor):
    loss = output_tensor.float().mean()
    # a copy: the schedule divides the returned loss by the number of micro-batches in place
    return loss, {"lm loss": loss.detach().clone()}


def forward_step(device, data_iterator, model):
    tokens, labels = next(data_iterator)
    tokens, labels = tokens.to(device), labels.to(device)
    position_ids = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    return model(tokens, position_ids, None, labels=labels), loss_func


def microbatches(tokens, labels, micro_batch_size):
    """This data-parallel rank's share of a global batch, cut into micro-batches."""
    from megatron.core import parallel_state

    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    per = tokens.shape[0] // dp
    t, l = tokens[rank * per : (rank + 1) * per], labels[rank * per : (rank + 1) * per]
    return [(t[i : i + micro_batch_size], l[i : i + micro_batch_size])
            for i in range(0, per, micro_batch_size)]


def mean_over_batch(loss_dicts, device) -> float:
    """The batch's mean loss on every rank (it is computed on the last pipeline stage)."""
    from megatron.core import parallel_state

    value = torch.zeros(1, dtype=torch.float64, device=device)
    if loss_dicts:  # last stage
        value += torch.stack([d["lm loss"].double() for d in loss_dicts]).mean()
    torch.distributed.all_reduce(value, group=parallel_state.get_pipeline_model_parallel_group())
    torch.distributed.all_reduce(value, group=parallel_state.get_data_parallel_group())
    return value.item() / parallel_state.get_data_parallel_world_size()
