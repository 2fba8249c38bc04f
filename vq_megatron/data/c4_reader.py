"""Read text documents from C4 shards, JSON Lines, plain text and WikiText files.

Supported inputs (each optionally ``.gz`` compressed):

* ``*.json`` / ``*.jsonl`` -- one JSON object per line with a string ``"text"``
  key (the published C4 ``c4-*.json.gz`` shards: keys text/timestamp/url).
* ``*.txt`` / ``*.tokens`` (WikiText) -- one document per non-empty line.

Bad input is reported as ``file:line: reason``. With ``on_error="stop"`` the
first problem raises :class:`DataError`; with ``on_error="skip"`` the line is
logged, counted in :attr:`DocumentReader.skipped` and reading goes on.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

__all__ = [
    "DataError",
    "DocumentReader",
    "ReadStats",
    "read_documents",
    "resolve_inputs",
    "detect_format",
    "ON_ERROR_CHOICES",
]

logger = logging.getLogger(__name__)

ON_ERROR_CHOICES = ("stop", "skip")
_JSON_SUFFIXES = (".json", ".jsonl")
_TEXT_SUFFIXES = (".txt", ".tokens")
# Past this many, per-line skip warnings would drown the log; the count is still reported.
_MAX_LOGGED_SKIPS = 50

_DOWNLOAD_HINT = (
    "C4 is not downloaded here. Get the English C4 shards "
    "(c4-train.NNNNN-of-01024.json.gz, c4-validation.NNNNN-of-00008.json.gz from "
    "https://huggingface.co/datasets/allenai/c4, folder en/) with "
    "`bash launch/prepare_c4.sh` (env C4_SHARDS=N, RAW_DIR=...), or use the small "
    "bundled slice in data/c4_slice/."
)


class DataError(ValueError):
    """Malformed input data; ``path``/``line`` say where (``line`` is 1-based or None)."""

    def __init__(self, path: str | Path, line: int | None, reason: str):
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {reason}")


class _LineError(Exception):
    """Internal: a single line could not be turned into a document."""


@dataclass
class ReadStats:
    """Counters of one pass over the inputs."""

    documents: int = 0  # documents yielded (after skip_docs / max_docs)
    skipped: int = 0  # bad lines (or unreadable files) skipped under on_error="skip"
    empty: int = 0  # well-formed documents with empty/whitespace-only text (dropped)


def detect_format(path: str | Path) -> str:
    """Return ``"json"`` or ``"text"`` from the file name (a ``.gz`` suffix is ignored)."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(_JSON_SUFFIXES):
        return "json"
    if name.endswith(_TEXT_SUFFIXES):
        return "text"
    raise ValueError(
        f"{path}: unknown input format; expected one of "
        f"{', '.join(_JSON_SUFFIXES + _TEXT_SUFFIXES)} (optionally .gz)"
    )


def _missing_message(path: Path) -> str:
    parent = path.parent
    where = f"input not found: {path}"
    if not parent.exists():
        where += f" (directory {parent} does not exist)"
    return f"{where}. {_DOWNLOAD_HINT}"


def _is_supported(path: Path) -> bool:
    try:
        detect_format(path)
        return True
    except ValueError:
        return False


def resolve_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Expand files, glob patterns and directories into an ordered list of files.

    A directory contributes its supported files in sorted order; a glob its
    sorted matches. Anything that matches nothing raises FileNotFoundError with
    a hint on what to download.
    """
    files: list[Path] = []
    for item in inputs:
        text = str(item)
        if glob.has_magic(text):
            matches = sorted(Path(p) for p in glob.glob(text))
            if not matches:
                raise FileNotFoundError(_missing_message(Path(text)))
            files.extend(matches)
            continue
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and _is_supported(p))
            if not found:
                raise FileNotFoundError(f"no supported input files in directory {path}. {_DOWNLOAD_HINT}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(_missing_message(path))
    if not files:
        raise ValueError("no input files given")
    return files


def _open_binary(path: Path) -> BinaryIO:
    # Binary mode so that each line is decoded separately and a bad byte names its line.
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _LineError(
            f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at byte offset {err.start})"
        ) from None


def _parse_json_line(raw: bytes) -> str:
    line = _decode(raw)
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise _LineError(f"broken JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise _LineError(f"expected a JSON object, got {type(obj).__name__}")
    if "text" not in obj:
        raise _LineError(f'missing "text" key (keys: {", ".join(sorted(obj)) or "none"})')
    text = obj["text"]
    if not isinstance(text, str):
        raise _LineError(f'"text" is {type(text).__name__}, expected a string')
    return text


def _parse_text_line(raw: bytes) -> str:
    # WikiText lines carry a leading and trailing space; documents need neither.
    return _decode(raw).strip()


class DocumentReader:
    """Iterate over document texts from one or more files, in the given order.

    Args:
        inputs: files, directories or glob patterns (see :func:`resolve_inputs`).
        on_error: ``"stop"`` raises :class:`DataError` at the first bad line;
            ``"skip"`` logs it with file:line and counts it in ``stats.skipped``.
        skip_docs: number of leading documents (over all inputs) to leave out.
        max_docs: stop after yielding this many documents (None: no limit).

    The reader can be iterated more than once; ``stats`` describes the latest pass.
    """

    def __init__(
        self,
        inputs: Iterable[str | Path],
        on_error: str = "stop",
        skip_docs: int = 0,
        max_docs: int | None = None,
    ):
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
        if skip_docs < 0 or (max_docs is not None and max_docs < 0):
            raise ValueError("skip_docs and max_docs must be >= 0")
        self.files = resolve_inputs(inputs)
        for path in self.files:
            detect_format(path)  # fail early on an unknown suffix
        self.on_error = on_error
        self.skip_docs = skip_docs
        self.max_docs = max_docs
        self.stats = ReadStats()

    @property
    def skipped(self) -> int:
        """Bad lines skipped in the latest pass."""
        return self.stats.skipped

    def __iter__(self) -> Iterator[str]:
        self.stats = ReadStats()
        if self.max_docs == 0:
            return
        seen = 0
        try:
            for path in self.files:
                for text in self._iter_file(path):
                    seen += 1
                    if seen <= self.skip_docs:
                        continue
                    self.stats.documents += 1
                    yield text
                    if self.max_docs is not None and self.stats.documents >= self.max_docs:
                        return
        finally:
            if self.stats.skipped:
                logger.warning("skipped %d bad line(s) in total", self.stats.skipped)

    def _bad(self, path: Path, line: int | None, reason: str) -> None:
        if self.on_error == "stop":
            raise DataError(path, line, reason)
        self.stats.skipped += 1
        if self.stats.skipped <= _MAX_LOGGED_SKIPS:
            where = f"{path}:{line}" if line is not None else str(path)
            logger.warning("%s: skipped: %s", where, reason)
            if self.stats.skipped == _MAX_LOGGED_SKIPS:
                logger.warning("further skip warnings are suppressed; the total is reported at the end")

    def _iter_file(self, path: Path) -> Iterator[str]:
        parse = _parse_json_line if detect_format(path) == "json" else _parse_text_line
        if not path.is_file():
            raise FileNotFoundError(_missing_message(path))
        lineno = 0
        non_blank = 0
        try:
            with _open_binary(path) as handle:
                for lineno, raw in enumerate(handle, start=1):
                    if not raw.strip():
                        continue  # blank lines separate nothing in either format
                    non_blank += 1
                    try:
                        text = parse(raw)
                    except _LineError as err:
                        self._bad(path, lineno, str(err))
                        continue
                    if not text.strip():
                        self.stats.empty += 1
                        continue
                    yield text
        except (OSError, EOFError, zlib.error) as err:
            # A corrupt or truncated .gz file: nothing after this point is readable.
            self._bad(path, lineno + 1, f"cannot read file ({type(err).__name__}: {err})")
            return
        if non_blank == 0:
            self._bad(path, None, "file is empty (no documents)")


def read_documents(
    inputs: Iterable[str | Path], on_error: str = "stop", skip_docs: int = 0, max_docs: int | None = None
) -> Iterator[str]:
    """Convenience generator over :class:`DocumentReader`."""
    yield from DocumentReader(inputs, on_error=on_error, skip_docs=skip_docs, max_docs=max_docs)
