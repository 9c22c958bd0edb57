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

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        log.info(message)


def read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"missing file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not UTF-8 text ({err})") from err
    return text.splitlines()


def read_text_table(path: Path, report: LoadReport) -> dict[str, str]:
    """``key<TAB>text`` lines; a line without a tab is a malformed line."""
    table: dict[str, str] = {}
    for lineno, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        key, sep, text = line.partition("\t")
        if not sep:
            raise DatasetError(f"{path}:{lineno}: expected 'id<TAB>text', got {line[:80]!r}")
        key = key.strip()
        if key in table and table[key] != text.strip():
            report.warn(f"{path}:{lineno}: duplicate id {key!r}; keeping the first text")
            continue
        table[key] = text.strip()
    return table


def readable_name(uri: str) -> str:
    """A readable label from a URI or id: ``<http://dbpedia.org/resource/New_York>`` ->
    ``New York``; Wikidata ``Q370252`` stays as is."""
    s = uri.strip().strip("<>")
    s = s.rstrip("/").rsplit("/", 1)[-1].rsplit("#", 1)[-1]
    s = re.sub(r"_+", " ", s)
    return s or uri
