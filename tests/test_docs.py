"""The repository stands alone: its docs, code and examples cite no file outside it."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = ("HYBRIDNORM.md", "../shared", "shared/gpu", "shared/seed")


def tracked_texts():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        try:
            yield name, (ROOT / name).read_text()
        except (UnicodeDecodeError, FileNotFoundError):
            continue


def test_nothing_cites_a_file_outside_the_repository():
    hits = []
    for name, text in tracked_texts():
        if name == "tests/test_docs.py":
            continue
        if name == ".ci/run":  # takes the megatron-core 0.20 wheel from the folder CI lays
            continue           # beside the clone (PyPI has none); it cites nothing
        hits += [f"{name}: {needle}" for needle in OUTSIDE if needle in text]
    assert not hits, hits


def test_no_package_archive_is_named_anywhere():
    """Packages come through their own clients by name (pip, apt-get download), never from an
    archive's address: none appears in code, docs, tests or messages. Checked by shape, so this
    test names no host itself."""
    import re

    shapes = {
        "a URL of a package file": re.compile(
            r"[a-z]+://\S+?\.(?:deb|rpm|whl|apk|tar\.(?:gz|xz|zst)|zip)\b", re.I),
        "an archive's pool/ path": re.compile(r"\bpool/(?:main|contrib|non-free|universe)/"),
        "a Debian or Ubuntu archive host": re.compile(
            r"\b(?:deb|ftp\d*|archive|security|ports)\.(?:debian|ubuntu)\.(?:org|com)\b"),
        "a package index's file path": re.compile(r"[a-z]+://[^\s/]+/packages/[0-9a-f]{2}/"),
    }
    hits = [f"{name}: {what}" for name, text in tracked_texts()
            for what, shape in shapes.items() if shape.search(text)]
    assert not hits, hits
    corpora = (ROOT / "megatron_hybridnorm" / "train" / "corpora.py").read_text()
    assert "urlopen" not in corpora and "urllib" not in corpora and "apt-get download" in corpora


def test_readme_scheme_table_is_the_scheme_descriptions():
    from megatron_hybridnorm.schemes import SCHEME_TABLE, markdown_table

    for page in ("README.md", "docs/schemes.md"):
        text = (ROOT / page).read_text()
        assert markdown_table() in text, page
        for name in SCHEME_TABLE:  # every scheme has its row and its form
            assert f"| `{name}` |" in text and SCHEME_TABLE[name].form


# the README examples' paper-sized settings, and the small ones the tests build
SMALL = {"hidden_size=2048": "hidden_size=64", "num_attention_heads=32": "num_attention_heads=4",
         "num_query_groups=8": "num_query_groups=2", "ffn_hidden_size=8192": "ffn_hidden_size=128",
         "vocab_size=100352": "vocab_size=128", "max_sequence_length=4096": "max_sequence_length=16"}


def test_readme_gptmodel_example_builds(megatron_single_rank):
    """The README's Python example, at a smaller size (its config is the paper's 1.2B): the
    model it builds is HybridNorm* with tied embeddings."""
    import re

    from megatron_hybridnorm.inspect import detect_scheme

    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## Using the specs in your own Megatron code\n\n```python\n(.*?)```",
                     readme, re.S).group(1)
    small = {"num_layers=16": "num_layers=2", **SMALL}
    for big, little in small.items():
        assert big in code, big
        code = code.replace(big, little)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    model = namespace["model"]
    assert model.share_embeddings_and_output_weights
    assert detect_scheme(model).scheme == "hybridnorm_star"


def test_readme_hybridmodel_example_builds(megatron_single_rank):
    """docs/hybrid-model.md's example, at a smaller size, after the README's GPTModel example's
    imports: HybridNorm* on a ``*-`` pattern, SmallInit counting blocks."""
    import math
    import re

    import torch

    from megatron_hybridnorm.inspect import detect_scheme

    readme = (ROOT / "README.md").read_text()
    gpt = re.search(r"## Using the specs in your own Megatron code\n\n```python\n(.*?)```",
                    readme, re.S).group(1)
    page = (ROOT / "docs" / "hybrid-model.md").read_text()
    code = re.search(r"# HybridModel: .*?```python\n(.*?)```", page, re.S).group(1)
    small = {'"*-" * 16': '"*-" * 2', **SMALL}
    for big, little in small.items():
        assert big in code, big
        code = code.replace(big, little)
    imports = "\n".join(line for line in gpt.splitlines() if line.startswith(("import", "from")))
    namespace = {}
    exec(compile(imports + "\n" + code, "README.md", "exec"), namespace)
    model, config = namespace["model"], namespace["config"]
    found = detect_scheme(model)
    assert (found.scheme, found.pattern) == ("hybridnorm_star", "*-*-")
    w = torch.empty(2000, 2000)
    config.output_layer_init_method(w)  # std / sqrt(2 * 2 blocks), not 4 layers
    assert abs(w.std().item() / (math.sqrt(2 / (5 * 64)) / 2) - 1) < 0.05


def test_readme_versions_table_is_the_version_matrix_run():
    """The README's "Megatron versions" table is the committed matrix run, rendered."""
    import json
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from version_matrix import markdown, upgrades_markdown

    run = json.loads((ROOT / "docs" / "versions" / "matrix.json").read_text())
    table = markdown(run["rows"]) + "\n\n" + upgrades_markdown(run["upgrades"])
    assert (ROOT / "docs" / "versions" / "matrix.md").read_text().strip() == table
    assert table in (ROOT / "README.md").read_text()
    assert {r["megatron_core"] for r in run["rows"]} >= {"0.16.1", "0.17.1", "0.18.2", "0.19.2",
                                                         "0.20.0"}
    assert all(r["returncode"] == 0 for r in run["rows"]), [r["leg"] for r in run["rows"]]
    assert run["upgrades"]["returncode"] == 0 and run["upgrades"]["pairs"]


def test_version_matrix_counts_a_junit_file(tmp_path):
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from version_matrix import cell, read_junit

    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite>'
        '<testcase classname="tests.test_reference" name="a"/>'
        '<testcase classname="tests.test_reference" name="b"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_hybrid" name="c"><skipped message="no HybridModel"/>'
        '</testcase><testcase classname="tests.test_other" name="d"/>'
        '</testsuite></testsuites>')
    areas = read_junit(xml)
    assert (areas["reference"]["passed"], areas["reference"]["failed"]) == (1, 1)
    assert areas["hybrid"]["skipped"] == 1 and areas["hybrid"]["skip_reasons"] == ["no HybridModel"]
    assert cell(areas["reference"]) == "**1 failed** (1/2)" and cell(areas["hybrid"]) == "skipped"
    assert cell(areas["tp"]) == "not run"


def test_readme_is_a_landing_page_with_links_that_resolve():
    import re

    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if target.startswith("http"):
                continue
            assert (page.parent / target).exists(), f"{page.name}: {target}"
    linked = set(re.findall(r"\(docs/([\w-]+\.md)\)", readme))
    assert linked == {p.name for p in pages[1:]}, "every docs page is linked from the README"


def test_the_public_paths_keep_working():
    """What command lines and users' code name, whatever the package's layout inside."""
    import os
    import subprocess
    import sys

    from megatron_hybridnorm import compat
    from megatron_hybridnorm.schemes import SCHEMES

    for module in ("megatron_hybridnorm.entrypoints", "megatron_hybridnorm.hybrid.entrypoints"):
        for scheme in SCHEMES:  # what Megatron-LM's --spec MODULE NAME imports
            assert compat.import_module((module, scheme)) is not None, (module, scheme)
    for module in ("inspect", "check", "hf", "train", "train.corpora", "train.summary",
                   "rehearse"):
        out = subprocess.run([sys.executable, "-m", f"megatron_hybridnorm.{module}", "--help"],
                             capture_output=True, text=True, env={**os.environ, "WORLD_SIZE": "1"})
        assert out.returncode == 0 and "usage:" in out.stdout, (module, out.stderr[-2000:])
    bin_dir = os.path.dirname(sys.executable)
    for script in ("hybridnorm-train", "hybridnorm-check", "hybridnorm-rehearse"):
        out = subprocess.run([os.path.join(bin_dir, script), "--help"], capture_output=True,
                             text=True)
        assert out.returncode == 0 and "usage:" in out.stdout, (script, out.stderr[-2000:])


def package_imports() -> dict[str, set[str]]:
    """{module: the package's modules it imports}, at the top or inside a function alike."""
    import ast

    pkg = ROOT / "megatron_hybridnorm"
    modules = {".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f
               for f in pkg.rglob("*.py")}
    graph = {}
    for name, f in modules.items():
        here = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = (".".join(here.split(".")[: len(here.split(".")) - node.level + 1])
                        if node.level else "")
                mod = ".".join(p for p in (base, node.module) if p)
                names = [mod, *(f"{mod}.{a.name}" for a in node.names)]
            else:
                continue
            for n in names:
                while n and n not in modules:  # a name inside a module: the module
                    n = n.rpartition(".")[0]
                if n and n != name and not name.startswith(n + "."):  # a package's own parents
                    found.add(n)
        graph[name] = found
    return graph


def test_the_core_imports_no_tool():
    """docs/architecture.md's direction: models and building blocks never import the tools
    (the load guards' scheme detection is the library's, models/detection.py)."""
    core = ("models", "transformer", "norms", "kernels", "schemes", "compat")
    tools = ("train", "check", "hf", "harness", "bridge", "inspect", "rehearse")
    graph = package_imports()
    floor = lambda m: m.split(".")[1] if "." in m else ""  # noqa: E731
    ours = [m for m in graph if floor(m) in core]
    bad = [f"{m}: {n}" for m in ours for n in graph[m] if floor(n) in tools]
    assert len(ours) > 30 and not bad, bad


def test_the_package_has_no_import_cycle():
    """No module imports, at the top or inside a function, one that imports it back (directly
    or around a loop); a lazy import then only defers an optional dependency or a version."""
    graph = package_imports()
    graph = {m: {n for n in ns if n != "megatron_hybridnorm"} for m, ns in graph.items()}
    cycles, index, low, stack, on = [], {}, {}, [], set()

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert sum(len(ns) for ns in graph.values()) > 100 and not cycles, cycles


def test_bridge_round_trip_table_is_the_committed_run():
    """docs/megatron-bridge.md's table is docs/bridge/round_trips.jsonl, which
    tests/test_bridge.py wrote (BRIDGE_FIGURES), row for row."""
    import json
    import re

    doc = (ROOT / "docs" / "megatron-bridge.md").read_text()
    table = re.search(r"<!-- round-trips -->\n(.*?)<!-- /round-trips -->", doc, re.S).group(1)
    rows = [line.strip("| ").split(" | ") for line in table.strip().splitlines()[2:]]
    runs = [json.loads(line) for line in
            (ROOT / "docs" / "bridge" / "round_trips.jsonl").read_text().splitlines()]
    want = [[r["variant"], f"{r['logits_rel_err']:.1e}", f"{r['logits_max_abs']:.1e}",
             f"{r['bitwise']}/{r['tensors']}", f"{r['as_our_exporter']}/{r['tensors']}"]
            for r in runs]
    assert rows == want
    from megatron_hybridnorm.schemes import SCHEMES

    assert set(SCHEMES) <= {r["variant"] for r in runs}


def test_study_tables_in_the_docs_are_the_committed_runs():
    """A study table shown in the docs is, line for line, one a committed run printed."""
    import re

    runs = {t.parent.name: t.read_text() for t in (ROOT / "docs" / "study").glob("*/table.txt")}
    shown = 0
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for block in re.findall(r"(?ms)^```\n((?:validation loss, \d+ seeds?|final validation loss "
                                r"by peak).*?)^```", page.read_text()):
            assert any(block.strip() in text for text in runs.values()), (page.name, block[:200])
            shown += 1
    assert shown >= 3
