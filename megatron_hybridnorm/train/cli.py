"""``hybridnorm-train``: train small GPTs with several norm schemes on the same data and compare.

With no arguments it trains Pre-Norm, Post-Norm, HybridNorm and HybridNorm* (6 layers, d 256)
on the running Python's standard library, on the GPU if there is one and the CPU otherwise,
and writes metrics, plots and a summary to ``runs/<name>/``. ``--seeds N`` repeats every scheme
under N seeds and reports paired differences with 95% intervals; ``--preset paper-small`` is the
study that ranks the schemes; ``--lr-sweep`` trains each scheme at several peak learning rates.
Under torchrun it runs with tensor, sequence and pipeline parallelism (``--tp``, ``--sp``,
``--pp``) and data parallelism.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from megatron_hybridnorm import __version__
from megatron_hybridnorm.extras import MissingExtra, require
from megatron_hybridnorm.schemes import SCHEMES
from megatron_hybridnorm.train.corpora import NAMES
from megatron_hybridnorm.train.presets import PRESETS

DEFAULT_SCHEMES = "prenorm,postnorm,hybridnorm,hybridnorm_star"
RESUMABLE_KEEP = ("name", "runs_dir", "resume", "verbose")


def show_defaults(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every option's help shows its default, also where it has no help text (argparse prints
    nothing for those); an option whose default is None or off says in its help what it means."""
    for action in p._actions:
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            action.help = (f"{action.help} (default: %(default)s)" if action.help
                           else "default: %(default)s")
    return p


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hybridnorm-train", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a study's settings, as defaults that explicit flags override: "
                        + "; ".join(f"{k}: {v.help}" for k, v in PRESETS.items()))
    g = p.add_argument_group("schemes")
    g.add_argument("--schemes", default=DEFAULT_SCHEMES, help="comma-separated scheme names")
    g.add_argument("--qkv-norm", default=None, choices=["head", "full"],
                   help="Q/K/V norms per head or over all heads (default: each scheme's own: "
                        "per head, the paper's; over all heads for olmo2)")
    g.add_argument("--mixln-fraction", type=float, default=None,
                   help="Mix-LN's fraction of Post-Norm layers (scheme default 0.25)")
    g = p.add_argument_group("model")
    g.add_argument("--layers", type=int, default=6)
    g.add_argument("--hidden", type=int, default=256)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kv-heads", type=int, default=2, help="query groups (GQA)")
    g.add_argument("--normalization", choices=["RMSNorm", "LayerNorm", "DyT"], default="RMSNorm",
                   help="the kind of every norm of the scheme (DyT: tanh with a learned scale, "
                        "no statistics)")
    g.add_argument("--ffn-hidden", type=int, default=None, help="SwiGLU width (default ~8/3 d)")
    g.add_argument("--seq-len", type=int, default=128)
    g.add_argument("--rope-base", type=float, default=500000.0)
    g.add_argument("--untie-embeddings", action="store_true",
                   help="separate input and output embeddings (tied by default, as in the paper)")
    g.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="default: bf16 on a GPU, fp32 on a CPU")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=120)
    g.add_argument("--batch-size", type=int, default=8, help="global batch, in sequences")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help="default: the global batch split over data-parallel ranks")
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    g.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 10%%)")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--decay-norm-and-bias", action="store_true",
                   help="weight decay on norm weights and biases too, as the official HybridNorm "
                        "configs (decay_norm_and_bias: true); off: Megatron's rule, no decay on "
                        "biases and other 1-D parameters")
    g.add_argument("--init-truncation", type=float, default=3.0,
                   help="truncate the SmallInit normal at this many standard deviations (3 in "
                        "the official code; 0: no truncation, Megatron's plain normal)")
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234,
                   help="the first seed; a seed sets the init and the data order")
    g = p.add_argument_group("seeds, baseline and sweep")
    g.add_argument("--seeds", type=int, default=1,
                   help="train every scheme under this many seeds (--seed, --seed + 1, ...)")
    g.add_argument("--baseline", default=None,
                   help="the scheme others are compared with (default: prenorm if it runs, else "
                        "the first of --schemes)")
    g.add_argument("--lr-sweep", default=None,
                   help="comma-separated peak learning rates, each scheme trained at each "
                        "(replaces --lr); reports the final loss or the divergence step")
    g.add_argument("--eval-interval", type=int, default=20)
    g.add_argument("--eval-batches", type=int, default=4)
    g.add_argument("--grad-flow-steps", default=None,
                   help="steps whose per-layer gradient norms are plotted (default: 1 and "
                        "min(100, steps))")
    g = p.add_argument_group("parallelism (run under torchrun for more than one process)")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    g.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    g.add_argument("--sp", action="store_true", help="sequence parallelism (needs --tp > 1)")
    g = p.add_argument_group("data (default: the Python standard library, bytes)")
    g.add_argument("--corpus", choices=NAMES, default=None,
                   help="a named corpus: stdlib (the Python standard library, code; the "
                        "default) or austen (Jane Austen's novels, English prose; fetched once, "
                        "see megatron_hybridnorm/train/corpora.py)")
    g.add_argument("--text", default=None, help="a plain text file, or JSONL with a text field")
    g.add_argument("--data-path", default=None,
                   help="PREFIX of a Megatron indexed dataset (PREFIX.bin, PREFIX.idx)")
    g.add_argument("--vocab-size", type=int, default=None, help="tokenizer vocab (--data-path)")
    g.add_argument("--max-corpus-mb", type=float, default=8.0,
                   help="read at most this much byte-level text")
    g = p.add_argument_group("output")
    g.add_argument("--name", default=None, help="run name (default: a timestamp)")
    g.add_argument("--runs-dir", default="runs")
    g.add_argument("--resume", action="store_true",
                   help="continue run --name (default: the newest) from its checkpoints")
    g.add_argument("--save-interval", type=int, default=0,
                   help="also checkpoint every N steps (0: at the end and on Ctrl-C)")
    g.add_argument("--verbose", action="store_true", help="show megatron-core's warnings")
    return show_defaults(p)


class ArgError(ValueError):
    """A flag combination that cannot work; reported before any work starts."""


def explicit_flags(argv) -> set[str]:
    """The destinations of the flags given on the command line (not left at a default)."""
    q = parser()
    for action in q._actions:
        action.default = argparse.SUPPRESS
    return set(vars(q.parse_args(argv)))


def parse(argv=None):
    """(parser, args): the command line over the preset's settings over the defaults."""
    p = parser()
    args = p.parse_args(argv)
    if args.preset:
        p.set_defaults(**PRESETS[args.preset].flags)
        args = p.parse_args(argv)
    explicit = explicit_flags(argv)
    if args.lr_sweep is not None and "lr" in explicit:
        p.error("--lr-sweep replaces --lr; pass one of them")
    return p, args


def resolve(args, world_size: int, cuda: bool):
    """Fill defaults that depend on other flags, and check everything that can be checked."""
    args.scheme_list = [s.strip() for s in args.schemes.split(",") if s.strip()]
    bad = [s for s in args.scheme_list if s not in SCHEMES]
    if bad or not args.scheme_list:
        raise ArgError(f"--schemes: unknown {bad or 'empty'}; choose from {', '.join(SCHEMES)}")
    if len(set(args.scheme_list)) != len(args.scheme_list):
        raise ArgError("--schemes lists a scheme twice")
    if args.baseline is None:
        args.baseline = "prenorm" if "prenorm" in args.scheme_list else args.scheme_list[0]
    elif args.baseline not in args.scheme_list:
        raise ArgError(f"--baseline {args.baseline} is not among --schemes {args.schemes}; "
                       "add it there")
    if args.seeds < 1:
        raise ArgError("--seeds must be at least 1")
    if isinstance(args.lr_sweep, str):
        try:
            args.lr_sweep = [float(v) for v in args.lr_sweep.split(",") if v.strip()]
        except ValueError:
            raise ArgError("--lr-sweep takes comma-separated numbers, e.g. 1e-3,3e-3,1e-2") from None
        if not args.lr_sweep or any(v <= 0 for v in args.lr_sweep):
            raise ArgError("--lr-sweep needs positive learning rates")
        if len(set(args.lr_sweep)) != len(args.lr_sweep):
            raise ArgError("--lr-sweep lists a rate twice")
        args.lr_sweep = sorted(args.lr_sweep)
    if args.init_truncation < 0:
        raise ArgError("--init-truncation must be 0 (none) or a positive number of std")
    if args.ffn_hidden is None:
        args.ffn_hidden = max(64, round(args.hidden * 8 / 3 / 64) * 64)
    if args.dtype is None:
        args.dtype = "bf16" if cuda else "fp32"
    positive = ("layers", "hidden", "heads", "kv_heads", "ffn_hidden", "seq_len", "steps",
                "batch_size", "tp", "pp", "eval_interval", "eval_batches")
    for k in positive:
        if getattr(args, k) < 1:
            raise ArgError(f"--{k.replace('_', '-')} must be at least 1")
    if args.warmup is None:  # Megatron's scheduler needs fewer warm-up steps than steps
        args.warmup = min(max(1, args.steps // 10), args.steps - 1)
    if not 0 <= args.warmup < args.steps:
        raise ArgError(f"--warmup {args.warmup} must lie in 0..{args.steps - 1} (below --steps)")
    if args.lr <= 0:
        raise ArgError("--lr must be positive")
    if args.hidden % args.heads:
        raise ArgError(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    if args.heads % args.kv_heads:
        raise ArgError(f"--heads {args.heads} is not divisible by --kv-heads {args.kv_heads}")
    if args.heads % args.tp:
        raise ArgError(f"--heads {args.heads} is not divisible by --tp {args.tp}")
    if args.kv_heads % args.tp and args.tp % args.kv_heads:
        raise ArgError(f"--kv-heads {args.kv_heads} and --tp {args.tp}: one must divide the other")
    if args.pp > args.layers:
        raise ArgError(f"--pp {args.pp} asks for more pipeline stages than --layers {args.layers}")
    if args.layers % args.pp:
        raise ArgError(f"--layers {args.layers} is not divisible by --pp {args.pp}")
    if args.sp and args.tp == 1:
        raise ArgError("--sp needs --tp > 1")
    if args.sp and args.seq_len % args.tp:
        raise ArgError(f"--sp: --seq-len {args.seq_len} is not divisible by --tp {args.tp}")
    if world_size % (args.tp * args.pp):
        raise ArgError(f"{world_size} processes cannot hold --tp {args.tp} x --pp {args.pp}; "
                       f"launch a multiple of {args.tp * args.pp} processes with torchrun")
    args.dp = world_size // (args.tp * args.pp)
    if args.batch_size % args.dp:
        raise ArgError(f"--batch-size {args.batch_size} is not divisible by the {args.dp} "
                       "data-parallel ranks")
    if args.micro_batch_size is None:
        args.micro_batch_size = args.batch_size // args.dp
    if (args.batch_size // args.dp) % args.micro_batch_size:
        raise ArgError(f"--micro-batch-size {args.micro_batch_size} does not divide the "
                       f"per-rank batch {args.batch_size // args.dp}")
    if args.grad_flow_steps is None:
        args.grad_flow_steps = sorted({1, min(100, args.steps)})
    elif isinstance(args.grad_flow_steps, str):
        try:
            args.grad_flow_steps = sorted({int(s) for s in args.grad_flow_steps.split(",")})
        except ValueError:
            raise ArgError("--grad-flow-steps takes comma-separated step numbers") from None
    if any(not 1 <= s <= args.steps for s in args.grad_flow_steps):
        raise ArgError(f"--grad-flow-steps must lie in 1..{args.steps}")
    if args.text is None and args.data_path is None and args.vocab_size is not None:
        raise ArgError("--vocab-size applies to --data-path only (byte-level text has 256)")
    # what the spec builder would refuse, now rather than after the data is read (megatron-core
    # loads here, not at the top, so that --help and argument errors come without it)
    from megatron_hybridnorm import SchemeConfigError, get_decoder_block_spec
    from megatron_hybridnorm.train.model import scheme_options, transformer_config

    config = transformer_config(args)
    for s in args.scheme_list:
        try:
            get_decoder_block_spec(config, s, pp_rank=0, **scheme_options(args, s))
        except SchemeConfigError as e:
            raise ArgError(str(e)) from None
    return args


def run_folder(args) -> Path:
    root = Path(args.runs_dir)
    if args.resume:
        if args.name is None:
            runs = sorted((p for p in root.glob("*/config.json")), key=lambda p: p.stat().st_mtime)
            if not runs:
                raise ArgError(f"--resume: no run in {root}/ to resume")
            return runs[-1].parent
        folder = root / args.name
        if not (folder / "config.json").is_file():
            raise ArgError(f"--resume: {folder} holds no run")
        return folder
    folder = root / (args.name or time.strftime("%Y%m%d-%H%M%S"))
    if folder.exists():
        raise ArgError(f"{folder} exists; pass --resume to continue it, or another --name")
    return folder


def restore_args(cli, folder: Path, defaults):
    """On --resume the saved flags win; a flag given now that disagrees is an error."""
    saved = json.loads((folder / "config.json").read_text())["args"]
    changed = [k for k, v in vars(cli).items()
               if k not in RESUMABLE_KEEP and v != getattr(defaults, k) and saved.get(k) != v]
    if changed:
        raise ArgError(f"--resume continues {folder} with its saved flags; these differ: "
                       + ", ".join(f"--{k.replace('_', '-')}" for k in changed))
    args = argparse.Namespace(**{**vars(defaults), **saved})
    args.resume, args.name, args.runs_dir = True, folder.name, str(folder.parent)
    return args


def versions() -> dict:
    from importlib.metadata import version

    import torch

    # (megatron.core.__version__ appends the git hash of the current directory's repository)
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "megatron-core": version("megatron-core"), "megatron-hybridnorm": __version__}


class Progress:
    def __init__(self, enabled: bool, total: int, width: int = 16):
        self.enabled, self.total, self.width, self.bar = enabled, total, max(16, width), None

    def start(self, name: str, initial: int) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=initial, desc=f"{name:>{self.width}}",
                            unit="step", dynamic_ncols=True, file=sys.stdout)

    def update(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)


def quiet() -> None:
    """Keep the terminal for progress and results: megatron-core warns at import about optional
    packages (Apex, TE) and deprecations that do not concern this command."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", module=r"megatron\..*")
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|absl).*")
    for name in ("megatron", "torch.utils.cpp_extension", "matplotlib"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv=None) -> int:
    p, args = parse(argv)
    try:
        require("train", "hybridnorm-train")
    except MissingExtra as e:
        p.exit(2, f"hybridnorm-train: error: {e}\n")
    if not args.verbose:
        quiet()
    # here, not at the top: plots and progress bars need the [train] extra, checked above, and
    # torch and megatron-core load after the arguments parse and their warnings are quieted
    import torch

    from megatron_hybridnorm.harness import dist
    from megatron_hybridnorm.train.checkpoint import CheckpointDamaged
    from megatron_hybridnorm.train.corpora import load_corpus
    from megatron_hybridnorm.train.data import BYTE_VOCAB, DataError, get_batch
    from megatron_hybridnorm.train.log import RunLog, read_jsonl
    from megatron_hybridnorm.train.machine import cpu_line, describe_cpu
    from megatron_hybridnorm.train.loop import SchemeRun
    from megatron_hybridnorm.train.plots import plot
    from megatron_hybridnorm.train.runs import run_keys, tag
    from megatron_hybridnorm.train.summary import summarize, table, time_shares

    try:
        folder = run_folder(args)
        if args.resume:
            args = restore_args(args, folder, p.parse_args([]))
            args.grad_flow_steps = ",".join(map(str, args.grad_flow_steps))
        resolve(args, dist.world_size(), torch.cuda.is_available())
        corpus = load_corpus(args.text, args.data_path, args.vocab_size,
                             int(args.max_corpus_mb * 1e6), args.corpus)
        for split, stream in (("training", corpus.train), ("validation", corpus.val)):
            if len(stream) <= args.seq_len + 1:
                raise DataError(f"the {split} split has {len(stream)} tokens, too few for "
                                f"--seq-len {args.seq_len}")
    except (ArgError, DataError) as e:
        p.exit(2, f"hybridnorm-train: error: {e}\n")

    device = dist.setup(args.tp, args.pp, args.seed)
    main_rank = dist.is_main()
    from megatron_hybridnorm.kernels import report  # torch's, as above

    kernel_paths: list[str] = []  # the norms' kernel paths, printed after the progress bars
    report.divert(kernel_paths)
    keys = run_keys(args)
    progress = Progress(main_rank, args.steps, max(len(tag(args, k)) for k in keys))
    log = RunLog(folder, printer=progress.write)
    outcomes_path = folder / "outcomes.json"
    cpu = describe_cpu()
    if main_rank:
        folder.mkdir(parents=True, exist_ok=True)
        if not args.resume:
            saved = {k: v for k, v in vars(args).items() if k not in ("scheme_list", "dp")}
            (folder / "config.json").write_text(json.dumps(dict(
                args=saved, world_size=dist.world_size(), device=str(device),
                device_name=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                corpus=corpus.description, vocab_size=corpus.vocab_size, versions=versions(),
                cpu=cpu,
            ), indent=2))
    outcomes = json.loads(outcomes_path.read_text()) if outcomes_path.is_file() else {}
    log.note(f"run {folder} on {dist.world_size()} x {device.type} "
             f"(tp {args.tp}, pp {args.pp}, dp {args.dp}{', sp' if args.sp else ''}), {args.dtype}; "
             f"data: {corpus.description}; cpu: {cpu_line(cpu)}")

    diverged, samples = {}, {}
    prompt = get_batch(corpus.val, args.seed + 1, 0, 1, min(32, args.seq_len // 2))[0]
    t_start = time.perf_counter()
    for key in keys:
        name = tag(args, key)
        if name in outcomes:
            diverged[key] = outcomes[name]["diverged_step"]
            continue
        run = SchemeRun(args, key, corpus, log, device, folder / "checkpoints" / name, name)
        if args.resume:
            try:
                run.resume()
            except CheckpointDamaged as e:
                log.note(f"hybridnorm-train: error: {e}")
                report.divert(None)
                dist.teardown()
                return 2
            log.truncate(key, run.step)
        progress.start(name, run.step)
        outcome = run.train(progress)
        progress.close()
        if outcome.interrupted_at is not None:
            log.note(f"resume with: hybridnorm-train --resume --name {folder.name}"
                     + (f" --runs-dir {args.runs_dir}" if args.runs_dir != "runs" else ""))
            report.divert(None)
            dist.teardown()
            return 130
        diverged[key] = outcome.diverged_step
        if outcome.diverged_step is None and key.seed == args.seed and key.lr == keys[0].lr:
            samples[key.scheme] = run.sample(prompt)
        outcomes[name] = {"diverged_step": outcome.diverged_step,
                          "wall_s": time.perf_counter() - t_start, "phase_s": dict(run.times)}
        t_start = time.perf_counter()
        if main_rank:
            outcomes_path.write_text(json.dumps(outcomes, indent=2))

    if main_rank:
        rows = read_jsonl(folder / "metrics.jsonl")
        summary = summarize(rows, keys, diverged, args.baseline)
        summary["wall_s"] = sum(o.get("wall_s", 0.0) for o in outcomes.values())
        summary["time_shares"] = time_shares(outcomes.values())
        (folder / "summary.json").write_text(json.dumps(summary, indent=2))
        figures = plot(folder, summary, rows, read_jsonl(folder / "grad_flow.jsonl"))
        if kernel_paths:
            (folder / "kernel_paths.txt").write_text("\n".join(kernel_paths) + "\n")
        print("\n" + table(summary))
        if args.seeds == 1:
            print(ONE_SEED_NOTE)
        print_samples(samples, prompt[0].tolist(), corpus.vocab_size == BYTE_VOCAB)
        written = ["metrics.jsonl", "summary.json", *figures, "config.json"]
        if kernel_paths:
            written.append("kernel_paths.txt")
            from megatron_hybridnorm.kernels.dispatch import kernel_mode  # torch's, as above

            choice = kernel_mode()
            if choice == "torch":
                print("\nnorm kernels: torch in every layer (the default; HYBRIDNORM_KERNELS=auto "
                      "opts in to the Triton kernels on CUDA); per layer in kernel_paths.txt")
            else:
                print(f"\nnorm kernels (HYBRIDNORM_KERNELS={choice}):")
                print("\n".join("  " + line.removeprefix("megatron-hybridnorm: ")
                                for line in kernel_paths))
        print(f"\nwrote {folder}/: {', '.join(written)}")
        done = [tag(args, k) for k in keys
                if (folder / "checkpoints" / tag(args, k) / "latest").is_file()]
        if done:
            print(f"export to Hugging Face: python -m megatron_hybridnorm.hf export "
                  f"{folder}/checkpoints/{done[0]} {folder}/hf-{done[0]}")
    report.divert(None)
    dist.teardown()
    return 0


ONE_SEED_NOTE = (
    "\nOne seed cannot rank schemes whose losses differ by hundredths of a nat: this run shows\n"
    "the machinery and the gradient flow. For the ranking, with seeds and 95% intervals:\n"
    "  hybridnorm-train --preset paper-small")


def print_samples(samples: dict, prompt: list[int], as_bytes: bool) -> None:
    """Each scheme's greedy continuation of one validation prompt."""
    if not samples:
        return
    show = (lambda ids: repr(bytes(ids).decode("utf-8", "replace"))) if as_bytes else str
    print(f"\ngreedy samples after the validation prompt {show(prompt)}:")
    for scheme, ids in samples.items():
        print(f"  {scheme:<18} " + (show(ids) if ids is not None
                                     else "(not with pipeline parallelism)"))


def entry() -> None:
    sys.exit(main())
