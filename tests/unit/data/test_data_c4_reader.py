"""Reader: good C4/JSONL/text/WikiText input, and file:line errors for bad input."""

import gzip
import json
import logging
import os
from pathlib import Path

import pytest

from vq_megatron.data.c4_reader import DataError, DocumentReader, detect_format, read_documents, resolve_inputs

REPO_ROOT = Path(__file__).resolve().parents[3]
SLICE_TRAIN = REPO_ROOT / "data" / "c4_slice" / "c4-train.slice.jsonl.gz"
SLICE_VALID = REPO_ROOT / "data" / "c4_slice" / "c4-validation.slice.jsonl.gz"
SHARED_DATA = Path(os.environ.get("VQ_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def _write_lines(path: Path, lines: list[bytes]) -> Path:
    data = b"".join(line + b"\n" for line in lines)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)
    return path


def _c4_line(text: str) -> bytes:
    record = {"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": "https://example.com/"}
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()


def test_bundled_c4_slice_reads_all_documents():
    docs = list(read_documents([SLICE_TRAIN]))
    assert len(docs) == 1000
    assert docs[0].startswith("Beginners BBQ Class Taking Place in Missoula!")
    assert len(list(read_documents([SLICE_VALID]))) == 300


@pytest.mark.parametrize("name", ["docs.jsonl", "docs.json", "docs.jsonl.gz", "c4-train.00000-of-01024.json.gz"])
def test_json_variants(tmp_path, name):
    path = _write_lines(tmp_path / name, [_c4_line("first doc"), b"", _c4_line("second\ndoc \u00e9")])
    assert list(read_documents([path])) == ["first doc", "second\ndoc \u00e9"]


@pytest.mark.parametrize("name", ["plain.txt", "wiki.valid.tokens", "wiki.valid.tokens.gz"])
def test_text_modes_one_document_per_nonempty_line(tmp_path, name):
    path = _write_lines(tmp_path / name, [b" = Title = ", b" ", b" Some text here . ", b"", b"more"])
    assert list(read_documents([path])) == ["= Title =", "Some text here .", "more"]


def test_real_wikitext_file_counts_nonempty_lines():
    path = SHARED_DATA / "wikitext-2" / "wiki.valid.tokens.gz"
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        expected = sum(1 for line in handle if line.strip())
    assert len(list(read_documents([path]))) == expected


def test_broken_json_names_file_and_line(tmp_path):
    path = _write_lines(tmp_path / "bad.jsonl", [_c4_line("ok"), _c4_line("ok2"), b'{"text": "unterminated'])
    with pytest.raises(DataError) as info:
        list(read_documents([path]))
    assert info.value.line == 3
    assert f"{path}:3:" in str(info.value)
    assert "broken JSON" in str(info.value)


def test_missing_text_key(tmp_path):
    path = _write_lines(tmp_path / "bad.jsonl.gz", [_c4_line("ok"), b'{"url": "x"}'])
    with pytest.raises(DataError, match=r'bad\.jsonl\.gz:2: missing "text" key'):
        list(read_documents([path]))


def test_non_string_text_and_non_object(tmp_path):
    path = _write_lines(tmp_path / "bad.jsonl", [b'{"text": 5}'])
    with pytest.raises(DataError, match=r":1: .*expected a string"):
        list(read_documents([path]))
    path = _write_lines(tmp_path / "bad2.jsonl", [b"[1, 2]"])
    with pytest.raises(DataError, match=r":1: expected a JSON object"):
        list(read_documents([path]))


@pytest.mark.parametrize("name", ["latin1.jsonl", "latin1.txt"])
def test_non_utf8_names_line(tmp_path, name):
    bad = '{"text": "caf\u00e9"}'.encode("latin-1") if name.endswith("jsonl") else "caf\u00e9".encode("latin-1")
    good = _c4_line("fine") if name.endswith("jsonl") else b"fine"
    path = _write_lines(tmp_path / name, [good, bad])
    with pytest.raises(DataError, match=r":2: not valid UTF-8 \(byte 0xe9"):
        list(read_documents([path]))


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.jsonl.gz", "blank.txt"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".gz"):
        with gzip.open(path, "wb"):
            pass
    elif name == "blank.txt":
        path.write_bytes(b"\n  \n\n")
    else:
        path.write_bytes(b"")
    with pytest.raises(DataError, match="file is empty"):
        list(read_documents([path]))


def test_truncated_gzip_is_reported(tmp_path):
    full = _write_lines(tmp_path / "full.jsonl.gz", [_c4_line("x" * 5000 + str(i)) for i in range(50)])
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz:\d+: cannot read file"):
        list(read_documents([cut]))


def test_skip_policy_counts_and_logs(tmp_path, caplog):
    path = _write_lines(
        tmp_path / "mixed.jsonl",
        [_c4_line("a"), b"{broken", _c4_line("b"), b'{"no_text": 1}', b"\xff\xfe", _c4_line("c")],
    )
    reader = DocumentReader([path], on_error="skip")
    with caplog.at_level(logging.WARNING, logger="vq_megatron.data.c4_reader"):
        docs = list(reader)
    assert docs == ["a", "b", "c"]
    assert reader.skipped == 3
    messages = "\n".join(record.getMessage() for record in caplog.records)
    for line in (2, 4, 5):
        assert f"{path}:{line}: skipped" in messages
    assert "skipped 3 bad line(s) in total" in messages
    # A second pass starts counting afresh.
    list(reader)
    assert reader.skipped == 3


def test_skip_policy_moves_past_empty_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    good = _write_lines(tmp_path / "good.jsonl", [_c4_line("only")])
    reader = DocumentReader([empty, good], on_error="skip")
    assert list(reader) == ["only"]
    assert reader.skipped == 1


def test_skip_and_max_docs_span_files(tmp_path):
    first = _write_lines(tmp_path / "a.jsonl", [_c4_line(f"a{i}") for i in range(3)])
    second = _write_lines(tmp_path / "b.txt", [f"b{i}".encode() for i in range(3)])
    assert list(read_documents([first, second], skip_docs=2, max_docs=3)) == ["a2", "b0", "b1"]
    assert list(read_documents([first, second], skip_docs=5)) == ["b2"]
    assert list(read_documents([first, second], max_docs=0)) == []


def test_empty_text_documents_are_dropped_not_errors(tmp_path):
    path = _write_lines(tmp_path / "e.jsonl", [_c4_line(""), _c4_line("   "), _c4_line("real")])
    reader = DocumentReader([path])
    assert list(reader) == ["real"]
    assert reader.stats.empty == 2 and reader.skipped == 0


def test_missing_file_names_it_and_says_what_to_download(tmp_path):
    missing = tmp_path / "c4-train.00000-of-01024.json.gz"
    with pytest.raises(FileNotFoundError) as info:
        DocumentReader([missing])
    assert str(missing) in str(info.value)
    assert "launch/prepare_c4.sh" in str(info.value)


def test_missing_shared_data_directory_message(tmp_path):
    missing = tmp_path / "shared" / "data" / "c4" / "c4-train.00000-of-01024.json.gz"
    with pytest.raises(FileNotFoundError) as info:
        list(read_documents([missing]))
    message = str(info.value)
    assert f"directory {missing.parent} does not exist" in message
    assert "c4-train.NNNNN-of-01024.json.gz" in message and "launch/prepare_c4.sh" in message


def test_resolve_inputs_globs_and_directories(tmp_path):
    for name in ("c4-train.00001-of-01024.json.gz", "c4-train.00000-of-01024.json.gz"):
        _write_lines(tmp_path / name, [_c4_line(name)])
    (tmp_path / "notes.md").write_text("ignored")
    expected = sorted(tmp_path.glob("c4-*.json.gz"))
    assert resolve_inputs([tmp_path / "c4-train.*.json.gz"]) == expected
    assert resolve_inputs([tmp_path]) == expected
    with pytest.raises(FileNotFoundError, match="prepare_c4.sh"):
        resolve_inputs([tmp_path / "nothing-*.json.gz"])


def test_unknown_format_and_bad_policy(tmp_path):
    odd = tmp_path / "data.csv"
    odd.write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown input format"):
        detect_format(odd)
    with pytest.raises(ValueError, match="unknown input format"):
        DocumentReader([odd])
    with pytest.raises(ValueError, match="on_error"):
        DocumentReader([SLICE_VALID], on_error="ignore")
