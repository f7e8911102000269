"""Every command the README and docs/ show, and every flag they name, is one this repository's
parsers (or Megatron-LM's, or the named external tool's) accept: a renamed flag or module fails
here, not in a reader's terminal. Commands are read from ```bash blocks, "$ " lines of output
blocks and inline code that starts with a known command."""

import argparse
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
STARTS = ("scripts/dev.sh", "scripts/gpu_check.py", "benchmarks/bench_",
          "benchmarks/saved_", "bash ", "hybridnorm-train", "hybridnorm-check", "python ",
          "python3 ", "torchrun ", "pytest ", "lm-eval ", "CUDA_VISIBLE_DEVICES=", "MEGATRON_LM_")


def _joined(block: str) -> list[str]:
    out, cur = [], ""
    for line in block.splitlines():
        cur += line.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        out.append(cur)
        cur = ""
    return [c for c in out if c.strip()]


def page_commands(text: str) -> list[str]:
    cmds = []
    for lang, body in re.findall(r"(?ms)^```(\w*)\n(.*?)^```", text):
        if lang == "bash":
            cmds += _joined(body)
        elif lang == "":
            cmds += [line[2:] for line in _joined(body) if line.startswith("$ ")]
    prose = re.sub(r"(?ms)^```.*?^```", "", text)
    cmds += [c for c in re.findall(r"`([^`\n]+)`", prose) if c.startswith(STARTS)]
    return [_clean(c) for c in cmds]


def _clean(cmd: str) -> str:
    """Without its comment, extra spaces and the venv's path to a console script."""
    cmd = re.sub(r"\s+", " ", re.sub(r"\s+#\s.*$", "", cmd)).strip()
    return re.sub(r"(^|\s)\.venv/bin/", r"\1", cmd)


def page_flags(text: str) -> set[str]:
    """Flags named in prose: inline code that starts with --."""
    prose = re.sub(r"(?ms)^```.*?^```", "", text)
    spans = [c for c in re.findall(r"`([^`\n]+)`", prose) if c.startswith("--")]
    return {m for c in spans for m in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", c)}


ALL = [(p.relative_to(ROOT).as_posix(), c) for p in PAGES for c in page_commands(p.read_text())]
# and the command each committed study says made it
ALL += [(t.relative_to(ROOT).as_posix(), _clean(line[2:])) for t in sorted(ROOT.glob("docs/study/*/table.txt"))
        for line in t.read_text().splitlines()[:1] if line.startswith("$ ")]


def test_the_pages_show_commands():
    pages = {p for p, _ in ALL}
    assert {"README.md", "docs/training.md", "docs/megatron-lm.md", "docs/hugging-face.md",
            "docs/check.md", "docs/kernels.md", "docs/testing.md"} <= pages, pages


class _Parsed(Exception):
    pass


def _parse_only(main, argv):
    """Run a command's main() up to its argument parsing, and stop there."""
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        ns = original(self, args, namespace)
        raise _Parsed(ns)

    argparse.ArgumentParser.parse_args = parse_args
    try:
        main(argv)
    except _Parsed as e:
        return e.args[0]
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"{main} returned without parsing arguments")


def megatron_lm_flags() -> set[str]:
    pytest.importorskip("megatron.training.arguments", reason="Megatron-LM's parser")
    from megatron.training.arguments import add_megatron_arguments

    p = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    return {s for a in p._actions for s in a.option_strings}


def _train(argv, world=1):
    from megatron_hybridnorm.train import cli

    argv = [a for a in argv if a != "..."]
    if argv == ["--help"]:
        argv = []  # the help itself: the parser builds
    _, args = cli.parse(argv)
    cli.resolve(args, world, False)


def _module_main(module: str):
    import importlib

    mod = importlib.import_module(module)
    if hasattr(mod, "main"):
        return mod.main
    return importlib.import_module(module + ".__main__").main


def _script_main(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str((ROOT / path).parent))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.pop(0)
    return mod.main


def _spec_entry(argv):
    """pretrain_*.py --spec MODULE NAME ...: the entry point exists; other flags are
    Megatron-LM's."""
    from megatron_hybridnorm.compat import import_module

    i = argv.index("--spec")
    assert import_module(argv[i + 1:i + 3]) is not None
    flags = {a for a in argv if a.startswith("--")}
    assert flags <= megatron_lm_flags(), flags - megatron_lm_flags()


def validate(cmd: str) -> str:
    """Check one command; return what checked it."""
    argv = shlex.split(re.sub(r"<[^>]*>", "PLACEHOLDER", cmd))
    while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):  # environment assignments
        argv.pop(0)
    if argv[:1] == ["time"]:
        argv.pop(0)
    if argv[:1] == ["bash"] and len(argv) > 1:
        argv.pop(0)
    head = argv[0]
    world = 1
    if head == "torchrun":
        rest = argv[1:]
        if "--nproc-per-node" in rest:
            world = int(rest[rest.index("--nproc-per-node") + 1])
        if "-m" in rest:
            argv = ["python", *rest[rest.index("-m"):]]
        else:
            script = next(a for a in rest if a.endswith(".py"))
            argv = ["python", *rest[rest.index(script):]]
        head = argv[0]
    if head == "scripts/dev.sh":
        if len(argv) == 1:  # the prose names the script
            return "the set-up script"
        assert argv[1] in ("train", "test"), cmd
        if argv[1] == "train":
            _train(argv[2:])
            return "hybridnorm-train's parser"
        return _pytest(argv[2:])
    if head == "hybridnorm-train":
        _train(argv[1:], world)
        return "hybridnorm-train's parser"
    if head == "hybridnorm-check":
        argv = ["python", "-m", "megatron_hybridnorm.check", *argv[1:]]
    if head == "pytest":
        return _pytest(argv[1:])
    if head == "lm-eval":
        pytest.importorskip("lm_eval", reason="lm-evaluation-harness ([hf] extra)")
        assert argv[1] == "run" and "--model" in argv and "--tasks" in argv
        return "lm-eval (its end-to-end run is in test_hf)"
    if argv[0] in ("python", "python3"):
        if argv[1] == "-m":
            module, rest = argv[2], argv[3:]
            if module == "megatron_hybridnorm.train":
                _train(rest, world)
                return "hybridnorm-train's parser"
            if module == "megatron_hybridnorm.check":
                from megatron_hybridnorm.check.cli import LayoutError, parser, validate as layout

                args = parser().parse_args(rest)
                try:
                    layout(args, world)
                except LayoutError as e:
                    if "needs Transformer Engine" not in str(e):
                        raise
                    pytest.skip(f"the layout check of this TE command needs TE: {e}")
                return "hybridnorm-check's parser and layout check"
            assert module.startswith("megatron_hybridnorm."), cmd
            if module == "megatron_hybridnorm.rehearse":  # and the command it rehearses
                from megatron_hybridnorm.rehearse import parser as rehearse_parser

                inner = rehearse_parser().parse_args(rest).args
                if "--spec" in inner:
                    _spec_entry(inner)
                return "the runner's parser, the --spec entry point and Megatron-LM's flags"
            main = _module_main(module)
            if rest:  # with no arguments the prose names the command; it exists
                _parse_only(main, [a for a in rest if a != "..."])
            return f"{module}'s parser"
        if argv[1] in ("pretrain_gpt.py", "pretrain_hybrid.py"):
            _spec_entry(argv[1:])
            return "the --spec entry point and Megatron-LM's flags"
        _parse_only(_script_main(argv[1]), argv[2:])
        return f"{argv[1]}'s parser"
    if head.endswith(".py") and (ROOT / head).is_file():
        _parse_only(_script_main(head), argv[1:])
        return f"{head}'s parser"
    if head.endswith(".sh"):
        assert (ROOT / head).is_file(), head
        return "a script in the repository (its own tests run it)"
    raise AssertionError(f"no test knows the command {cmd!r}: add it to validate()")


def _pytest(args):
    import tomllib

    markers = {m.split(":")[0] for m in tomllib.loads(
        (ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]}
    if "-m" in args:
        expr = args[args.index("-m") + 1]
        used = set(re.findall(r"[a-z_]+", expr)) - {"not", "and", "or"}
        assert used <= markers, used - markers
    return "pytest's markers"


@pytest.mark.parametrize("page,cmd", ALL, ids=[f"{p}: {c[:60]}" for p, c in ALL])
def test_command_is_accepted(page, cmd, megatron_single_rank):
    assert validate(cmd)


def test_every_flag_named_in_prose_exists(megatron_single_rank):
    from megatron_hybridnorm.check.cli import parser as check_parser
    from megatron_hybridnorm.rehearse import parser as rehearse_parser
    from megatron_hybridnorm.train.cli import parser as train_parser

    known = {s for p in (train_parser(), check_parser(), rehearse_parser()) for a in p._actions
             for s in a.option_strings}
    known |= megatron_lm_flags()
    known |= {"--nproc-per-node", "--collect-only", "--dry-run", "--from", "--if-missing",
              "--no-deps"}  # (pip's, in docs/megatron-bridge.md)
    missing = {}
    for page in PAGES:
        for flag in page_flags(page.read_text()) - known:
            missing.setdefault(flag, []).append(page.name)
    assert not missing, missing


def test_the_reader_finds_what_it_should():
    text = ("```bash\nscripts/dev.sh train --steps 5 \\\n    --seeds 2   # comment\n```\n"
            "```\n$ hybridnorm-check --tp 2\noutput\n```\nrun `hybridnorm-train --seeds 3` "
            "with `--lr-sweep 1e-3,1e-2` or `--eval-batches`, not `model.py`")
    assert page_commands(text) == ["scripts/dev.sh train --steps 5 --seeds 2",
                                   "hybridnorm-check --tp 2", "hybridnorm-train --seeds 3"]
    assert page_flags(text) == {"--lr-sweep", "--eval-batches"}
    with pytest.raises(AssertionError, match="no test knows the command"):
        validate("make everything")
    with pytest.raises(SystemExit):
        validate("scripts/dev.sh train --no-such-flag")
