"""Training one scheme with Megatron's forward-backward schedules."""

from __future__ import annotations

import math
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch

from megatron_hybridnorm.train import checkpoint
from megatron_hybridnorm.harness.steps import forward_step, mean_over_batch, microbatches
from megatron_hybridnorm.train.data import Corpus, get_batch
from megatron_hybridnorm.train.model import build, unwrap
from megatron_hybridnorm.train.runs import RunKey, run_args


@dataclass
class Outcome:
    key: RunKey
    diverged_step: int | None = None
    interrupted_at: int | None = None


def layer_grad_norms(ddp, num_layers: int, device) -> list[float]:
    """The gradient norm of each global layer, over all its parameters and all ranks."""
    from megatron.core import parallel_state

    sq = torch.zeros(num_layers, dtype=torch.float64, device=device)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for layer in unwrap(ddp).decoder.layers:
        for p in layer.parameters():
            g = getattr(p, "main_grad", None)
            if g is None:
                continue
            # sharded parameters count on every TP rank, replicated ones once
            if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
                sq[layer.layer_number - 1] += g.double().pow(2).sum()
    torch.distributed.all_reduce(sq, group=parallel_state.get_model_parallel_group())
    return sq.sqrt().tolist()


class PhaseTimes(dict):
    """Seconds per phase of a run (build, data, step, eval, save, sample): where a study's
    minutes go, so that a cheaper evaluation or data path is chosen by measurement."""

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[phase] = self.get(phase, 0.0) + time.perf_counter() - t0


class SchemeRun:
    """Builds one run's model (a scheme under a seed and a peak learning rate) and trains it;
    logs through ``log`` (a log.RunLog)."""

    def __init__(self, args, key: RunKey, corpus: Corpus, log, device, ckpt_dir, name: str):
        self.args, self.key, self.corpus, self.log = run_args(args, key), key, corpus, log
        self.device, self.ckpt_dir, self.name = device, ckpt_dir, name
        self.times = PhaseTimes()
        with self.times("build"):
            self.ddp, self.optimizer, self.scheduler, self.config = build(
                self.args, key.scheme, corpus.vocab_size)
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.fwd_bwd = get_forward_backward_func()
        self.step = 0

    def _run_batch(self, tokens, labels, forward_only: bool) -> float:
        mbs = microbatches(tokens, labels, self.args.micro_batch_size)
        losses = self.fwd_bwd(
            forward_step_func=partial(forward_step, self.device),
            data_iterator=iter(mbs),
            model=[self.ddp],
            num_microbatches=len(mbs),
            seq_length=self.args.seq_len,
            micro_batch_size=self.args.micro_batch_size,
            forward_only=forward_only,
        )
        return mean_over_batch(losses, self.device)

    def evaluate(self) -> float:
        self.ddp.eval()
        with self.times("eval"), torch.no_grad():
            values = [
                self._run_batch(*get_batch(self.corpus.val, self.args.val_seed, i,
                                           self.args.batch_size, self.args.seq_len), True)
                for i in range(self.args.eval_batches)
            ]
        self.ddp.train()
        return sum(values) / len(values)

    def sample(self, prompt: torch.Tensor, new: int = 48) -> list[int] | None:
        """Greedy continuation of ``prompt`` ([1, n] tokens) by the trained model, every rank
        taking part (TP shards the vocabulary: the logits are gathered); None with pipeline
        parallelism (no single rank holds the whole model)."""
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            return None
        model = unwrap(self.ddp)
        model.eval()
        tokens = prompt.to(self.device)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        with self.times("sample"), torch.no_grad():
            for _ in range(new):
                window = tokens[:, -self.args.seq_len:]
                if self.config.sequence_parallel:  # the sequence splits evenly over TP ranks
                    window = window[:, window.shape[1] % tp:]
                pos = torch.arange(window.shape[1], device=self.device).unsqueeze(0)
                logits = gather_from_tensor_model_parallel_region(model(window, pos, None))
                tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
        model.train()
        return tokens[0, prompt.shape[1]:].tolist()

    def resume(self) -> None:
        step = checkpoint.load_newest_intact(self.ckpt_dir, unwrap(self.ddp), self.optimizer,
                                             self.scheduler, self.log.note)
        if step is not None:
            self.step = step

    def save(self):
        with self.times("save"):
            return checkpoint.save(self.ckpt_dir, unwrap(self.ddp), self.optimizer,
                                   self.scheduler, self.step)

    def train(self, progress) -> Outcome:
        args = self.args
        outcome = Outcome(self.key)
        if self.step == 0:
            self.log.metrics(self.key, 0, val_loss=self.evaluate())
        tokens_per_step = args.batch_size * args.seq_len
        with _StopOnInterrupt() as stop:
            while self.step < args.steps:
                t0 = time.perf_counter()
                with self.times("data"):
                    tokens, labels = get_batch(self.corpus.train, args.seed, self.step,
                                               args.batch_size, args.seq_len)
                with self.times("step"):
                    self.ddp.zero_grad_buffer()
                    self.optimizer.zero_grad()
                    loss = self._run_batch(tokens, labels, forward_only=False)
                    next_step = self.step + 1
                    if next_step in args.grad_flow_steps:
                        self.log.grad_flow(self.key, next_step,
                                           layer_grad_norms(self.ddp, args.layers, self.device))
                    _, grad_norm, _ = self.optimizer.step()
                    self.scheduler.step(1)
                self.step = next_step
                dt = time.perf_counter() - t0
                grad_norm = float("nan") if grad_norm is None else float(grad_norm)
                diverged = not (math.isfinite(loss) and math.isfinite(grad_norm))
                evaluate = not diverged and (self.step % args.eval_interval == 0
                                             or self.step == args.steps)
                self.log.metrics(
                    self.key, self.step, train_loss=loss, grad_norm=grad_norm,
                    tokens_per_s=tokens_per_step / dt, lr=self.scheduler.get_lr(
                        self.optimizer.param_groups[0]),
                    val_loss=self.evaluate() if evaluate else None,
                )
                progress.update(self.step, loss)
                if diverged:
                    outcome.diverged_step = self.step
                    self.log.note(f"{self.name}: loss or gradient became non-finite at step "
                                  f"{self.step}: diverged; going on with the other runs")
                    return outcome
                if stop.requested(self.device):
                    outcome.interrupted_at = self.step
                    self.log.note(f"interrupted at step {self.step}; saved checkpoint "
                                  f"{self.save()}")
                    return outcome
                if args.save_interval and self.step % args.save_interval == 0:
                    self.log.note(f"saved checkpoint {self.save()}")
        self.log.note(f"saved checkpoint {self.save()}")
        return outcome


class _StopOnInterrupt:
    """Ctrl-C asks to stop at the next step boundary, where a checkpoint is consistent; a
    second Ctrl-C interrupts at once. All ranks agree on stopping through one all-reduce."""

    def __enter__(self):
        self._flag = False

        def handler(signum, frame):
            self._flag = True
            signal.signal(signal.SIGINT, self._previous)

        self._previous = signal.signal(signal.SIGINT, handler)
        return self

    def requested(self, device) -> bool:
        flag = torch.tensor([1.0 if self._flag else 0.0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)
        return False
