"""Pack: Parquet image shards with Ray Data, bad files listed, re-runs and resume."""

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from elmm_ray.data.kg import load_kg
from elmm_ray.data.shards import pack_images, plan_shards, validate_image

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]


def _png(size=(32, 24), mode="RGB", color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else None).save(buf, format="PNG")
    return buf.getvalue()


def _dataset(root: Path, n_entities=6, per_entity=3) -> tuple[Path, int, list[str]]:
    ents = [f"E{i}" for i in range(n_entities)]
    (root / "images").mkdir(parents=True)
    root.joinpath("entity2text.txt").write_text("".join(f"{e}\tname {e}\n" for e in ents))
    root.joinpath("relation2text.txt").write_text("r\trel\n")
    triples = "".join(f"{ents[i]}\tr\t{ents[(i + 1) % n_entities]}\n" for i in range(n_entities))
    for f in ("train.tsv", "dev.tsv", "test.tsv"):
        root.joinpath(f).write_text(triples)
    good = 0
    for i, e in enumerate(ents[:-1]):  # the last entity has no folder
        folder = root / "images" / e
        folder.mkdir()
        for k in range(per_entity):
            folder.joinpath(f"{k}.png").write_bytes(_png(color=(i * 40, k * 60, 100)))
            good += 1
    bad_dir = root / "images" / ents[0]
    whole = _png((40, 40))
    bad_dir.joinpath("truncated.png").write_bytes(whole[: len(whole) // 2])
    bad_dir.joinpath("zero.jpg").write_bytes(b"")
    bad_dir.joinpath("tiny.png").write_bytes(_png((1, 1)))
    bad_dir.joinpath("text.jpg").write_bytes(b"this is not an image\n")
    return root, good, ["truncated.png", "zero.jpg", "tiny.png", "text.jpg"]


def test_validate_image_reasons():
    assert validate_image(_png(), 8)[0]["width"] == 32
    assert "0 bytes" in validate_image(b"", 8)[1]
    assert "not a recognised image" in validate_image(b"hello", 8)[1]
    assert "degenerate" in validate_image(_png((1, 1)), 8)[1]
    la = _png((16, 16), mode="LA")
    assert validate_image(la, 8)[0]["mode"] == "LA"  # decodable: kept, converted later


def test_plan_shards_bounds_bytes():
    recs = [{"size": s} for s in (5, 5, 5, 20, 1)]
    assert [[r["size"] for r in s] for s in plan_shards(recs, 10)] == [[5, 5], [5], [20], [1]]


def test_pack_lists_bad_files_keeps_good_ones_and_reruns_cheaply(tmp_path, ray_session):
    root, good, bad_names = _dataset(tmp_path / "ds")
    kg = load_kg(root)
    out = tmp_path / "shards"
    res = pack_images(kg, out, max_shard_bytes=600, show_progress=False)
    m = res.manifest
    assert not res.skipped
    assert m["images_packed"] == good
    assert sorted(Path(b["path"]).name for b in m["bad_images"]) == sorted(bad_names)
    assert all(b["reason"] for b in m["bad_images"])
    assert m["images_listed"] == good + len(bad_names)
    assert m["entities_without_images"] == 1
    assert len(m["shards"]) > 1  # the byte bound splits the images into several shards
    table = pq.read_table(sorted(out.glob("shard-*.parquet")))
    assert table.num_rows == good
    keys = set(zip(table["entity_id"].to_pylist(), table["image_index"].to_pylist()))
    assert len(keys) == good  # no duplicate rows
    row = table.slice(0, 1).to_pylist()[0]
    assert Image.open(io.BytesIO(row["image"])).size == (row["width"], row["height"])

    # A complete output: no work on re-run.
    again = pack_images(kg, out, max_shard_bytes=600, show_progress=False)
    assert again.skipped and again.manifest == m

    # Interrupted run: manifest and one shard gone -> only that shard is redone.
    (out / "manifest.json").unlink()
    victim = sorted(out.glob("shard-*.parquet"))[1]
    victim.unlink()
    resumed = pack_images(kg, out, max_shard_bytes=600, show_progress=False)
    assert not resumed.skipped
    assert resumed.manifest["shards_reused"] == len(m["shards"]) - 1
    assert resumed.manifest["images_packed"] == good
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
