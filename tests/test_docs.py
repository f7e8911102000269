"""The repository stands alone: its docs, code and examples cite no file outside it."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = ("HYBRIDNORM.md", "../shared", "shared/gpu", "shared/seed")


def test_nothing_cites_a_file_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    hits = []
    for name in files:
        if name == "tests/test_docs.py":
            continue
        try:
            text = (ROOT / name).read_text()
        except (UnicodeDecodeError, FileNotFoundError):
            continue
        hits += [f"{name}: {needle}" for needle in OUTSIDE if needle in text]
    assert not hits, hits
