"""Named corpora for ``hybridnorm-train --corpus NAME``: text any fresh machine can have offline.

- ``stdlib`` (the default): the running Python's standard library, code, read as bytes.
- ``austen``: Jane Austen's six novels, English prose, 4.0 MB. They come from Debian's package
  ``r-cran-janeaustenr`` 1.0.0-1 (bookworm; the R package janeaustenr by Julia Silge, MIT
  licence; the novels, published 1811-1818, are in the public domain). ``fetch`` downloads the
  1.6 MB package once (its SHA-256 pinned below), or takes a copy of it with ``--from``, and
  writes one text file per novel to the cache (and keeps the package there); training reads only
  the cache. Each chapter is a document, so the validation split (every 20th document) holds
  whole chapters.

    python -m megatron_hybridnorm.train.corpora fetch austen [--from FILE.deb]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from megatron_hybridnorm.train.data import (BYTE_VOCAB, Corpus, DataError, TokenStream, _split,
                                            documents_up_to, stdlib_corpus)


@dataclass(frozen=True)
class DebianSource:
    package: str
    url: str
    sha256: str
    licence: str


AUSTEN = DebianSource(
    package="r-cran-janeaustenr 1.0.0-1 (Debian bookworm)",
    url="http://deb.debian.org/debian/pool/main/r/r-cran-janeaustenr/"
        "r-cran-janeaustenr_1.0.0-1_all.deb",
    sha256="df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
    licence="package: MIT (Julia Silge); the novels (1811-1818): public domain",
)
AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma",
                 "northangerabbey", "persuasion")  # in order of publication
CHAPTER = re.compile(r"(?m)^(?=(?:CHAPTER|Chapter) [0-9IVXLC]+\.?[ \t]*$)")
NAMES = ("stdlib", "austen")


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "megatron-hybridnorm" / "corpora"


def _ar_member(deb: bytes, name: str) -> bytes:
    """One member of a Debian package (an ``ar`` archive)."""
    if not deb.startswith(b"!<arch>\n"):
        raise DataError("not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(deb):
        head = deb[pos : pos + 60]
        member, size = head[:16].decode().strip().rstrip("/"), int(head[48:58])
        if member == name:
            return deb[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
    raise DataError(f"the Debian package has no {name}")


def austen_texts(deb: bytes) -> dict[str, str]:
    """The novels' texts, from the package's bytes (checked against the pinned SHA-256)."""
    from megatron_hybridnorm.train.rdata import lazyload_strings

    digest = hashlib.sha256(deb).hexdigest()
    if digest != AUSTEN.sha256:
        raise DataError(f"the package's SHA-256 is {digest}, not {AUSTEN.sha256} "
                        f"({AUSTEN.package}): a different or damaged file")
    with tarfile.open(fileobj=io.BytesIO(_ar_member(deb, "data.tar.xz")), mode="r:xz") as tar:
        files = {Path(m.name).name: tar.extractfile(m).read() for m in tar.getmembers()
                 if m.name.endswith(("janeaustenr/data/Rdata.rdb", "janeaustenr/data/Rdata.rdx"))}
    if set(files) != {"Rdata.rdb", "Rdata.rdx"}:
        raise DataError("the package holds no janeaustenr/data/Rdata.rdb and .rdx")
    lines = lazyload_strings(files["Rdata.rdx"], files["Rdata.rdb"])
    missing = [n for n in AUSTEN_NOVELS if n not in lines]
    if missing:
        raise DataError(f"the package's data lacks {', '.join(missing)}")
    return {n: "\n".join(line or "" for line in lines[n]) + "\n" for n in AUSTEN_NOVELS}


def fetch_austen(deb_path: str | None = None, dest: Path | None = None) -> Path:
    """Write the novels to ``dest`` (default: the cache), from the package at ``deb_path`` or
    downloaded from Debian. Written to a temporary folder first and renamed: a folder that
    exists is complete."""
    dest = dest or cache_dir() / "austen"
    if deb_path:
        deb = Path(deb_path).read_bytes()
    else:
        try:
            with urllib.request.urlopen(AUSTEN.url, timeout=120) as r:
                deb = r.read()
        except OSError as e:
            raise DataError(f"could not download {AUSTEN.url} ({e}); on a machine without "
                            "access, copy that file here and pass --from FILE") from None
    texts = austen_texts(deb)
    dest.parent.mkdir(parents=True, exist_ok=True)
    kept = dest.parent / AUSTEN.url.rsplit("/", 1)[1]  # for a later fetch --from, offline
    if not kept.is_file():
        kept.write_bytes(deb)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".austen-"))
    for name, text in texts.items():
        (tmp / f"{name}.txt").write_text(text, encoding="utf-8")
    (tmp / "SOURCE.json").write_text(json.dumps(dict(
        package=AUSTEN.package, url=AUSTEN.url, sha256=AUSTEN.sha256, licence=AUSTEN.licence,
        novels=list(AUSTEN_NOVELS)), indent=2))
    if dest.exists():  # another fetch finished first; its copy is the same
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    else:
        tmp.rename(dest)
    return dest


def chapters(text: str) -> list[str]:
    """A novel cut before each chapter heading; the title page joins the first chapter."""
    parts = CHAPTER.split(text)
    if len(parts) > 1:
        parts = [parts[0] + parts[1], *parts[2:]]
    return [p for p in parts if p.strip()]


def austen_corpus(max_bytes: int, folder: Path | None = None) -> Corpus:
    folder = folder or cache_dir() / "austen"
    if not all((folder / f"{n}.txt").is_file() for n in AUSTEN_NOVELS):
        raise DataError(
            f"--corpus austen: the novels are not in {folder}; fetch them once with "
            "'python -m megatron_hybridnorm.train.corpora fetch austen' (1.6 MB from "
            "deb.debian.org; scripts/dev.sh does this at set-up; offline, add --from FILE.deb "
            "with a copy of the package)")
    docs = documents_up_to((chapter for n in AUSTEN_NOVELS for chapter in
                            chapters((folder / f"{n}.txt").read_text(encoding="utf-8"))),
                           max_bytes)
    total = sum(len(d) for d in docs)
    train, val = _split(docs, f"--corpus austen ({folder})")
    return Corpus(TokenStream(train), TokenStream(val), BYTE_VOCAB,
                  f"Jane Austen's novels ({AUSTEN.package}), {len(docs)} chapters, "
                  f"{total / 1e6:.1f} MB, bytes")


def named_corpus(name: str, max_bytes: int) -> Corpus:
    if name == "stdlib":
        return stdlib_corpus(max_bytes)
    if name == "austen":
        return austen_corpus(max_bytes)
    raise DataError(f"--corpus {name}: unknown; the corpora are {', '.join(NAMES)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_hybridnorm.train.corpora",
                                description="Fetch a named corpus into the cache, once.")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download (or copy) and unpack a corpus")
    f.add_argument("name", choices=["austen"])
    f.add_argument("--from", dest="deb", default=None,
                   help=f"a local copy of {AUSTEN.url.rsplit('/', 1)[1]} (no download)")
    f.add_argument("--if-missing", action="store_true",
                   help="do nothing when the cache already holds it")
    args = p.parse_args(argv)
    dest = cache_dir() / args.name
    if args.if_missing and dest.is_dir():
        return 0
    try:
        out = fetch_austen(args.deb)
    except (DataError, OSError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    print(f"wrote {out}/ ({AUSTEN.package}; {AUSTEN.licence})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
