"""One command for a GPU machine: the GPU tests, the benchmark and two Megatron-LM training runs,
with every result in one JSON file.

    python3 scripts/gpu_check.py               # on a CUDA machine with megatron-core and TE
    python3 scripts/gpu_check.py --dry-run     # anywhere (CI): the same stages, smoke-sized

Stages, each under a time cap and all under one budget (default 450 s), in this order:
  tests       ``pytest -m gpu``: kernels against float64 on the device, the model-level kernel
              tests, Transformer Engine against the local backend, FP8, MoE, checkpoints
  te_fp8      Megatron-LM ``pretrain_gpt.py`` (core_v0.19.0), 20 iterations on mock data,
              ``--spec megatron_hybridnorm.entrypoints hybridnorm_star``, TE with FP8
  local       the same on local modules
  bench       ``benchmarks/bench_norms.py``: kernels, TE and local 1.2B blocks, launch configs
For the training runs it checks the entry point's start-up line (Megatron-LM builds its default
model, silently, when a --spec fails to import) and that the loss falls. Everything goes under
``$OUT`` (else ``runs/gpu_check``): ``gpu_check.json``, ``bench.json``, one log per stage.

What the GPU machine lacks (pytest, Megatron-LM's scripts, small packages) comes from
``.gpu/extra``, filled by ``scripts/gpu_prepare.sh`` and carried to the machine. With
``--dry-run`` the tests run on the CPU (the GPU tests skip, their CPU twins run), the benchmark
runs its smoke shapes under Triton's interpreter, and the Megatron-LM arguments are parsed and
validated by Megatron-LM's own parser (its training needs a GPU); the JSON has every field.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTRA = ROOT / ".gpu" / "extra"
SCHEME = "hybridnorm_star"
ITERATIONS = 20
# a small GPT (the paper's shape, scaled down): what matters is that Megatron-LM trains it
MODEL = ["--num-layers", "4", "--hidden-size", "512", "--num-attention-heads", "8",
         "--group-query-attention", "--num-query-groups", "4", "--ffn-hidden-size", "2048",
         "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
         "--rotary-base", "500000", "--disable-bias-linear", "--seq-length", "1024",
         "--max-position-embeddings", "1024", "--micro-batch-size", "4",
         "--global-batch-size", "8", "--train-iters", str(ITERATIONS), "--lr", "3e-4",
         "--min-lr", "3e-5", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
         "--weight-decay", "0.1", "--adam-beta2", "0.95", "--clip-grad", "1.0", "--bf16",
         "--init-method-std", "0.02", "--mock-data", "--tokenizer-type", "NullTokenizer",
         "--vocab-size", "32000", "--eval-iters", "0", "--eval-interval", "1000",
         "--log-interval", "1", "--spec", "megatron_hybridnorm.entrypoints", SCHEME]
RUNS = {
    "te_fp8": ["--transformer-impl", "transformer_engine", "--fp8-format", "hybrid",
               "--fp8-recipe", "delayed", "--fp8-amax-history-len", "16",
               "--fp8-amax-compute-algo", "max"],
    # without TE, Megatron-LM's defaults would ask for TE's RoPE and weight-gradient fusions
    "local": ["--transformer-impl", "local", "--no-rope-fusion",
              "--no-gradient-accumulation-fusion"],
}
STAGES = {"tests": 150, "te_fp8": 100, "local": 100, "bench": 330}  # caps, seconds
LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.eE+-]+)")


def startup_line(impl: str) -> str:
    return (f"megatron-hybridnorm: built {SCHEME} on {impl} modules, 4 layers on this stage")


def run(cmd, log: Path, timeout: float, env=None) -> dict:
    """Run ``cmd`` (its whole process group killed at the timeout); output to ``log``."""
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=env, start_new_session=True)
        try:
            rc, timed_out = proc.wait(timeout=max(1.0, timeout)), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, timed_out = proc.wait(), True
    return dict(returncode=rc, timed_out=timed_out, seconds=round(time.monotonic() - t0, 1),
                log=log.name)


def environment(extra_path: str | None) -> dict:
    env = dict(os.environ)
    paths = [str(ROOT)] + ([extra_path] if extra_path else []) + \
        [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    # the kernels are opt-in (kernels/dispatch.py): this check is where they run on the GPU
    env.setdefault("HYBRIDNORM_KERNELS", "auto")
    return env


def install_missing(out: Path) -> tuple[str | None, list[str]]:
    """Install from .gpu/extra/wheels the packages this Python lacks, into a folder of their
    own; returns (that folder for PYTHONPATH, what was installed)."""
    import importlib.util

    modules = {"pytest": "pytest", "pluggy": "pluggy", "iniconfig": "iniconfig",
               "packaging": "packaging", "psutil": "psutil", "tqdm": "tqdm", "numpy": "numpy"}
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return None, []
    wheels = [w for m in missing for w in sorted((EXTRA / "wheels").glob(f"{m}-*.whl"))]
    if len(wheels) < len(missing):
        raise SystemExit(f"missing {missing} and no wheels of them in {EXTRA / 'wheels'}: run "
                         "scripts/gpu_prepare.sh and carry .gpu/extra")
    target = out / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--target", str(target), *map(str, wheels)], check=True)
    return str(target), missing


OUTCOME = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.M)
KINDS = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors",
         "SKIPPED": "skipped", "XFAIL": "xfailed"}


def pytest_summary(xml: Path, log: Path | None = None) -> dict:
    """Counts and failing test ids from pytest's JUnit XML; from its verbose log when the XML is
    missing (a run cut at its time cap writes none)."""
    counts = dict(passed=0, failed=0, errors=0, skipped=0, xfailed=0, failures=[])
    if not xml.is_file():
        for name, outcome in OUTCOME.findall(log.read_text() if log and log.is_file() else ""):
            counts[KINDS[outcome]] += 1
            if outcome in ("FAILED", "ERROR"):
                counts["failures"].append(name)
        return counts
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        skipped = case.find("skipped")
        if "failure" in kinds or "error" in kinds:
            counts["failed" if "failure" in kinds else "errors"] += 1
            counts["failures"].append(name)
        elif skipped is not None and skipped.get("type") == "pytest.xfail":
            counts["xfailed"] += 1
        elif skipped is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def stage_tests(out: Path, env, timeout: float, dry: bool) -> dict:
    xml, log = out / "pytest.xml", out / "tests.log"
    # TE's tests first: never run on a GPU before, and they compile little
    files = ["tests/test_te_runtime.py", "tests/test_kernels.py", "tests/test_norms.py"]
    marker = "gpu"
    if dry:  # the GPU tests skip here; their CPU twins (same code, the "cpu" device) run
        marker, files = "gpu or (not slow and not gpu)", files[:2]
    cmd = [sys.executable, "-m", "pytest", "-v", "-m", marker, "-p", "no:cacheprovider",
           f"--junitxml={xml}", "-rsx", *files]
    xml.unlink(missing_ok=True)
    result = run(cmd, log, timeout, env)
    result.update(pytest_summary(xml, log))
    result["ok"] = (result["returncode"] == 0 and not result["timed_out"]
                    and result["failed"] == result["errors"] == 0 and result["passed"] > 0)
    return result


def megatron_lm_argv(name: str) -> list[str]:
    return MODEL + RUNS[name]


def parse_training_log(text: str, impl: str) -> dict:
    losses = {int(it): float(v) for it, v in LOSS.findall(text)}
    series = [losses[i] for i in sorted(losses)]
    line = startup_line(impl)
    return dict(startup_line_found=line in text, startup_line=line,
                kernel_lines=[ln for ln in text.splitlines() if "norm kernels of" in ln][:4],
                iterations=len(series), losses=series,
                loss_first=series[0] if series else None, loss_last=series[-1] if series else None,
                loss_falling=len(series) >= 2 and series[-1] < series[0])


def validate_megatron_lm_args(argv: list[str], world_size: int = 1):
    """Megatron-LM's argument parser and validate_args on ``argv``, as on an H100 (they query
    the device)."""
    import argparse as ap
    from types import SimpleNamespace
    from unittest import mock

    import torch
    from megatron.training.arguments import add_megatron_arguments, validate_args

    parser = add_megatron_arguments(ap.ArgumentParser(allow_abbrev=False))
    args = parser.parse_args(argv)  # an unknown or malformed flag exits here
    args.rank, args.world_size = 0, world_size
    args._is_global_batch_size_explicitly_specified = True
    with mock.patch.object(torch.cuda, "get_device_capability", lambda *a: (9, 0)), \
            mock.patch.object(torch.cuda, "get_device_properties",
                              lambda *a: SimpleNamespace(major=9, minor=0, name="pretend H100")):
        validate_args(args, {})
    return args


def stage_megatron_lm(name: str, out: Path, env, timeout: float, dry: bool) -> dict:
    argv = megatron_lm_argv(name)
    impl = "transformer_engine" if name == "te_fp8" else "local"
    folder = EXTRA / "megatron-lm"
    result = dict(argv=argv, megatron_lm=(folder / "TAG").read_text().strip()
                  if (folder / "TAG").is_file() else None)
    if dry:
        log = out / f"{name}.log"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--validate", name]
        result.update(run(cmd, log, timeout, env))
        result.update(parse_training_log(log.read_text(), impl))
        # on the CPU: validated, and (local) the entry point built; no training
        result["ok"] = result["returncode"] == 0 and (impl == "transformer_engine"
                                                      or result["startup_line_found"])
        return result
    if result["megatron_lm"] is None:
        result.update(ok=False, error=f"{folder} is missing: run scripts/gpu_prepare.sh and "
                                      "carry .gpu/extra")
        return result
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
           "--master-port", str(port), "-m", "megatron_hybridnorm.rehearse", "--megatron-lm",
           str(folder), "pretrain_gpt.py", *argv]
    result.update(run(cmd, out / f"{name}.log", timeout, env))
    result.update(parse_training_log((out / f"{name}.log").read_text(), impl))
    result["ok"] = (result["returncode"] == 0 and result["startup_line_found"]
                    and result["iterations"] == ITERATIONS and result["loss_falling"])
    return result


def validate_only(name: str) -> int:
    """--validate NAME (dry runs): parse and validate the run's arguments; on local modules,
    also build the entry point's spec from them as Megatron-LM would, printing its line."""
    args = validate_megatron_lm_args(megatron_lm_argv(name))
    print(f"validated: {name}, spec {args.spec}, transformer_impl {args.transformer_impl}")
    if args.transformer_impl == "local":
        from megatron.training.arguments import core_transformer_config_from_args

        import megatron_hybridnorm.models.gpt.entrypoints as entrypoints

        getattr(entrypoints, args.spec[1])(core_transformer_config_from_args(args))
    return 0


def stage_bench(out: Path, env, timeout: float, dry: bool) -> dict:
    bench = out / "bench.json"
    cmd = [sys.executable, "benchmarks/bench_norms.py", "--out", str(bench),
           "--parts", "kernels,te,local,tune"] + (["--smoke"] if dry else [])
    result = run(cmd, out / "bench.log", timeout, env)
    result["results"] = json.loads(bench.read_text()) if bench.is_file() else None
    parts = result["results"] or {}
    result["ok"] = result["returncode"] == 0 and all(
        p in parts and "error" not in parts[p] for p in ("kernels", "te", "local", "tune"))
    return result


def device_info() -> dict:
    try:
        import torch

        cuda = torch.cuda.is_available()
        return dict(card=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                    cuda=torch.version.cuda, gpus=torch.cuda.device_count())
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        return dict(card=None, error=str(e))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="on any machine: CPU tests, smoke benchmark, arguments validated only")
    p.add_argument("--budget", type=float, default=450, help="seconds for all stages together")
    p.add_argument("--stages", default=",".join(STAGES), help=f"subset of {','.join(STAGES)}")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu_check"))
    p.add_argument("--validate", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.validate:
        return validate_only(args.validate)
    stages = args.stages.split(",")
    if set(stages) - set(STAGES):
        p.error(f"unknown stages {sorted(set(stages) - set(STAGES))}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    extra_path, installed = install_missing(out)
    env = environment(extra_path)
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    report = dict(dry_run=args.dry_run, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  budget_seconds=args.budget, installed_from_extra=installed, **device_info(),
                  stages={})
    path = out / "gpu_check.json"
    for name in STAGES:
        if name not in stages:
            report["stages"][name] = dict(ok=None, skipped="not asked for (--stages)")
            continue
        left = args.budget - (time.monotonic() - t0)
        if left < 10:
            report["stages"][name] = dict(ok=False, skipped=f"budget spent ({args.budget} s)")
            continue
        timeout = min(STAGES[name], left)
        if name == "tests":
            result = stage_tests(out, env, timeout, args.dry_run)
        elif name == "bench":
            result = stage_bench(out, env, timeout, args.dry_run)
        else:
            result = stage_megatron_lm(name, out, env, timeout, args.dry_run)
        report["stages"][name] = result
        print(f"gpu_check: {name}: {'ok' if result.get('ok') else 'FAILED'} "
              f"({result.get('seconds', 0)} s)", flush=True)
        report["wall_seconds"] = round(time.monotonic() - t0, 1)
        path.write_text(json.dumps(report, indent=2))  # after each stage: a cut run keeps it
    report["ok"] = all(r.get("ok") for r in report["stages"].values() if r.get("ok") is not None)
    report["wall_seconds"] = round(time.monotonic() - t0, 1)
    path.write_text(json.dumps(report, indent=2))
    print(f"gpu_check: {'all ok' if report['ok'] else 'FAILED'} in {report['wall_seconds']} s; "
          f"{path}", flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
