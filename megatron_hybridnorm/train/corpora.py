"""Named corpora for ``hybridnorm-train --corpus NAME``: text any fresh machine can have offline;
and ``load_corpus``, the one source a run asks for (``--text``, ``--data-path`` or ``--corpus``).

- ``stdlib`` (the default): the running Python's standard library, code, read as bytes.
- ``austen``: Jane Austen's six novels, English prose, 4.0 MB. They come from Debian's package
  ``r-cran-janeaustenr`` 1.0.0-1 (bookworm; the R package janeaustenr by Julia Silge, MIT
  licence; the novels, published 1811-1818, are in the public domain). ``fetch`` gets the 1.6 MB
  package through the system's own client, ``apt-get download``, by name and version (so through
  whatever mirror or proxy the machine uses), or takes a copy of it with ``--from``. It writes
  one text file per novel to the cache, each checked against its pinned SHA-256: the pin is on
  the texts the studies read, so a rebuilt package with the same texts passes and a changed text
  does not. Training reads only the cache. Each chapter is a document, so the validation split
  (every 20th document) holds whole chapters.

    python -m megatron_hybridnorm.train.corpora fetch austen [--from FILE.deb]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from megatron_hybridnorm.train.data import (BYTE_VOCAB, Corpus, DataError, TokenStream, _split,
                                            documents_up_to, indexed_corpus, stdlib_corpus,
                                            text_corpus)
from megatron_hybridnorm.train.r_lazyload import RDataError, lazyload_strings


@dataclass(frozen=True)
class DebianPackage:
    name: str
    version: str
    release: str
    licence: str
    texts: dict[str, str]  # text name -> SHA-256 of its UTF-8 bytes as written to the cache

    @property
    def spec(self) -> str:
        """What ``apt-get download`` takes: exactly this version."""
        return f"{self.name}={self.version}"

    @property
    def filename(self) -> str:
        return f"{self.name}_{self.version}_all.deb"

    def describe(self) -> str:
        return f"{self.name} {self.version} ({self.release})"


AUSTEN = DebianPackage(
    name="r-cran-janeaustenr", version="1.0.0-1", release="Debian bookworm",
    licence="package: MIT (Julia Silge); the novels (1811-1818): public domain",
    texts={  # in order of publication
        "sensesensibility": "105e1651fe93bed7130078578efd31e0c557d68667ba672ddc876f735b30fe09",
        "prideprejudice": "dfc684d4f857fa938268f9ab9c5567b64bd0691251eca959644adeabe6287a4d",
        "mansfieldpark": "98bc90519cdf4ef663ad7de2734bb529435ef24f7abbde6bb1a50898871dafe9",
        "emma": "7c67b5985c6d0de1efaeb5d342d52cb82c38083c40e2295129e30e87ee690ebe",
        "northangerabbey": "51f91bbe0517db8e65cff009b097ce0a1836124c4e0532ac19e6c0cad982abed",
        "persuasion": "8061549557aebd2fd6e353d18d9197cb707029112bd52d4d8b174583a925848a",
    })
AUSTEN_NOVELS = tuple(AUSTEN.texts)
CHAPTER = re.compile(r"(?m)^(?=(?:CHAPTER|Chapter) [0-9IVXLC]+\.?[ \t]*$)")
NAMES = ("stdlib", "austen")
FETCH = "python -m megatron_hybridnorm.train.corpora fetch austen"


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "megatron-hybridnorm" / "corpora"


def _ar_member(deb: bytes, prefix: str) -> tuple[str, bytes]:
    """The first member of a Debian package (an ``ar`` archive) whose name starts with
    ``prefix``, as (name, bytes)."""
    if not deb.startswith(b"!<arch>\n"):
        raise DataError("not a Debian package (no ar header): a damaged or different file")
    pos = 8
    while pos + 60 <= len(deb):
        head = deb[pos : pos + 60]
        try:
            member, size = head[:16].decode().strip().rstrip("/"), int(head[48:58])
        except ValueError:
            break
        if member.startswith(prefix):
            if pos + 60 + size > len(deb):
                break
            return member, deb[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
    raise DataError(f"the Debian package holds no complete {prefix}*: a damaged or truncated file")


def check_texts(texts: dict[str, str]) -> None:
    """Refuse texts that are not, byte for byte, the pinned ones."""
    for name, text in texts.items():
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if digest != AUSTEN.texts[name]:
            raise DataError(f"{name}'s text has SHA-256 {digest}, not the pinned "
                            f"{AUSTEN.texts[name]} ({AUSTEN.describe()}): a changed text")


def austen_texts(deb: bytes) -> dict[str, str]:
    """The novels' texts, read out of the package's R data and checked against their pins."""
    member, data = _ar_member(deb, "data.tar")
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            files = {Path(m.name).name: tar.extractfile(m).read() for m in tar.getmembers()
                     if m.name.endswith(("janeaustenr/data/Rdata.rdb",
                                         "janeaustenr/data/Rdata.rdx"))}
    except (tarfile.TarError, EOFError, OSError, lzma.LZMAError) as e:
        raise DataError(f"the package's {member} cannot be read ({e}): a damaged file") from None
    if set(files) != {"Rdata.rdb", "Rdata.rdx"}:
        raise DataError("the package holds no janeaustenr/data/Rdata.rdb and .rdx")
    try:
        lines = lazyload_strings(files["Rdata.rdx"], files["Rdata.rdb"])
    except (RDataError, OSError, EOFError, zlib.error) as e:  # gzip's errors are OSErrors
        raise DataError(f"the package's R data cannot be read ({e}): a damaged file") from None
    missing = [n for n in AUSTEN.texts if n not in lines]
    if missing:
        raise DataError(f"the package's data lacks {', '.join(missing)}")
    texts = {n: "\n".join(line or "" for line in lines[n]) + "\n" for n in AUSTEN.texts}
    check_texts(texts)
    return texts


def apt_get_download(pkg: DebianPackage) -> bytes:
    """The package's bytes, from ``apt-get download NAME=VERSION`` run in a temporary folder."""
    apt_get = shutil.which("apt-get")
    by_hand = (f"on a Debian or Ubuntu machine, run 'apt-get download {pkg.spec}' and pass the "
               f"file it writes: {FETCH} --from {pkg.filename}")
    if apt_get is None:
        raise DataError(f"no apt-get on this machine to fetch {pkg.describe()}; {by_hand}")
    with tempfile.TemporaryDirectory(prefix="hybridnorm-apt-") as tmp:
        try:
            out = subprocess.run([apt_get, "download", pkg.spec], cwd=tmp, capture_output=True,
                                 text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DataError(f"apt-get download {pkg.spec} did not run ({e}); {by_hand}") from None
        debs = sorted(Path(tmp).glob(f"{pkg.name}_*.deb"))
        if out.returncode != 0 or not debs:
            said = (out.stderr or out.stdout).strip().splitlines()[-3:]
            raise DataError(f"apt-get download {pkg.spec} failed (exit {out.returncode}"
                            + (f": {' / '.join(said)}" if said else "") + "); where apt does "
                            f"not know the package, run 'apt-get update' first; or {by_hand}")
        return debs[0].read_bytes()


def fetch_austen(deb_path: str | None = None, dest: Path | None = None) -> Path:
    """Write the novels to ``dest`` (default: the cache), from the package at ``deb_path`` or
    from ``apt-get download``. Written to a temporary folder first and renamed: a folder that
    exists is complete."""
    dest = dest or cache_dir() / "austen"
    if deb_path:
        try:
            deb = Path(deb_path).read_bytes()
        except OSError as e:
            raise DataError(f"--from {deb_path}: {e.strerror or e}") from None
    else:
        deb = apt_get_download(AUSTEN)
    texts = austen_texts(deb)
    dest.parent.mkdir(parents=True, exist_ok=True)
    kept = dest.parent / AUSTEN.filename  # for a later fetch --from, offline
    if not kept.is_file():
        kept.write_bytes(deb)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".austen-"))
    for name, text in texts.items():
        (tmp / f"{name}.txt").write_text(text, encoding="utf-8")
    (tmp / "SOURCE.json").write_text(json.dumps(dict(
        package=AUSTEN.name, version=AUSTEN.version, release=AUSTEN.release,
        licence=AUSTEN.licence, sha256=AUSTEN.texts), indent=2))
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
            f"'{FETCH}' (a 1.6 MB package through apt-get download {AUSTEN.spec}; "
            "scripts/dev.sh does this at set-up; without apt-get, add --from FILE.deb with a "
            "copy of the package)")
    texts = {n: (folder / f"{n}.txt").read_text(encoding="utf-8") for n in AUSTEN_NOVELS}
    try:
        check_texts(texts)
    except DataError as e:
        raise DataError(f"--corpus austen ({folder}): {e}; delete the folder and fetch again: "
                        f"'{FETCH}'") from None
    docs = documents_up_to((chapter for n in AUSTEN_NOVELS for chapter in chapters(texts[n])),
                           max_bytes)
    total = sum(len(d) for d in docs)
    train, val = _split(docs, f"--corpus austen ({folder})")
    return Corpus(TokenStream(train), TokenStream(val), BYTE_VOCAB,
                  f"Jane Austen's novels ({AUSTEN.describe()}), {len(docs)} chapters, "
                  f"{total / 1e6:.1f} MB, bytes")


def named_corpus(name: str, max_bytes: int) -> Corpus:
    if name == "stdlib":
        return stdlib_corpus(max_bytes)
    if name == "austen":
        return austen_corpus(max_bytes)
    raise DataError(f"--corpus {name}: unknown; the corpora are {', '.join(NAMES)}")


def load_corpus(text: str | None, data_path: str | None, vocab_size: int | None,
                max_bytes: int, corpus: str | None = None) -> Corpus:
    """``--text``, ``--data-path`` or the named ``--corpus`` (default: the standard library)."""
    given = [f for f, v in (("--text", text), ("--data-path", data_path), ("--corpus", corpus))
             if v]
    if len(given) > 1:
        raise DataError(f"pass one of --text, --data-path and --corpus, not {' and '.join(given)}")
    if data_path:
        return indexed_corpus(data_path, vocab_size)
    if vocab_size is not None:
        raise DataError("--vocab-size applies to --data-path only (byte-level text has 256)")
    if text:
        return text_corpus(text, max_bytes)
    return named_corpus(corpus or "stdlib", max_bytes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_hybridnorm.train.corpora",
                                description="Fetch a named corpus into the cache, once.")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="get (apt-get download, or copy) and unpack a corpus")
    f.add_argument("name", choices=["austen"])
    f.add_argument("--from", dest="deb", default=None,
                   help=f"a copy of {AUSTEN.filename}, as 'apt-get download {AUSTEN.spec}' "
                        "writes it on a Debian or Ubuntu machine (no apt-get here)")
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
    print(f"wrote {out}/ ({AUSTEN.describe()}; {AUSTEN.licence})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
