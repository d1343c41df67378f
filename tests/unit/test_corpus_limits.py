"""tasks.corpus: a 50 MB line or record is refused with an error naming the file, the line, the key and the fix,
without being read whole; one within the limit is read as before."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydistill.tasks.config import CorpusConfig
from raydistill.tasks.corpus import CorpusError, bounded_lines, read_documents

BIG = 50_000_000  # one 50 MB line


def _cfg(path, **kw) -> CorpusConfig:
    return CorpusConfig(path=str(path), max_tokens=None, **kw)


@pytest.fixture(scope="module")
def big_files(tmp_path_factory):
    """A .txt with a 50 MB line after two short ones, and a .jsonl whose third record is 50 MB."""
    root = tmp_path_factory.mktemp("big")
    with open(root / "long.txt", "w") as f:
        f.write("a first line\nand a second\n")
        f.write("x" * BIG + "\n")
    with open(root / "long.jsonl", "w") as f:
        f.write(json.dumps({"text": "short"}) + "\n\n")  # a blank line still counts as line 2
        f.write(json.dumps({"text": "y" * BIG}) + "\n")
    return root


@pytest.mark.parametrize("name,line", [("long.txt", 3), ("long.jsonl", 3)])
def test_a_50mb_line_is_refused_naming_the_file_line_key_and_fix(big_files, name, line):
    with pytest.raises(CorpusError) as e:
        list(read_documents(_cfg(big_files / name)))
    message = str(e.value)
    assert f"{big_files / name}:{line}:" in message and "corpus.max_record_bytes=16000000" in message
    assert "split it into smaller records" in message and "raise corpus.max_record_bytes" in message


def test_a_50mb_record_within_a_raised_limit_is_read_whole(big_files):
    docs = list(read_documents(_cfg(big_files / "long.jsonl", max_record_bytes=64_000_000)))
    assert [(d, len(t)) for d, t in docs] == [("long.jsonl#0", 5), ("long.jsonl#1", BIG)]


def test_a_directory_with_a_50mb_line_names_the_file_inside_it(big_files, tmp_path):
    (tmp_path / "ok.md").write_text("fine\n")
    (tmp_path / "z.txt").symlink_to(big_files / "long.txt")
    with pytest.raises(CorpusError, match=r"z\.txt:3: a line longer than corpus\.max_record_bytes"):
        list(read_documents(_cfg(tmp_path)))


class _Spy(io.BufferedReader):
    """A real file reader that remembers the most bytes one read returned."""

    most = 0

    def readline(self, size=-1):
        line = super().readline(size)
        self.most = max(self.most, len(line))
        return line


def test_the_line_reader_never_holds_more_than_the_limit_of_a_long_line(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"ab\n" + b"z" * 10_000 + b"\nlast")
    with _Spy(io.FileIO(path)) as f:
        lines = bounded_lines(f, 100, str(path))
        assert next(lines) == (1, b"ab\n")
        with pytest.raises(CorpusError, match=r"c\.txt:2: a line longer than corpus\.max_record_bytes=100 bytes"):
            next(lines)
        assert f.most <= 102 and f.tell() <= 3 + 102  # 10 kB line: at most limit + 2 bytes of it read
    with open(path, "rb") as f:  # a limit that fits: every line, byte for byte, numbered
        assert list(bounded_lines(f, 10_000, "c")) == [(1, b"ab\n"), (2, b"z" * 10_000 + b"\n"), (3, b"last")]
    exact = tmp_path / "exact.txt"
    exact.write_bytes(b"q" * 100 + b"\r\n" + b"q" * 101)
    with open(exact, "rb") as f:
        with pytest.raises(CorpusError, match=":2: "):  # 100 bytes + CRLF fit; 101 bytes do not
            list(bounded_lines(f, 100, "exact"))


def test_a_parquet_value_over_the_limit_is_refused_naming_the_row(tmp_path):
    pq.write_table(pa.table({"text": ["short", "é" * 60]}), tmp_path / "c.parquet")  # 120 bytes of UTF-8
    assert len(list(read_documents(_cfg(tmp_path / "c.parquet", max_record_bytes=120)))) == 2
    with pytest.raises(CorpusError, match=r"c\.parquet: row 1 \(column 'text'\): a value longer than "
                                          r"corpus\.max_record_bytes=119"):
        list(read_documents(_cfg(tmp_path / "c.parquet", max_record_bytes=119)))
