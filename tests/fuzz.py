"""The seeded bad-input matrix shared by ``tests/test_fuzz.py`` (a representative subset) and
``bench/bench_fuzz.py`` (all of it): mutations of every file of the three dataset layouts, of
a config and a search-space YAML, and of image files.

Each case ends in one outcome:

- ``loaded_warned``: loaded, with counted warnings in the load report;
- ``loaded_same``: loaded to exactly the data of the unmutated files (a BOM, CRLF, blank
  lines), or a YAML that is still a valid config / space;
- ``text_edit``: the same graph (ids, triples, which entities have text) with a name or text
  rewritten into another well-formed one (a renamed URI, a text cut short): data, not an
  error, and undetectable by design;
- ``failed``: a clean error (``DatasetError`` / ``ConfigError``) whose message is one line
  naming the file (``failed_file_line``: also the line);
- ``silent``: loaded to different data without a single warning (a defect);
- ``crashed``: any other exception, or the CLI printed a traceback / exited with neither 0
  nor 2 (a defect).

Images are judged by the pack stage's ``validate_image`` (packed, or left out with a reason)
and, when packed, by the preprocessing that extraction runs on them.
"""

from __future__ import annotations

import contextlib
import io
import random
import re
import shutil
import struct
import traceback
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
N_ENT, N_REL = 12, 3
OUTCOMES = ("loaded_warned", "loaded_same", "text_edit", "failed", "silent", "crashed")


# ---------------------------------------------------------------------------- base data


def _triples() -> dict[str, list[tuple[int, int, int]]]:
    """Train holds every entity and relation; valid/test use only those (no unseen)."""
    rng = random.Random(0)
    train = [(e, e % N_REL, (e + 1) % N_ENT) for e in range(N_ENT)]
    train += [(rng.randrange(N_ENT), rng.randrange(N_REL), rng.randrange(N_ENT))
              for _ in range(12)]
    valid = [(rng.randrange(N_ENT), rng.randrange(N_REL), rng.randrange(N_ENT)) for _ in range(5)]
    test = [(rng.randrange(N_ENT), rng.randrange(N_REL), rng.randrange(N_ENT)) for _ in range(5)]
    return {"train": train, "valid": valid, "test": test}


def layout_files(layout: str) -> dict[str, str]:
    """The unmutated files (name -> text) of a small dataset in ``layout``."""
    t = _triples()
    ent = [f"/m/0e{i}" for i in range(N_ENT)]
    rel = [f"/r/rel{i}" for i in range(N_REL)]
    uri = [f"<http://dbpedia.org/resource/Entity_{i}>" for i in range(N_ENT)]
    if layout == "mkgformer":
        def tsv(rows):
            return "".join(f"{ent[h]}\t{rel[r]}\t{ent[o]}\n" for h, r, o in rows)
        return {"entity2text.txt": "".join(f"{e}\tEntity number {i}\n" for i, e in enumerate(ent)),
                "relation2text.txt": "".join(f"{r}\trelation {i}\n" for i, r in enumerate(rel)),
                "train.tsv": tsv(t["train"]), "dev.tsv": tsv(t["valid"]),
                "test.tsv": tsv(t["test"])}
    if layout == "openke":
        def ids(rows):
            return f"{len(rows)}\n" + "".join(f"{h} {o} {r}\n" for h, r, o in rows)
        return {"entity2id.txt": f"{N_ENT}\n" + "".join(f"{u}\t{i}\n" for i, u in enumerate(uri)),
                "relation2id.txt": f"{N_REL}\n" + "".join(f"{r}\t{i}\n"
                                                          for i, r in enumerate(rel)),
                "train2id.txt": ids(t["train"]), "valid2id.txt": ids(t["valid"]),
                "test2id.txt": ids(t["test"]),
                "entity2text.txt": "".join(f"{u}\tEntity {i}\n" for i, u in enumerate(uri))}
    if layout == "mygo":
        names = [str(i) for i in range(N_ENT)]

        def by_name(rows):
            return "".join(f"{names[h]}\t{rel[r]}\t{names[o]}\n" for h, r, o in rows)
        return {"entities.txt": "".join(f"{n}\n" for n in names),
                "relations.txt": "".join(f"{r}\n" for r in rel),
                "train.txt": by_name(t["train"]), "valid.txt": by_name(t["valid"]),
                "test.txt": by_name(t["test"]),
                "entity2id.txt": f"{N_ENT}\n" + "".join(f"{u} {n}\n" for u, n in zip(uri, names))}
    raise ValueError(layout)


def yaml_text(kind: str) -> str:
    """The unmutated config (``configs/demo.yaml``) or space (``tune_spaces/compression.yaml``)."""
    path = "configs/demo.yaml" if kind == "config" else "tune_spaces/compression.yaml"
    return (REPO_ROOT / path).read_text()


# ---------------------------------------------------------------------------- mutations

Mutation = Callable[[str, random.Random], "bytes | None"]


def _data_lines(lines: list[str]) -> list[int]:
    """Indexes of lines holding data (not a count line, not blank, not a YAML comment)."""
    count_line = len(lines) > 1 and lines[0].strip().isdigit() and " " not in lines[1].strip()
    return [i for i, ln in enumerate(lines) if ln.strip() and not (i == 0 and count_line)
            and not ln.lstrip().startswith("#")]


def _edit_line(text: str, rng: random.Random, edit: Callable[[str], str | None]
               ) -> bytes | None:
    lines = text.split("\n")
    candidates = _data_lines(lines)
    rng.shuffle(candidates)
    for i in candidates:
        new = edit(lines[i])
        if new is not None and new != lines[i]:
            lines[i] = new
            return "\n".join(lines).encode()
    return None


def _insert(text: str, rng: random.Random, line: str) -> bytes:
    lines = text.split("\n")
    lines.insert(rng.randrange(len(lines)), line)
    return "\n".join(lines).encode()


def _sep(line: str) -> str:
    return "\t" if "\t" in line else " "


def _count_line(text: str, rng: random.Random) -> bytes | None:
    first, _, rest = text.partition("\n")
    if not first.strip().isdigit():
        return None
    return f"{int(first) + rng.choice([-2, -1, 1, 3])}\n{rest}".encode()


def _drop_column(line: str) -> str | None:
    sep = _sep(line)
    parts = line.split(sep)
    return sep.join(parts[:-1]) if len(parts) > 1 else None


def _long_field(line: str) -> str:
    sep = _sep(line)
    head, _, _ = line.rpartition(sep)
    return f"{head}{sep}{'y' * 300_000}" if head else "y" * 300_000


def _latin1(data: bytes | None) -> bytes | None:
    return None if data is None else data.decode().encode("latin-1")


TEXT_MUTATIONS: dict[str, Mutation] = {
    "bom": lambda t, r: b"\xef\xbb\xbf" + t.encode(),
    "utf16": lambda t, r: t.encode("utf-16"),
    "latin1": lambda t, r: _latin1(_edit_line(t, r, lambda ln: ln + " caf\xe9")),
    "crlf": lambda t, r: t.replace("\n", "\r\n").encode(),
    "blank_lines": lambda t, r: _insert(t, r, ""),
    "whitespace_lines": lambda t, r: _insert(t, r, "  \t "),
    "extra_column": lambda t, r: _edit_line(t, r, lambda ln: ln + _sep(ln) + "extra"),
    "missing_column": lambda t, r: _edit_line(t, r, _drop_column),
    "unknown_id": lambda t, r: _edit_line(
        t, r, lambda ln: "9999" + ln[len(ln.split(_sep(ln))[0]):] if ln.split(_sep(ln))[0]
        .isdigit() else "zz_unknown" + ln[len(ln.split(_sep(ln))[0]):]),
    "wrong_count": _count_line,
    "long_line": lambda t, r: _insert(t, r, "x" * 1_000_000),
    "long_field": lambda t, r: _edit_line(t, r, _long_field),
    "truncated": lambda t, r: t.encode()[: r.randrange(1, max(2, len(t.encode())))],
    "empty": lambda t, r: b"",
}


def _yaml_edit(text: str, rng: random.Random, pattern: str, edit: Callable[[re.Match], str]
               ) -> bytes | None:
    lines = text.split("\n")
    hits = [i for i, ln in enumerate(lines) if re.search(pattern, ln)
            and not ln.lstrip().startswith("#")]
    if not hits:
        return None
    i = rng.choice(hits)
    lines[i] = re.sub(pattern, edit, lines[i], count=1)
    return "\n".join(lines).encode()


YAML_MUTATIONS: dict[str, Mutation] = {
    **{k: TEXT_MUTATIONS[k] for k in ("bom", "utf16", "latin1", "crlf", "blank_lines",
                                      "whitespace_lines", "long_line", "truncated", "empty")},
    "tab_indent": lambda t, r: _yaml_edit(t, r, r"^ +(?=\S)", lambda m: "\t"),
    "unknown_key": lambda t, r: _yaml_edit(t, r, r"^(\s*)(\w+):", lambda m: f"{m[1]}{m[2]}x:"),
    "wrong_type": lambda t, r: _yaml_edit(t, r, r":\s+([\w.-]+)\s*(#.*)?$", lambda m: ": [1, x]"),
    "duplicate_key": lambda t, r: _yaml_edit(t, r, r"^(\s*)(\w+):\s+\S.*$",
                                             lambda m: f"{m[0]}\n{m[0]}"),
    "missing_colon": lambda t, r: _yaml_edit(t, r, r"^(\s*\w+):(\s)", lambda m: f"{m[1]}{m[2]}"),
    "top_level_list": lambda t, r: b"- " + t.replace("\n", "\n  ").encode(),
}


# ---------------------------------------------------------------------------- outcomes


@dataclass
class Case:
    """One mutated input and what became of it."""

    kind: str          # mkgformer/<file>, config, space, image
    mutation: str
    seed: int
    outcome: str = ""
    warnings: int = 0
    message: str = ""  # the error, the first warning or the traceback's last line


def _one_line_naming(message: str, file: str) -> tuple[bool, bool]:
    """(one line naming ``file``, ... with a line number) of an error message; a
    ConfigError's header line is not counted: its problems are one line each."""
    lines = [ln.strip(" -") for ln in message.splitlines()]
    body = lines[1:] if len(lines) > 1 and "configuration problem" in lines[0] else lines
    named = len(body) == 1 and file in body[0] and len(body[0]) < 600
    return named, named and re.search(re.escape(file) + r":\d+", body[0]) is not None


def run_cli(argv: list[str]) -> tuple[int | None, str]:
    """``elmm-ray ARGV`` in this process: (exit code or None when it raised, stderr)."""
    from elmm_ray.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv, whole_process=False)
        except SystemExit as exit_:
            rc = exit_.code if isinstance(exit_.code, int) else 1
        except Exception:  # noqa: BLE001 - a traceback is what the case looks for
            return None, err.getvalue() + traceback.format_exc()
    return rc, err.getvalue()


def _same_graph(a, b) -> bool:
    return (a.num_entities == b.num_entities and a.num_relations == b.num_relations
            and np.array_equal(a.has_text, b.has_text)
            and all(np.array_equal(a.triples[s], b.triples[s]) for s in a.triples))


def _same_kg(a, b) -> bool:
    return (_same_graph(a, b) and a.entities == b.entities and a.relations == b.relations
            and a.entity_names == b.entity_names and a.relation_texts == b.relation_texts)


def judge_dataset(root: Path, file: str, base, case: Case) -> Case:
    """Load ``root`` (one file mutated) with ``load_kg`` and ``elmm-ray stats``."""
    from elmm_ray.data.kg import DatasetError, load_kg

    try:
        kg = load_kg(root)
    except DatasetError as err:
        named, with_line = _one_line_naming(str(err), file)
        case.outcome = "failed" if named else "crashed"
        case.message = str(err)[:300]
        case.warnings = int(with_line)  # for failures: 1 when the message has file:line
    except Exception:  # noqa: BLE001
        case.outcome, case.message = "crashed", traceback.format_exc()[-300:]
    else:
        warnings = kg.report.warnings
        case.warnings = len(warnings)
        case.message = warnings[0][:300] if warnings else ""
        case.outcome = ("loaded_warned" if warnings else "loaded_same" if _same_kg(kg, base)
                        else "text_edit" if _same_graph(kg, base) else "silent")
    rc, stderr = run_cli(["stats", str(root)])
    expected = 2 if case.outcome == "failed" else 0
    if case.outcome != "crashed" and (rc != expected or "Traceback" in stderr):
        case.outcome, case.message = "crashed", f"CLI exit {rc}: {stderr[-300:]}"
    return case


def judge_yaml(path: Path, kind: str, case: Case) -> Case:
    """Read a mutated config (``elmm-ray validate``) or space (``load_space``)."""
    from elmm_ray.config import ConfigError, load_config

    try:
        if kind == "config":
            load_config(path)
        else:
            from elmm_ray.tune.space import load_space

            load_space(path, load_config(REPO_ROOT / "configs/demo.yaml"))
    except ConfigError as err:
        named, with_line = _one_line_naming(str(err), path.name)
        # A value problem names the key instead of a line; both count as clean.
        key_named = all("`" in p for p in err.problems)
        case.outcome = "failed" if named or key_named else "crashed"
        case.warnings = int(with_line)
        case.message = str(err)[:300]
    except Exception:  # noqa: BLE001
        case.outcome, case.message = "crashed", traceback.format_exc()[-300:]
    else:
        case.outcome = "loaded_same"
    if kind == "config":
        rc, stderr = run_cli(["validate", str(path)])
        expected = 2 if case.outcome == "failed" else 0
        if case.outcome != "crashed" and (rc != expected or "Traceback" in stderr):
            case.outcome, case.message = "crashed", f"CLI exit {rc}: {stderr[-300:]}"
    return case


def dataset_cases(work: Path, seeds: int = 2, layouts=("mkgformer", "openke", "mygo"),
                  mutations: list[str] | None = None, files: list[str] | None = None
                  ) -> Iterator[Case]:
    """Every (layout, file, mutation, seed) case, judged; inapplicable mutations skipped."""
    from elmm_ray.data.kg import load_kg

    for layout in layouts:
        base_files = layout_files(layout)
        base_dir = work / f"{layout}-base"
        _write(base_dir, {k: v.encode() for k, v in base_files.items()})
        base = load_kg(base_dir)
        assert not base.report.warnings, base.report.warnings
        for file in files or list(base_files):
            if file not in base_files:
                continue
            for name in mutations or list(TEXT_MUTATIONS):
                for seed in range(seeds):
                    data = TEXT_MUTATIONS[name](base_files[file], random.Random(seed))
                    if data is None:
                        break
                    root = work / "case"
                    _write(root, {**{k: v.encode() for k, v in base_files.items()},
                                  file: data})
                    yield judge_dataset(root, file, base,
                                        Case(f"{layout}/{file}", name, seed))


def yaml_cases(work: Path, kind: str, seeds: int = 2, mutations: list[str] | None = None
               ) -> Iterator[Case]:
    text = yaml_text(kind)
    for name in mutations or list(YAML_MUTATIONS):
        for seed in range(seeds):
            data = YAML_MUTATIONS[name](text, random.Random(seed))
            if data is None:
                break
            path = work / f"{kind}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            yield judge_yaml(path, kind, Case(kind, name, seed))


def _write(root: Path, files: dict[str, bytes]) -> None:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for name, data in files.items():
        (root / name).write_bytes(data)


# ---------------------------------------------------------------------------- images


def image_bytes(fmt: str = "PNG", mode: str = "RGB", size=(48, 32), **save) -> bytes:
    """A small picture with a gradient, so truncation and rotation change it."""
    from PIL import Image

    w, h = size
    grad = np.add.outer(np.arange(h) * 5, np.arange(w) * 3).astype(np.uint8)
    img = Image.fromarray(np.stack([grad, 255 - grad, grad // 2], -1), "RGB")
    if mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        save.setdefault("transparency", 0)
    elif mode == "I;16":
        img = Image.fromarray(grad.astype(np.uint16) * 257)  # mode I;16
    elif mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def png_with_declared_size(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` (valid CRC) over a tiny body."""
    data = bytearray(image_bytes())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def exif_jpeg(orientation: int = 6) -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    return image_bytes("JPEG", exif=exif.tobytes(), quality=95)


def image_inputs(seeds: int = 3) -> Iterator[tuple[str, int, bytes]]:
    """(mutation, seed, bytes) of every image case."""
    for seed in range(seeds):
        rng = random.Random(seed)
        yield "random_bytes", seed, rng.randbytes(rng.choice([16, 1000, 50_000]))
    for fmt in ("PNG", "JPEG"):
        whole = image_bytes(fmt)
        for pct in range(10, 100, 10):
            yield f"truncated_{fmt.lower()}", pct, whole[: len(whole) * pct // 100]
    yield "huge_declared", 0, png_with_declared_size(100_000, 100_000)
    yield "huge_declared", 1, png_with_declared_size(10_000, 10_000)  # over 1x, under 2x
    yield "exif_orientation", 6, exif_jpeg(6)
    yield "exif_orientation", 8, exif_jpeg(8)
    yield "palette_transparency", 0, image_bytes("PNG", "P")
    yield "16_bit", 0, image_bytes("PNG", "I;16")
    yield "empty", 0, b""
    yield "tiny", 0, image_bytes(size=(1, 1))


def judge_image(mutation: str, seed: int, data: bytes) -> Case:
    """``validate_image`` (pack) then, when packed, extraction's preprocessing."""
    from PIL import Image

    from elmm_ray.data.shards import validate_image
    from elmm_ray.models.backbone import preprocess_images

    case = Case("image", mutation, seed)
    try:
        info, reason = validate_image(data, 8)
        if info is None:
            case.outcome, case.message = "failed", reason.split(":")[0].split(" (")[0]
            return case
        with Image.open(io.BytesIO(data)) as img:
            pixels = preprocess_images([img], 32)
        if not np.isfinite(pixels.numpy()).all():
            raise ValueError("non-finite pixels")
        case.outcome = "loaded_same"
        case.message = f"packed: {info['format']} {info['mode']} " \
                       f"orientation {info['orientation']}"
    except Exception:  # noqa: BLE001
        case.outcome, case.message = "crashed", traceback.format_exc()[-300:]
    return case
