"""The megatron-core / torch version matrix: the version-sensitive tests on each version, one venv
per version (``scripts/mcore_venv.sh``: no second torch download but for the older-torch leg),
one JSON and one Markdown table of what ran where.

    python scripts/version_matrix.py --out DIR [--default-xml XML] [--main-wheel WHEEL] [--legs ...]

On the other versions the multi-rank TP and PP tests run their representative cases
(``MCORE_MATRIX_LEG=1``, read by tests/test_tensor_parallel.py and tests/test_pipeline.py).
``--default-xml``: the JUnit XML of the full suite on the project's default version (.venv), as
``.ci/run`` runs it first; it becomes that row of the table. ``--main-wheel``: a megatron-core
0.20 wheel built from Megatron-LM's main (PyPI serves none). Exit 1 if any test failed or a leg
could not run. ``--write-docs`` also writes the table and the JSON into ``docs/versions/``, which
the README's "Megatron versions" table is checked against (tests/test_docs.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "versions"

# what each test file shows, in the table's column order
AREAS = {
    "reference": ("float64 reference, every scheme", ["tests/test_reference.py"]),
    "tp": ("TP=2 (+SP) = 1 rank", ["tests/test_tensor_parallel.py"]),
    "pp": ("PP=2 / VPP = 1 rank", ["tests/test_pipeline.py"]),
    "checkpoint": ("dist checkpoints", ["tests/test_checkpoint.py"]),
    "hybrid": ("HybridModel", ["tests/test_hybrid.py"]),
    "entry": ("--spec entry points", ["tests/test_megatron_lm.py", "tests/test_versions.py",
                                      "tests/test_rehearse.py"]),
    "loop": ("Megatron-LM's loop", ["tests/test_megatron_lm_loop.py"]),
    "kernels": ("Triton kernels (interpreter)", ["tests/test_kernels.py"]),
}
SUBSET = [f for key in ("reference", "tp", "pp", "checkpoint", "hybrid", "entry", "loop")
          for f in AREAS[key][1]]
# after every leg: Megatron-LM's checkpoints of each version resumed on the others
UPGRADES = "tests/test_megatron_lm_upgrades.py"
# long multi-rank runs whose code paths the rest of the subset already covers on every version
SLOW_REPEATS = ("test_checkpoint_saved_at_tp2_pp2", "test_two_identical_runs")

LEGS = {
    "0.16.1": dict(mcore="0.16.1"),
    "0.17.1": dict(mcore="0.17.1"),
    "0.18.2": dict(mcore="0.18.2"),
    "main": dict(mcore="main", cross_checkpoint=True),
    # the same megatron-core as the default: of Megatron-LM's loop, its TP=2 run and resume
    # (the 1-rank runs of each scheme are the default row's)
    "torch-2.9.1": dict(mcore="0.19.2", torch="2.9.1", kernels=True, loop="resume_at_tp2"),
}


def leg_python(leg: dict, main_wheel: str | None) -> str:
    spec = leg["mcore"]
    if spec == "main":
        if not main_wheel or not Path(main_wheel).is_file():
            raise SystemExit("the main leg needs a megatron-core 0.20 wheel built from "
                             "Megatron-LM's main (PyPI serves none): pass --main-wheel WHEEL "
                             "or set MCORE_MAIN_WHEEL")
        spec = main_wheel
    env = dict(os.environ, **({"TORCH": leg["torch"]} if leg.get("torch") else {}))
    out = subprocess.run(["bash", str(ROOT / "scripts" / "mcore_venv.sh"), spec], env=env,
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"venv for {spec}: {out.stdout[-2000:]}{out.stderr[-2000:]}")
    return str(ROOT / out.stdout.strip().splitlines()[-1])


def versions(python: str) -> dict:
    code = ("import json, warnings; warnings.filterwarnings('ignore'); import torch, numpy;"
            "import megatron.core as m\ntry:\n import triton; t = triton.__version__\n"
            "except ImportError:\n t = None\n"
            "print(json.dumps({'megatron_core': m.__version__.split('+')[0], "
            "'torch': torch.__version__.split('+')[0], 'triton': t, "
            "'numpy': numpy.__version__}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def read_junit(path: Path) -> dict:
    """{area: {"passed", "failed", "skipped", "skip_reasons"}} from a JUnit XML file."""
    counts = {key: {"passed": 0, "failed": 0, "skipped": 0, "skip_reasons": []} for key in AREAS}
    files = {f: key for key, (_, fs) in AREAS.items() for f in fs}
    for case in ET.parse(path).getroot().iter("testcase"):
        # tests.test_x[.Class]; a module skipped whole has no classname and is named by its path
        parts = (case.get("classname") or case.get("name", "")).split(".")
        module = next((i for i, part in enumerate(parts) if part.startswith("test_")), None)
        file = None if module is None else "/".join(parts[:module + 1]) + ".py"
        key = files.get(file)
        if key is None:
            continue
        c = counts[key]
        if case.find("failure") is not None or case.find("error") is not None:
            c["failed"] += 1
        elif case.find("skipped") is not None:
            c["skipped"] += 1
            skipped = case.find("skipped")
            reason = skipped.get("message", "")
            if reason == "collection skipped" and skipped.text:  # ('path', line, 'Skipped: why')
                reason = skipped.text.rsplit("Skipped: ", 1)[-1].rstrip("')")
            if reason not in c["skip_reasons"]:
                c["skip_reasons"].append(reason)
        else:
            c["passed"] += 1
    return counts


def run_leg(name: str, leg: dict, out: Path, main_wheel: str | None) -> dict:
    start = time.monotonic()
    python = leg_python(leg, main_wheel)
    env = dict(os.environ, MCORE_MATRIX_LEG="1")  # fewer cases of the multi-rank runs
    if leg.get("cross_checkpoint"):  # a checkpoint of the default version loads here, and back
        env["MCORE_OTHER_PYTHON"] = str(ROOT / ".venv" / "bin" / "python")
    skip = " and ".join(f"not {t}" for t in SLOW_REPEATS)
    if leg.get("loop"):  # the loop's selection on this leg: the rest of its file is left out
        skip = f"{skip} and (not test_megatron_lm_loop or {leg['loop']})"
    runs = [(SUBSET, ["-k", skip])]
    if leg.get("kernels"):  # the kernels' fast tests (the slow ones are model-level repeats)
        runs.append((AREAS["kernels"][1], ["-m", "not slow"]))
    areas, tails, code = None, [], 0
    for i, (files, select) in enumerate(runs):
        xml = out / f"{name}-{i}.xml"
        cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, *select,
               f"--junitxml={xml}"]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        (out / f"{name}-{i}.log").write_text(proc.stdout + proc.stderr)
        tails.append((proc.stdout.strip().splitlines() or ["(no output)"])[-1])
        print(f"   {tails[-1]}", flush=True)
        code = code or proc.returncode
        if xml.exists():
            found = read_junit(xml)
            areas = found if areas is None else {
                k: {n: areas[k][n] + found[k][n] for n in areas[k]} for k in areas}
        else:
            code = code or 1
    return dict(leg=name, **versions(python), areas=areas, summary="; ".join(tails),
                returncode=code, wall_s=round(time.monotonic() - start, 1), python=python)


def run_upgrades(rows: list[dict], out: Path) -> dict:
    """Megatron-LM's checkpoints saved on each megatron-core, resumed on every other version:
    {"versions": [...], "pairs": {"OLD NEW": "resumes" | "refused" | "failed"}, ...}."""
    pythons = {r["megatron_core"]: r["python"] for r in rows
               if r.get("python") and not LEGS.get(r["leg"], {}).get("torch")}
    start = time.monotonic()
    xml = out / "upgrades.xml"
    env = dict(os.environ, MCORE_VERSION_PYTHONS=",".join(f"{v}={p}" for v, p in pythons.items()))
    cmd = [str(ROOT / ".venv" / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
           UPGRADES, f"--junitxml={xml}"]
    print(f"== upgrades: {' '.join(cmd[1:])} ({', '.join(pythons)})", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    (out / "upgrades.log").write_text(proc.stdout + proc.stderr)
    tail = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    print(f"   {tail}", flush=True)
    pairs = {}
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            m = re.search(r"\[([\d.]+)-to-([\d.]+)\]", case.get("name", ""))
            if not m:
                continue
            bad = case.find("failure") is not None or case.find("error") is not None
            kind = "resumes" if "resumes_on_a_newer" in case.get("name") else "refused"
            pairs[f"{m[1]} {m[2]}"] = ("failed" if bad else
                                       "skipped" if case.find("skipped") is not None else kind)
    versions_ = sorted(pythons, key=lambda v: tuple(int(x) for x in v.split(".")))
    return dict(versions=versions_, pairs=pairs, summary=tail,
                returncode=proc.returncode if pairs else 1,
                wall_s=round(time.monotonic() - start, 1))


def upgrades_markdown(upgrades: dict) -> str:
    """Saved on (rows) x resumed on (columns)."""
    vs = upgrades["versions"]
    cells = {"resumes": "resumes, same loss", "refused": "refused before loading",
             "failed": "**failed**", "skipped": "skipped"}
    lines = ["| saved on \\ resumed on | " + " | ".join(vs) + " |", "|---|" + "---|" * len(vs)]
    for old in vs:
        row = [cells.get(upgrades["pairs"].get(f"{old} {new}"), "-") if old != new else "(saved)"
               for new in vs]
        lines.append(f"| {old} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def default_row(xml: Path) -> dict:
    return dict(leg="default", **versions(str(ROOT / ".venv" / "bin" / "python")),
                areas=read_junit(xml), summary="the full suite (scripts/dev.sh test)",
                returncode=0 if all(a["failed"] == 0 for a in read_junit(xml).values()) else 1,
                wall_s=None)


def cell(area: dict | None) -> str:
    if area is None:
        return "did not run"
    ran = area["passed"] + area["failed"]
    if ran == 0:
        if not area["skipped"]:
            return "not run"
        why = " ".join(area["skip_reasons"])
        return "not in this version" if "arrived in" in why else "skipped"
    text = f"{area['passed']}/{ran}"
    return text if not area["failed"] else f"**{area['failed']} failed** ({text})"


def markdown(rows: list[dict]) -> str:
    head = ["megatron-core", "torch", "Triton"] + [label for label, _ in AREAS.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mc = r["megatron_core"] + (" (main)" if r["leg"] == "main" else "")
        lines.append("| " + " | ".join(
            [mc, r["torch"], r["triton"] or "-"]
            + [cell((r["areas"] or {}).get(k)) for k in AREAS]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--default-xml", type=Path)
    ap.add_argument("--main-wheel", default=os.environ.get("MCORE_MAIN_WHEEL"))
    ap.add_argument("--legs", nargs="*", default=list(LEGS), choices=list(LEGS))
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    rows = [default_row(args.default_xml)] if args.default_xml else []
    for name in args.legs:
        try:
            rows.append(run_leg(name, LEGS[name], args.out, args.main_wheel))
        except (RuntimeError, SystemExit) as e:
            print(f"   {name} could not run: {e}", flush=True)
            rows.append(dict(leg=name, megatron_core=LEGS[name]["mcore"], torch="?", triton=None,
                             areas=None, summary=str(e), returncode=1, wall_s=None))
    if args.default_xml:
        rows[0]["python"] = str(ROOT / ".venv" / "bin" / "python")
    upgrades = run_upgrades(rows, args.out)
    for r in rows:
        r.pop("python", None)  # a path on this machine
    result = dict(date=time.strftime("%Y-%m-%d"), machine=f"{platform.machine()}, "
                  f"{os.cpu_count()} CPUs, no GPU" if not _has_gpu() else platform.machine(),
                  python=platform.python_version(), wall_s=round(time.monotonic() - start, 1),
                  rows=rows, upgrades=upgrades)
    (args.out / "matrix.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(rows) + "\n\n" + upgrades_markdown(upgrades)
    (args.out / "matrix.md").write_text(table + "\n")
    print(table)
    if args.write_docs:
        DOCS.mkdir(parents=True, exist_ok=True)
        (DOCS / "matrix.json").write_text(json.dumps(result, indent=2) + "\n")
        (DOCS / "matrix.md").write_text(table + "\n")
    failed = [r["leg"] for r in rows if r["returncode"]] + (
        ["upgrades"] if upgrades["returncode"] else [])
    if failed:
        print(f"FAILED legs: {', '.join(failed)}", file=sys.stderr)
    totals = {n: sum(a[n] for r in rows for a in (r["areas"] or {}).values())
              for n in ("passed", "failed", "skipped")}
    print(f"matrix: {totals['passed']} passed, {totals['failed']} failed, "
          f"{totals['skipped']} skipped")
    return 1 if failed else 0


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
