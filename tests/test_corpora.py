"""The named corpora: the reader of R's lazy-load data, the Austen corpus from Debian's package,
and --corpus on the command line."""

import gzip
import struct
import subprocess
import sys
import zlib

import pytest

from megatron_hybridnorm.train import corpora
from megatron_hybridnorm.train.data import DataError, load_corpus
from megatron_hybridnorm.train.rdata import RDataError, lazyload_strings, unserialize

DEB = corpora.AUSTEN.url.rsplit("/", 1)[1]
FETCH = "python -m megatron_hybridnorm.train.corpora fetch austen"


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


def test_lazyload_database_round_trip():
    objs = {"one": _xdr(_strsxp(["first line", "second"])), "two": _xdr(_strsxp(["x"]))}
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
    assert lazyload_strings(gzip.compress(_xdr(index)), rdb) == {
        "one": ["first line", "second"], "two": ["x"]}


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

def test_the_package_is_checked_against_its_pinned_digest():
    with pytest.raises(DataError, match="SHA-256 is .* a different or damaged file"):
        corpora.austen_texts(b"!<arch>\nnot the package")


def test_the_corpus_asks_to_be_fetched_when_it_is_not_there(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(DataError, match=f"not in {tmp_path}.*{FETCH}.*--from FILE.deb"):
        load_corpus(None, None, None, 10**6, "austen")


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
