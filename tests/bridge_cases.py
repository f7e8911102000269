"""What each rank of the Megatron-Bridge tests runs (importable by spawned ranks)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

# CPU-friendly model fields: fp32, no fused CUDA kernels
CPU = dict(gradient_accumulation_fusion=False, masked_softmax_fusion=False,
           bias_activation_fusion=False, apply_rope_fusion=False,
           cross_entropy_loss_fusion=False, persist_layer_norm=False, bias_dropout_fusion=False,
           bf16=False, params_dtype=torch.float32, use_cpu_initialization=True)


def megatron_from_hf(folder, **fields):
    """AutoBridge: the HF folder as a Megatron model (a list of stages) on this rank's layout."""
    import bridge_shim

    bridge_shim.import_bridge()
    import megatron_hybridnorm.bridge  # noqa: F401  (registers the AutoBridge)
    from megatron.bridge import AutoBridge

    bridge = AutoBridge.from_hf_pretrained(str(folder), trust_remote_code=True,
                                           torch_dtype=torch.float32)
    provider = bridge.to_megatron_provider(load_weights=True)
    provider.apply_overrides_and_finalize(overrides={**CPU, **fields})
    model = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True,
                                               mixed_precision_wrapper=None)
    return bridge, model


def loss_through_schedule(model, tokens, labels) -> float:
    """Forward and backward of one batch through Megatron's schedule; the mean loss."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_hybridnorm.harness.steps import forward_step, mean_over_batch

    from functools import partial

    for m in model:
        m.train()
        m.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=partial(forward_step, torch.device("cpu")),
        data_iterator=iter([(tokens, labels)]), model=model[0], num_microbatches=1,
        seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=False)
    return mean_over_batch(losses, torch.device("cpu"))


def bridge_layouts_match_hf(folders, tokens, labels, tp, pp):
    return [bridge_layout_matches_hf(f, tokens, labels, tp, pp) for f in folders]


def bridge_layout_matches_hf(folder, tokens, labels, tp, pp):
    """At this TP x PP layout: the loss of the HF weights through Bridge's provider, whether
    the gradients are finite, and whether exporting gives the HF tensors back bit for bit."""
    from safetensors.torch import load_file

    bridge, model = megatron_from_hf(folder, tensor_model_parallel_size=tp,
                                     pipeline_model_parallel_size=pp)
    loss = loss_through_schedule(model, tokens, labels)
    grads_finite = all(torch.isfinite(p.grad).all().item() for m in model
                       for p in m.parameters() if p.grad is not None)
    source = load_file(str(Path(folder) / "model.safetensors"))
    exported = dict(bridge.export_hf_weights(model, cpu=True))
    same = (set(exported) == set(source) - {"output_layer.weight"}
            and all(torch.equal(exported[k], source[k]) for k in exported))
    return loss, grads_finite, same
