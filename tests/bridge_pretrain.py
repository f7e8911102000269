"""Megatron-Bridge's ``pretrain()`` on the CPU with examples/bridge_dense_1p2b.py's recipe,
shrunk: ``python tests/bridge_pretrain.py OUT ITERS [--load-from DIR --ckpt-step N] [--scheme S]``:
saves into OUT/checkpoints every 2 iterations; Bridge logs each iteration's loss.

Test-only stand-ins for what Bridge 0.6.2 assumes of a GPU machine (each is a runtime
replacement of one function, no file is changed): ``initialize_megatron`` is called with
``allow_no_cuda=True``; ``compile_helpers`` (the dataset helpers' C++ build) is skipped, as
megatron-core's wheel ships them built; ``_set_random_seed`` also seeds megatron-core's
model-parallel RNG tracker, which Bridge only does where a CUDA device is counted. The
package's own CPU patches (``harness.cpu.use_cpu``) do the rest, as for every CPU test.
"""

import argparse
import importlib.util
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
warnings.filterwarnings("ignore")

# what makes the 1.2B small and CPU-friendly (local modules, fp32, no fused CUDA kernels)
SMALL = dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
             num_query_groups=2, seq_length=64, transformer_impl="local", bf16=False,
             params_dtype=torch.float32, gradient_accumulation_fusion=False,
             masked_softmax_fusion=False, bias_activation_fusion=False, apply_rope_fusion=False,
             cross_entropy_loss_fusion=False, persist_layer_norm=False,
             bias_dropout_fusion=False, use_cpu_initialization=True, sequence_parallel=False,
             vocab_size=256)


def example():
    spec = importlib.util.spec_from_file_location("bridge_dense_1p2b",
                                                  ROOT / "examples" / "bridge_dense_1p2b.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stand_ins() -> None:
    import megatron.bridge.training.initialize as init
    import megatron.bridge.training.setup as setup
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_hybridnorm.harness.cpu import use_cpu

    use_cpu()
    initialize = init.initialize_megatron
    seed = init._set_random_seed

    def initialize_megatron(cfg, allow_no_cuda=False, **kwargs):
        return initialize(cfg, allow_no_cuda=True, **kwargs)

    def set_random_seed(seed_, *args, **kwargs):
        seed(seed_, *args, **kwargs)
        model_parallel_cuda_manual_seed(seed_)

    setup.initialize_megatron = init.initialize_megatron = initialize_megatron
    init.compile_helpers = lambda: None
    init._set_random_seed = set_random_seed


def small_config(out: Path, iters: int, scheme: str, load_from=None, ckpt_step=None):
    cfg = example().dense_1p2b_config(scheme, output=str(out), transformer_impl="local")
    for k, v in SMALL.items():
        setattr(cfg.model, k, v)
    cfg.mixed_precision = None
    cfg.dataset.seq_length = SMALL["seq_length"]
    cfg.tokenizer.vocab_size = SMALL["vocab_size"]
    cfg.train.train_iters, cfg.train.global_batch_size, cfg.train.micro_batch_size = iters, 4, 2
    cfg.validation.eval_interval, cfg.validation.eval_iters = iters + 1, 0
    cfg.optimizer.bf16 = False
    cfg.optimizer.use_distributed_optimizer = cfg.ddp.use_distributed_optimizer = False
    cfg.ddp.overlap_grad_reduce = cfg.ddp.overlap_param_gather = False
    cfg.ddp.grad_reduce_in_fp32 = False
    cfg.scheduler.lr_warmup_iters, cfg.scheduler.lr_decay_iters = 1, iters
    cfg.logger.log_interval, cfg.logger.tensorboard_dir = 1, None
    cfg.checkpoint.save_interval = 2
    cfg.checkpoint.load = str(load_from) if load_from else None
    cfg.checkpoint.ckpt_step = ckpt_step
    cfg.dist.distributed_backend = "gloo"
    return cfg


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("iters", type=int)
    p.add_argument("--load-from", type=Path, help="a checkpoints folder to resume from")
    p.add_argument("--ckpt-step", type=int)
    p.add_argument("--scheme", default="hybridnorm_star")
    args = p.parse_args()
    import bridge_shim

    bridge_shim.import_bridge()
    stand_ins()
    from megatron.bridge.training.gpt_step import forward_step
    from megatron.bridge.training.pretrain import pretrain

    cfg = small_config(args.out, args.iters, args.scheme, args.load_from, args.ckpt_step)
    pretrain(cfg, forward_step)


if __name__ == "__main__":
    main()
