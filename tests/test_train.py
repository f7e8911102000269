"""The hybridnorm-train command: flags, data sources, parallel runs, divergence, resume, output."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from megatron_hybridnorm.train import cli
from megatron_hybridnorm.train.corpora import load_corpus
from megatron_hybridnorm.train.data import DataError, indexed_corpus
from megatron_hybridnorm.train.machine import cpu_line, describe_cpu

SMALL = ["--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--seq-len", "32",
         "--batch-size", "4", "--eval-interval", "2", "--eval-batches", "1",
         "--max-corpus-mb", "0.5"]


def run(args, *, nproc=1, timeout=600, check=True):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "megatron_hybridnorm.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--master-port", str(_free_port()), "-m", "megatron_hybridnorm.train", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and out.returncode != 0:
        raise AssertionError(f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows(folder):
    return [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines()]


def train_losses(folder, scheme):
    return [r["train_loss"] for r in rows(folder) if r["scheme"] == scheme and r["step"] > 0]


def run_records(folder) -> dict:
    """summary.json's run records by scheme (a one-seed, one-rate run)."""
    summary = json.loads((folder / "summary.json").read_text())
    assert len(summary["seeds"]) == 1 and len(summary["peak_lrs"]) == 1
    return {r["scheme"]: r for r in summary["runs"]}


BAD_FLAGS = [
    (["--schemes", "prenorm,bogus"], "unknown ['bogus']"),
    (["--heads", "4", "--tp", "3"], "--heads 4 is not divisible by --tp 3"),
    (["--layers", "2", "--pp", "4"], "--pp 4 asks for more pipeline stages than --layers 2"),
    (["--sp"], "--sp needs --tp > 1"),
    (["--tp", "2"], "1 processes cannot hold --tp 2"),
    (["--batch-size", "6", "--micro-batch-size", "4"], "does not divide"),
    (["--grad-flow-steps", "0"], "--grad-flow-steps must lie in"),
    (["--vocab-size", "300"], "--vocab-size applies to --data-path only"),
    (["--text", "/nonexistent.txt"], "--text /nonexistent.txt: no such file"),
    (["--data-path", "/nonexistent/prefix", "--vocab-size", "10"], "does not exist"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS)
def test_bad_flags_fail_before_any_work(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*flags, "--runs-dir", str(tmp_path)])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was written


def test_jsonl_without_text_field_is_named(tmp_path):
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"text": "hello"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match='line 2: expected a JSON object with a "text" field'):
        load_corpus(str(bad), None, None, 10**6)


def test_text_and_jsonl_corpora(tmp_path):
    plain = tmp_path / "a.txt"
    plain.write_text("abc " * 1000)
    c = load_corpus(str(plain), None, None, 10**6)
    assert len(c.train) + len(c.val) == 4000 and c.vocab_size == 256
    js = tmp_path / "a.jsonl"
    js.write_text("".join(json.dumps({"text": f"doc {i} " * 10}) + "\n" for i in range(40)))
    c = load_corpus(str(js), None, None, 10**6)
    assert len(c.val) > 0 and len(c.train) > len(c.val)


def test_stdlib_corpus_is_deterministic_with_held_out_files():
    a = load_corpus(None, None, None, 10**6)
    b = load_corpus(None, None, None, 10**6)
    assert len(a.train) == len(b.train) and len(a.val) == len(b.val) > 0
    assert np.array_equal(a.train.window(1000, 200), b.train.window(1000, 200))
    assert "standard library" in a.description


def make_indexed(prefix, n_docs=40, vocab=50, seed=0):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    g = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    docs = []
    for _ in range(n_docs):
        doc = g.integers(0, vocab, size=int(g.integers(20, 80)))
        docs.append(doc)
        builder.add_item(torch.from_numpy(doc))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return docs


def test_indexed_dataset_stream_matches_documents(tmp_path):
    docs = make_indexed(str(tmp_path / "d"))
    c = indexed_corpus(str(tmp_path / "d"), vocab_size=50)
    train_docs = [d for i, d in enumerate(docs) if (i + 1) % 20]
    flat = np.concatenate(train_docs)
    assert len(c.train) == len(flat)
    for start in (0, 17, len(flat) - 60):  # windows crossing document ends
        assert np.array_equal(c.train.window(start, 60), flat[start : start + 60])
    with pytest.raises(DataError, match=">= --vocab-size 10"):
        indexed_corpus(str(tmp_path / "d"), vocab_size=10)


@pytest.mark.slow
def test_trains_on_a_megatron_indexed_dataset(tmp_path):
    make_indexed(str(tmp_path / "d"), n_docs=60)
    run([*SMALL, "--schemes", "hybridnorm", "--steps", "2", "--data-path", str(tmp_path / "d"),
         "--vocab-size", "50", "--runs-dir", str(tmp_path / "runs"), "--name", "idx"])
    cfg = json.loads((tmp_path / "runs/idx/config.json").read_text())
    assert "Megatron indexed dataset" in cfg["corpus"] and cfg["vocab_size"] == 50
    assert len(train_losses(tmp_path / "runs/idx", "hybridnorm")) == 2


@pytest.mark.slow
def test_tp2_and_pp2_match_one_rank(tmp_path):
    common = [*SMALL, "--schemes", "hybridnorm_star,postnorm", "--steps", "3",
              "--runs-dir", str(tmp_path)]
    run([*common, "--name", "one"])
    run([*common, "--name", "tp2", "--tp", "2", "--sp"], nproc=2)
    run([*common, "--name", "pp2", "--layers", "2", "--pp", "2"], nproc=2)
    for scheme in ("hybridnorm_star", "postnorm"):
        ref = train_losses(tmp_path / "one", scheme)
        assert len(ref) == 3
        for name in ("tp2", "pp2"):
            got = train_losses(tmp_path / name, scheme)
            assert len(got) == 3
            for a, b in zip(got, ref):
                assert abs(a - b) <= 1e-5 * abs(b), (name, scheme, got, ref)


@pytest.mark.slow
def test_too_high_learning_rate_is_reported_as_diverged(tmp_path):
    out = run([*SMALL, "--schemes", "postnorm,hybridnorm", "--steps", "12", "--lr", "1e4",
               "--warmup", "1", "--clip-grad", "0", "--runs-dir", str(tmp_path), "--name", "hot"])
    summary = run_records(tmp_path / "hot")
    assert summary["postnorm"]["diverged"] and 1 <= summary["postnorm"]["diverged_step"] <= 12
    assert summary["postnorm"]["final_val_loss"] is None
    assert "diverged; going on with the other runs" in out.stdout
    assert train_losses(tmp_path / "hot", "hybridnorm")  # the next scheme still ran
    assert "postnorm" in out.stdout and "step " in out.stdout  # the table names the step


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_resume_is_bitwise_identical(tmp_path):
    # enough steps that the SIGINT lands mid-run (a step of this model takes ~0.1 s)
    common = [*SMALL, "--schemes", "prenorm,hybridnorm_star", "--steps", "30",
              "--runs-dir", str(tmp_path)]
    run([*common, "--name", "straight"])

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "megatron_hybridnorm.train", *common,
                             "--name", "broken"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    metrics = tmp_path / "broken" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until hybridnorm_star is mid-way
        if metrics.exists() and any(r["scheme"] == "hybridnorm_star" and r["step"] >= 3
                                    for r in rows(tmp_path / "broken")):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, (proc.returncode, stdout[-2000:], stderr[-3000:])
    assert "resume with: hybridnorm-train --resume --name broken" in stdout
    ckpt = tmp_path / "broken/checkpoints/hybridnorm_star"
    stopped = int((ckpt / "latest").read_text().split("_")[1])
    assert 3 <= stopped < 30 and (ckpt / f"step_{stopped:06d}").is_dir()
    assert len(train_losses(tmp_path / "broken", "hybridnorm_star")) == stopped

    run(["--resume", "--name", "broken", "--runs-dir", str(tmp_path)])
    for scheme in ("prenorm", "hybridnorm_star"):
        assert train_losses(tmp_path / "broken", scheme) == train_losses(tmp_path / "straight", scheme)
    assert run_records(tmp_path / "broken").keys() == {"prenorm", "hybridnorm_star"}


def test_resume_refuses_changed_flags(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    defaults = cli.parser().parse_args([])
    saved = {**vars(defaults), "grad_flow_steps": [1, 100]}
    (tmp_path / "r/config.json").write_text(json.dumps({"args": saved}))
    with pytest.raises(SystemExit):
        cli.main(["--resume", "--name", "r", "--runs-dir", str(tmp_path), "--lr", "0.5"])
    assert "these differ: --lr" in capsys.readouterr().err


@pytest.mark.slow
def test_default_run_learns_in_under_six_minutes(tmp_path):
    """The README's main job, with no flags (only where to write): every scheme's validation
    loss must end at least 1.5 nats/token below where it started (5.2-7.9 at step 0)."""
    from matplotlib.image import imread

    from megatron_hybridnorm.train.log import read_jsonl
    from megatron_hybridnorm.train.plots import plot

    t0 = time.time()
    out = run(["--runs-dir", str(tmp_path), "--name", "default"], timeout=600)
    elapsed = time.time() - t0
    assert elapsed < 360, f"took {elapsed:.0f} s"
    folder = tmp_path / "default"
    schemes = ["prenorm", "postnorm", "hybridnorm", "hybridnorm_star"]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["schemes"] == schemes
    for s, r in run_records(folder).items():
        assert not r["diverged"] and r["steps"] == 120
        assert r["final_val_loss"] < r["initial_val_loss"] - 1.5, (s, r)
    for s in schemes:  # the printed table
        assert s in out.stdout.split("final val")[1]
    # one seed: the table says that it cannot rank the schemes, and names the study that can
    assert "this run shows\nthe machinery and the gradient flow" in out.stdout
    assert "hybridnorm-train --preset paper-small" in out.stdout
    for name in ("loss.png", "grad_flow.png"):
        img = imread(folder / name)
        assert img.shape[0] > 300 and img.shape[1] > 500 and img.std() > 0.05
    panels = plot(folder, summary, rows(folder), read_jsonl(folder / "grad_flow.jsonl"))
    assert [p["labels"] for p in panels["loss.png"]] == [
        schemes, ["prenorm (baseline)", *schemes[1:]]]
    assert [p["labels"] for p in panels["grad_flow.png"]] == [schemes, schemes]  # steps 1, 100
    rows_ = rows(folder)
    assert {k for r in rows_ for k in r} == {"scheme", "seed", "peak_lr", "step", "train_loss",
                                              "val_loss", "grad_norm", "tokens_per_s", "lr"}
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["args"]["layers"] == 6 and cfg["args"]["hidden"] == 256
    # the machine, so that two runs' figures can be told apart by CPU: in config.json and in
    # the run's first line
    assert cfg["cpu"] == describe_cpu() and cfg["cpu"]["model"]
    first = out.stdout.lstrip().splitlines()[0]
    assert first.startswith("run ") and first.endswith(f"cpu: {cpu_line(cfg['cpu'])}"), first
    # quiet: none of megatron-core's import-time fallback warnings, and the norms' kernel paths
    # collected into the run folder and named once, after the tables, not inside a bar
    both = out.stdout + out.stderr
    for noise in ("Warning", "Falling back", "No CUDA runtime", "megatron-hybridnorm: norm "
                  "kernels", "INFO:"):
        assert noise not in both, noise
    assert out.stdout.index("norm kernels: torch in every layer") > out.stdout.index("final val")
    lines = (folder / "kernel_paths.txt").read_text().splitlines()
    assert lines and all(line.startswith("megatron-hybridnorm: norm kernels of ") for line in lines)


def test_verbose_shows_megatron_cores_warnings_and_the_package_imports_it_lazily(tmp_path):
    out = run(["--verbose", "--steps", "1", "--schemes", "prenorm", "--eval-interval", "1",
               "--runs-dir", str(tmp_path)], timeout=300)
    assert "Falling back" in out.stderr
    probe = subprocess.run([sys.executable, "-c", "import sys, megatron_hybridnorm as mh; "
                            "import megatron_hybridnorm.train.cli; "
                            "print('megatron' in sys.modules, mh.SCHEMES[0], mh.models.__name__)"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.split() == ["False", "prenorm", "megatron_hybridnorm.models"]


def test_data_shorter_than_a_sequence_is_refused(tmp_path, capsys):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("x" * 100)
    with pytest.raises(SystemExit):
        cli.main(["--text", str(tiny), "--runs-dir", str(tmp_path / "runs")])
    assert "too few for --seq-len 128" in capsys.readouterr().err


@pytest.mark.slow
def test_micro_batches_do_not_change_the_reported_loss(tmp_path):
    """4 sequences in 1 micro-batch or in 2 give the same losses (the schedule divides the
    returned loss by the micro-batch count in place; the logged value must not follow)."""
    common = [*SMALL, "--schemes", "hybridnorm", "--steps", "2", "--runs-dir", str(tmp_path)]
    run([*common, "--name", "m1"])
    run([*common, "--name", "m2", "--micro-batch-size", "2"])
    for a, b in zip(train_losses(tmp_path / "m1", "hybridnorm"),
                    train_losses(tmp_path / "m2", "hybridnorm")):
        assert abs(a - b) <= 1e-5 * abs(a)


def test_the_cpu_is_described_from_cpuinfo():
    x86 = ("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse4_2 avx avx2 fma "
           "f16c\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13\n")
    cpu = describe_cpu(x86)
    assert cpu["model"] == "AMD EPYC 7B13"
    assert cpu["vector_extensions"] == ["sse4_2", "avx", "avx2", "fma", "f16c"]  # no AVX-512
    assert cpu["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert cpu_line(cpu) == (f"AMD EPYC 7B13 (sse4_2 avx avx2 fma f16c; torch's CPU kernels: "
                             f"{cpu['torch_cpu_capability']})")
    arm = describe_cpu("processor\t: 0\nFeatures\t: fp asimd evtstrm asimdhp sve\n")
    assert arm["vector_extensions"] == ["asimd", "asimdhp", "sve"] and arm["model"]


def test_help_shows_every_default():
    """Every option either shows its default or (default None/off) says what it does."""
    from megatron_hybridnorm.train.cli import parser

    p = parser()
    text = p.format_help()
    assert "default: None" not in text
    for action in p._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, action.option_strings
        if action.default not in (None, False):
            assert f"default: {action.default}" in p._get_formatter()._expand_help(action), \
                action.option_strings


@pytest.mark.slow
def test_resume_skips_a_damaged_checkpoint_and_says_so(tmp_path):
    """A truncated .distcp file in the latest checkpoint ended --resume with EOFError deep in
    torch. Now that checkpoint is named and the newest intact one is taken; the run ends with
    the same losses as an uninterrupted one."""
    common = [*SMALL, "--schemes", "hybridnorm", "--steps", "6", "--save-interval", "2",
              "--runs-dir", str(tmp_path)]
    run([*common, "--name", "straight"])
    run([*common, "--name", "crashed"])
    ckpt = tmp_path / "crashed/checkpoints/hybridnorm"
    assert (ckpt / "latest").read_text() == "step_000006"
    shard = next((ckpt / "step_000006").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # as a crash mid-write leaves it
    (tmp_path / "crashed/outcomes.json").unlink()  # as if killed before the run was recorded
    out = run(["--resume", "--name", "crashed", "--runs-dir", str(tmp_path)])
    assert f"checkpoint {ckpt / 'step_000006'} is damaged and is skipped" in out.stdout
    assert "resumed from step_000004, the newest intact checkpoint" in out.stdout
    assert train_losses(tmp_path / "crashed", "hybridnorm") == \
        train_losses(tmp_path / "straight", "hybridnorm")

    for step in ("step_000002", "step_000004", "step_000006"):  # nothing intact: a clear error
        for f in (ckpt / step).glob("*.distcp"):
            f.write_bytes(b"")
    (tmp_path / "crashed/outcomes.json").unlink()
    out = run(["--resume", "--name", "crashed", "--runs-dir", str(tmp_path)], check=False)
    assert out.returncode == 2 and "no checkpoint in" in out.stdout + out.stderr
    assert "Traceback" not in out.stderr


def test_each_scheme_gets_its_own_qkv_norm_span_unless_given():
    """OLMo 2's Q/K norms span all heads, the paper's schemes' one head; --qkv-norm overrides
    both (and a scheme without Q/K/V norms takes no such option)."""
    from megatron_hybridnorm.train.model import scheme_options

    _, args = cli.parse(["--schemes", "olmo2,hybridnorm,prenorm"])
    assert [scheme_options(args, s) for s in ("olmo2", "hybridnorm", "prenorm")] == [{}, {}, {}]
    import megatron_hybridnorm as mh
    from megatron_hybridnorm.transformer.validate import check_options

    assert check_options(mh.get_scheme("olmo2"), {})["qkv_norm"] == "full"
    assert check_options(mh.get_scheme("hybridnorm"), {})["qkv_norm"] == "head"
    _, args = cli.parse(["--schemes", "olmo2,prenorm", "--qkv-norm", "head"])
    assert scheme_options(args, "olmo2") == {"qkv_norm": "head"}
    assert scheme_options(args, "prenorm") == {}
