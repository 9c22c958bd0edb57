"""What every dataset-layout reader shares: the error type, the load report, reading
text files with file:line errors, and readable names from URIs."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("elmm_ray.data.kg")


class DatasetError(ValueError):
    """A dataset folder that cannot be loaded: names the file, the line and the problem."""


@dataclass
class LoadReport:
    """What loading noticed without failing: counted, never silent."""

    warnings: list[str] = field(default_factory=list)
    duplicate_triples: dict[str, int] = field(default_factory=dict)
    text_rows_unused: int = 0
    # Entities / relations of valid or test triples that no training triple holds.
    unseen: dict[str, int] = field(default_factory=dict)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        log.info(message)


def clip(text: str, limit: int = 80) -> str:
    """``repr`` of ``text`` cut to ``limit`` characters, for one-line error messages."""
    return repr(text[:limit]) + (f" ... ({len(text):,} characters)" if len(text) > limit else "")


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (a UTF-8 byte-order mark is dropped); any other
    encoding fails naming the file, the line and how to convert it."""
    if not path.is_file():
        raise DatasetError(f"missing file: {path}")
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DatasetError(f"{path}:1: UTF-16 text (byte-order mark {data[:2].hex()}); save it "
                           "as UTF-8 (iconv -f UTF-16 -t UTF-8)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        offset = err.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data.count(b"\n", 0, offset) + 1
        raise DatasetError(f"{path}:{line}: not UTF-8 (byte 0x{data[offset]:02x} at offset "
                           f"{offset}); save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                           ) from err
    return text.splitlines()


LONG_TEXT = 20_000  # characters: far beyond any name or description of the benchmarks


def read_text_table(path: Path, report: LoadReport) -> dict[str, str]:
    """``key<TAB>text`` lines; a line without a tab is a malformed line."""
    table: dict[str, str] = {}
    extra_columns = long_texts = 0
    for lineno, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        key, sep, text = line.partition("\t")
        if not sep:
            raise DatasetError(f"{path}:{lineno}: expected 'id<TAB>text', got {clip(line)}")
        extra_columns += "\t" in text.strip()
        long_texts += len(text) > LONG_TEXT
        key = key.strip()
        if key in table and table[key] != text.strip():
            report.warn(f"{path}:{lineno}: duplicate id {key!r}; keeping the first text")
            continue
        table[key] = text.strip()
    if long_texts:
        report.warn(f"{path}: {long_texts} text(s) over {LONG_TEXT:,} characters (kept; the "
                    "prompt keeps model.max_text_tokens tokens)")
    if extra_columns:
        report.warn(f"{path}: {extra_columns} row(s) with more than two tab-separated columns; "
                    "everything after the first tab is kept as the text")
    return table


def readable_name(uri: str) -> str:
    """A readable label from a URI or id: ``<http://dbpedia.org/resource/New_York>`` ->
    ``New York``; Wikidata ``Q370252`` stays as is."""
    s = uri.strip().strip("<>")
    s = s.rstrip("/").rsplit("/", 1)[-1].rsplit("#", 1)[-1]
    s = re.sub(r"_+", " ", s)
    return s or uri
