"""The named corpora: the reader of R's lazy-load data, the Austen corpus from Debian's package,
and --corpus on the command line."""

import dataclasses
import gzip
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib

import pytest

from megatron_hybridnorm.train import corpora
from megatron_hybridnorm.train.corpora import load_corpus
from megatron_hybridnorm.train.data import DataError
from megatron_hybridnorm.train.r_lazyload import RDataError, lazyload_strings, unserialize

DEB = corpora.AUSTEN.filename
FETCH = corpora.FETCH


def cached_deb():
    path = corpora.cache_dir() / DEB
    if not path.is_file():
        pytest.skip(f"{path} is not here: scripts/dev.sh fetches it at set-up ({FETCH})")
    return path


# ---- R serialization, written by hand from the format's description --------------------------

def _i(v):
    return struct.pack(">i", v)


def _char(s, utf8=True):
    return _i(9 | ((1 << 15) if utf8 else 0)) + _i(len(s.encode())) + s.encode()


def _strsxp(values, names=None):
    flags = 16 | ((1 << 9) if names else 0)
    out = _i(flags) + _i(len(values)) + b"".join(_i(9) + _i(-1) if v is None else _char(v)
                                                   for v in values)
    if names:  # attributes: a pairlist whose tag is the symbol "names"
        out += _i(2 | (1 << 10)) + _i(1) + _char("names") + _strsxp(names) + _i(254)
    return out


def _xdr(body, version=3):
    head = b"X\n" + _i(version) + _i(0x40201) + _i(0x30500)
    if version == 3:
        head += _i(5) + b"UTF-8"
    return head + body


def test_unserialize_reads_character_vectors_with_missing_values_and_names():
    assert unserialize(_xdr(_strsxp(["It is a truth", None, "caf\u00e9"]))) == [
        "It is a truth", None, "caf\u00e9"]
    assert unserialize(_xdr(_strsxp(["a", "b"], names=["x", "y"]), version=2)) == {
        "x": "a", "y": "b"}
    latin1 = _i(16) + _i(1) + _i(9 | (1 << 14)) + _i(1) + b"\xa3"  # a latin-1 pound sign
    assert unserialize(_xdr(latin1)) == ["\u00a3"]


def _lazyload(objs: dict[str, bytes]) -> tuple[bytes, bytes]:
    """R's lazy-load database (.rdx, .rdb) holding the serialized objects ``objs``."""
    rdb, variables = b"", []
    for name, data in objs.items():
        chunk = struct.pack(">I", len(data)) + zlib.compress(data)
        variables.append((name, len(rdb), len(chunk)))
        rdb += chunk
    # the index: list(variables = c(one = c(offset, length), ...), compressed = TRUE)
    ints = b"".join(_i(13 | (1 << 9)) + _i(2) + _i(off) + _i(n) + _i(254)  # no names on pairs
                    for _, off, n in variables)
    var_list = (_i(19 | (1 << 9)) + _i(len(variables)) + ints + _i(2 | (1 << 10)) + _i(1)
                + _char("names") + _strsxp([v[0] for v in variables]) + _i(254))
    index = (_i(19 | (1 << 9)) + _i(2) + var_list + _i(10) + _i(1) + _i(1)
             + _i(2 | (1 << 10)) + _i(255 | (1 << 8)) + _strsxp(["variables", "compressed"])
             + _i(254))
    return gzip.compress(_xdr(index), mtime=0), rdb  # no clock in the bytes: built twice, equal


def test_lazyload_database_round_trip():
    rdx, rdb = _lazyload({"one": _xdr(_strsxp(["first line", "second"])),
                          "two": _xdr(_strsxp(["x"]))})
    assert lazyload_strings(rdx, rdb) == {"one": ["first line", "second"], "two": ["x"]}


@pytest.mark.parametrize("data,message", [
    (b"A\n" + _i(3), "not R's XDR"),
    (_xdr(_i(3) + _i(0)), "SEXP type 3"),  # a closure
    (_xdr(_i(16) + _i(2) + _char("only one")), "truncated"),
])
def test_unserialize_refuses_what_it_does_not_know(data, message):
    with pytest.raises(RDataError, match=message):
        unserialize(data)


def test_chapters_cut_before_each_heading_and_keep_the_title_with_the_first():
    text = "EMMA\n\nBy Jane Austen\n\nCHAPTER I\n\nEmma Woodhouse\n\nCHAPTER II\n\nMr. Weston\n"
    assert corpora.chapters(text) == [
        "EMMA\n\nBy Jane Austen\n\nCHAPTER I\n\nEmma Woodhouse\n\n", "CHAPTER II\n\nMr. Weston\n"]
    # a heading inside a line is no heading
    assert corpora.chapters("see Chapter 3 of it\nand more") == ["see Chapter 3 of it\nand more"]


# ---- the Austen corpus --------------------------------------------------------------------------

# A Debian package built here, as dpkg-deb lays one out: an ar archive of debian-binary,
# control.tar and data.tar, the R data under the R library's janeaustenr/data/.

def _ar(members: list[tuple[str, bytes]]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members:
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
        out += data + (b"\n" if len(data) % 2 else b"")
    return out


def _tar(files: dict[str, bytes], compression: str, mtime: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def synthetic_texts() -> dict[str, list[str]]:
    return {n: [n.upper(), "", "CHAPTER I", "", f"The first line of {n}, \u00a3 5.", None, "End."]
            for n in corpora.AUSTEN_NOVELS}


def build_deb(novels: dict[str, list[str]], compression: str = "xz", mtime: int = 0) -> bytes:
    rdx, rdb = _lazyload({n: _xdr(_strsxp(lines)) for n, lines in novels.items()})
    lib = "./usr/lib/R/site-library/janeaustenr/data/"
    return _ar([("debian-binary", b"2.0\n"),
                ("control.tar.xz", _tar({"./control": b"Package: r-cran-janeaustenr\n"}, "xz",
                                        mtime)),
                (f"data.tar.{compression}", _tar({lib + "Rdata.rdb": rdb, lib + "Rdata.rdx": rdx},
                                                 compression, mtime))])


def joined(lines: list[str]) -> str:
    return "\n".join(line or "" for line in lines) + "\n"


@pytest.fixture
def pinned_to_synthetic(monkeypatch):
    """AUSTEN's pins set to the synthetic novels' texts: the fetch's own logic, no Debian file."""
    texts = {n: joined(lines) for n, lines in synthetic_texts().items()}
    pins = {n: hashlib.sha256(t.encode()).hexdigest() for n, t in texts.items()}
    monkeypatch.setattr(corpora, "AUSTEN", dataclasses.replace(corpora.AUSTEN, texts=pins))
    return texts


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "megatron-hybridnorm" / "corpora"


def stand_in_apt_get(folder, deb: bytes | None, exit_code: int = 0, say: str = "") -> None:
    """An apt-get on PATH that records its arguments and folder, and writes ``deb`` where the
    real one would (or fails, saying ``say``)."""
    folder.mkdir(exist_ok=True)
    if deb is not None:
        (folder / "package.deb").write_bytes(deb)
    script = folder / "apt-get"
    script.write_text(f"""#!/bin/sh
echo "$@" > "{folder}/args"; pwd > "{folder}/cwd"
[ {exit_code} -eq 0 ] || {{ echo "{say}" >&2; exit {exit_code}; }}
cp "{folder}/package.deb" ./{DEB}
echo "W: Download is performed unsandboxed as root" >&2
""")
    script.chmod(0o755)


def run_fetch(capsys, *args) -> tuple[int, str, str]:
    try:
        rc = corpora.main(["fetch", "austen", *args])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_fetch_runs_apt_get_download_by_name_and_exact_version(
        tmp_path, monkeypatch, capsys, cache, pinned_to_synthetic):
    bin_dir = tmp_path / "bin"
    stand_in_apt_get(bin_dir, build_deb(synthetic_texts()))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    rc, out, err = run_fetch(capsys)
    assert rc == 0, err
    assert (bin_dir / "args").read_text().split() == ["download", "r-cran-janeaustenr=1.0.0-1"]
    ran_in = (bin_dir / "cwd").read_text().strip()
    assert not ran_in.startswith(str(cache)) and not os.path.exists(ran_in)  # a temporary folder
    folder = cache / "austen"
    assert f"wrote {folder}/" in out
    for name, text in pinned_to_synthetic.items():
        assert (folder / f"{name}.txt").read_text(encoding="utf-8") == text
    assert (cache / DEB).read_bytes() == build_deb(synthetic_texts())  # kept, for --from later
    source = json.loads((folder / "SOURCE.json").read_text())
    assert source["sha256"] == corpora.AUSTEN.texts and source["version"] == "1.0.0-1"


def test_a_rebuilt_package_with_the_same_texts_passes_through_from(
        tmp_path, capsys, cache, pinned_to_synthetic):
    rebuilt = build_deb(synthetic_texts(), compression="gz", mtime=1700000000)
    assert rebuilt != build_deb(synthetic_texts())
    (tmp_path / DEB).write_bytes(rebuilt)
    rc, out, err = run_fetch(capsys, "--from", str(tmp_path / DEB))
    assert rc == 0, err
    assert (cache / "austen" / "emma.txt").read_text(encoding="utf-8") == \
        pinned_to_synthetic["emma"]


@pytest.mark.parametrize("damage", ["truncated", "not_a_package", "no_r_data", "bad_r_data"])
def test_a_damaged_package_is_refused_and_nothing_is_written(
        tmp_path, capsys, cache, pinned_to_synthetic, damage):
    good = build_deb(synthetic_texts())
    deb = {"truncated": good[: len(good) // 2],
           "not_a_package": b"<html>Not Found</html>",
           "no_r_data": _ar([("debian-binary", b"2.0\n"),
                             ("data.tar.xz", _tar({"./README": b"x"}, "xz", 0))]),
           "bad_r_data": _ar([("data.tar.xz", _tar({"./janeaustenr/data/Rdata.rdb": b"junk",
                                                    "./janeaustenr/data/Rdata.rdx": b"junk"},
                                                   "xz", 0))])}[damage]
    (tmp_path / "x.deb").write_bytes(deb)
    rc, out, err = run_fetch(capsys, "--from", str(tmp_path / "x.deb"))
    assert rc == 2 and out == ""
    assert err.startswith("python -m megatron_hybridnorm.train.corpora: error: ")
    assert {"truncated": "damaged or truncated", "not_a_package": "not a Debian package",
            "no_r_data": "no janeaustenr/data/Rdata.rdb",
            "bad_r_data": "R data cannot be read"}[damage] in err, err
    assert not (cache / "austen").exists() and not (cache / DEB).exists()


def test_a_changed_text_is_refused_by_name(tmp_path, capsys, cache, pinned_to_synthetic):
    novels = synthetic_texts()
    novels["emma"][4] = novels["emma"][4].replace("first", "fir5t")
    (tmp_path / DEB).write_bytes(build_deb(novels))
    rc, out, err = run_fetch(capsys, "--from", str(tmp_path / DEB))
    assert rc == 2
    want = hashlib.sha256(joined(novels["emma"]).encode()).hexdigest()
    assert f"emma's text has SHA-256 {want}, not the pinned {corpora.AUSTEN.texts['emma']}" in err
    assert "a changed text" in err and not (cache / "austen").exists()


def test_no_apt_get_says_what_to_run_and_what_to_pass(tmp_path, monkeypatch, capsys, cache):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    rc, out, err = run_fetch(capsys)
    assert rc == 2
    assert "no apt-get on this machine" in err
    assert "run 'apt-get download r-cran-janeaustenr=1.0.0-1'" in err
    assert f"{FETCH} --from {DEB}" in err
    assert "://" not in err


def test_a_failing_apt_get_is_reported_with_what_it_said(tmp_path, monkeypatch, capsys, cache):
    stand_in_apt_get(tmp_path / "bin", None, exit_code=100,
                     say="E: Unable to locate package r-cran-janeaustenr")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    rc, out, err = run_fetch(capsys)
    assert rc == 2
    assert "apt-get download r-cran-janeaustenr=1.0.0-1 failed (exit 100: E: Unable to locate " \
           "package r-cran-janeaustenr)" in err
    assert "'apt-get update' first" in err and f"--from {DEB}" in err
    assert not (cache / "austen").exists()


def test_the_pins_are_on_the_novels_texts_not_on_the_package():
    assert set(corpora.AUSTEN.texts) == set(corpora.AUSTEN_NOVELS)
    assert len(corpora.AUSTEN_NOVELS) == 6
    assert all(len(h) == 64 and int(h, 16) >= 0 for h in corpora.AUSTEN.texts.values())
    with pytest.raises(DataError, match="not a Debian package"):
        corpora.austen_texts(b"not the package")


def test_the_corpus_asks_to_be_fetched_when_it_is_not_there(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(DataError, match=f"not in {tmp_path}.*{FETCH}.*apt-get download "
                                        "r-cran-janeaustenr=1.0.0-1.*--from FILE.deb"):
        load_corpus(None, None, None, 10**6, "austen")


def test_a_cached_novel_that_changed_is_refused_at_load(tmp_path, pinned_to_synthetic):
    (tmp_path / DEB).write_bytes(build_deb(synthetic_texts()))
    folder = corpora.fetch_austen(str(tmp_path / DEB), tmp_path / "austen")
    (folder / "persuasion.txt").write_text("edited\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"--corpus austen \(.*\): persuasion's text has SHA-256 .*"
                                        "delete the folder and fetch again"):
        corpora.austen_corpus(10**8, folder)


def test_fetch_from_a_copy_writes_the_six_novels(tmp_path, monkeypatch):
    deb = cached_deb()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "megatron_hybridnorm.train.corpora", "fetch",
                          "austen", "--from", str(deb)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    folder = tmp_path / "megatron-hybridnorm" / "corpora" / "austen"
    assert f"wrote {folder}/" in out.stdout and "public domain" in out.stdout
    texts = {n: (folder / f"{n}.txt").read_text(encoding="utf-8") for n in corpora.AUSTEN_NOVELS}
    # facts about the books, not about this reader: their opening lines, and the 73,422 lines of
    # R's janeaustenr::austen_books() ("Text Mining with R", Silge and Robinson, chapter 1)
    assert "It is a truth universally acknowledged, that a single man in possession\nof a " \
           "good fortune, must be in want of a wife." in texts["prideprejudice"]
    assert texts["emma"].startswith("EMMA\n\nBy Jane Austen")
    assert "Emma Woodhouse, handsome, clever, and rich" in texts["emma"]
    assert "Sir Walter Elliot, of Kellynch Hall, in Somersetshire" in texts["persuasion"]
    assert "\u00a3" in texts["mansfieldpark"]  # its pounds, whose encoding 0.1.5 fixed
    assert sum(t.count("\n") for t in texts.values()) == 73422
    again = subprocess.run([sys.executable, "-m", "megatron_hybridnorm.train.corpora", "fetch",
                            "austen", "--if-missing"], capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout == ""  # nothing to do, no download


def test_the_austen_corpus_holds_out_whole_chapters(tmp_path, monkeypatch):
    deb = cached_deb()
    folder = corpora.fetch_austen(str(deb), tmp_path / "austen")
    c = corpora.austen_corpus(10**8, folder)
    assert c.vocab_size == 256
    assert "Jane Austen's novels" in c.description and "269 chapters" in c.description
    assert "4.0 MB" in c.description
    # every 20th of 269 chapters: 13 in validation, the rest for training, all bytes used once
    total = sum((folder / f"{n}.txt").stat().st_size for n in corpora.AUSTEN_NOVELS)
    assert len(c.train) + len(c.val) == total
    assert 0.03 < len(c.val) / total < 0.07
    assert bytes(c.val.window(0, 9).tolist()).startswith(b"CHAPTER")
    small = corpora.austen_corpus(10**6, folder)  # --max-corpus-mb 1: the first novels only
    assert 1e6 <= len(small.train) + len(small.val) < 1.1e6


def test_corpus_flag_conflicts_and_names_are_checked(tmp_path):
    with pytest.raises(DataError, match="one of --text, --data-path and --corpus, not --text "
                                        "and --corpus"):
        load_corpus(str(tmp_path / "x.txt"), None, None, 10**6, "austen")
    with pytest.raises(DataError, match="--corpus nope: unknown; the corpora are stdlib, austen"):
        load_corpus(None, None, None, 10**6, "nope")
    assert "standard library" in load_corpus(None, None, None, 10**5, "stdlib").description


def test_the_real_package_rebuilt_with_other_compression_passes(tmp_path):
    """Debian's own file, repacked (data.tar.gz, other times): same novels, same pins."""
    deb = cached_deb().read_bytes()
    member, data = corpora._ar_member(deb, "data.tar")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    rebuilt = _ar([("debian-binary", b"2.0\n"), ("data.tar.gz", _tar(files, "gz", 1700000000))])
    assert member == "data.tar.xz" and rebuilt != deb
    assert corpora.austen_texts(rebuilt) == corpora.austen_texts(deb)
