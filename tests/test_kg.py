from pathlib import Path

import numpy as np
import pytest

from elmm_ray.cli import main
from elmm_ray.data.kg import (
    DatasetError,
    FilterIndex,
    detect_format,
    image_folder_name,
    load_kg,
    readable_name,
)
from tests.conftest import shared_dataset

EXPECTED = {
    # name: (entities, relations, train, valid, test)
    "FB15k-237": (14541, 237, 272115, 17535, 20466),
    "WN18": (40943, 18, 141442, 5000, 5000),
    "DB15K": (12842, 279, 79222, 9904, 9902),
    "MKG-W": (15000, 169, 34196, 4276, 4274),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_real_datasets_exact_counts(name):
    kg = load_kg(shared_dataset(name))
    ents, rels, train, valid, test = EXPECTED[name]
    assert kg.num_entities == ents
    assert kg.num_relations == rels
    assert {s: len(t) for s, t in kg.triples.items()} == {
        "train": train, "valid": valid, "test": test}
    for t in kg.triples.values():
        assert t.dtype == np.int64 and t.shape[1] == 3
        assert t[:, [0, 2]].max() < ents and t[:, 1].max() < rels


def test_fb15k237_texts_and_categories():
    kg = load_kg(shared_dataset("FB15k-237"))
    i = kg.entity_index["/m/06rf7"]
    assert kg.entity_names[i] == "Schleswig-Holstein"
    assert kg.relation_texts[kg.relation_index["/location/country/form_of_government"]] == (
        "form of government")
    text_rows = (shared_dataset("FB15k-237") / "entity2text.txt").read_text().splitlines()
    assert kg.report.text_rows_unused == len(text_rows) - 14541  # a superset of the entities
    # The standard split of FB15k-237's relations by category.
    cats = kg.relation_categories
    assert {c: cats.count(c) for c in set(cats)} == {"1-1": 17, "1-N": 26, "N-1": 81, "N-N": 113}


def test_wn18_lemma_and_gloss_split():
    kg = load_kg(shared_dataset("WN18"))
    i = kg.entity_index["14854262"]
    assert kg.entity_names[i] == "stool"
    assert kg.entity_descriptions[i].startswith("solid excretory product")


def test_openke_uri_names_and_duplicates_reported():
    kg = load_kg(shared_dataset("DB15K"))
    assert kg.entity_names[0] == "Anarchism"  # <http://dbpedia.org/resource/Anarchism>
    assert kg.report.duplicate_triples == {"valid": 2423}
    assert not kg.has_text.any()


def test_filter_index_matches_brute_force_on_real_data():
    kg = load_kg(shared_dataset("WN18"))
    fi = kg.filter_index()
    allt = np.concatenate(list(kg.triples.values()))
    rng = np.random.default_rng(0)
    for h, r, t in allt[rng.choice(len(allt), 50, replace=False)]:
        tails = np.unique(allt[(allt[:, 0] == h) & (allt[:, 1] == r), 2])
        heads = np.unique(allt[(allt[:, 2] == t) & (allt[:, 1] == r), 0])
        assert np.array_equal(fi.answers_of(h, r), tails)
        assert np.array_equal(fi.answers_of(t, r + kg.num_relations), heads)


def test_filter_index_mask_pairs_and_unknown_queries():
    triples = np.array([[0, 0, 1], [0, 0, 2], [3, 1, 2], [0, 0, 1]])  # one duplicate row
    fi = FilterIndex(triples, num_relations=2)
    assert fi.answers_of(0, 0).tolist() == [1, 2]
    assert fi.answers_of(2, 0 + 2).tolist() == [0]  # head query of relation 0 for tail 2
    assert fi.answers_of(2, 1 + 2).tolist() == [3]
    assert fi.answers_of(5, 1).tolist() == []  # unknown query
    rows, cols = fi.mask_pairs(np.array([0, 5, 2]), np.array([0, 1, 3]))
    assert list(zip(rows.tolist(), cols.tolist())) == [(0, 1), (0, 2), (2, 3)]
    assert fi.num_answers(np.array([0, 5]), np.array([0, 1])).tolist() == [2, 0]
    empty = FilterIndex(np.zeros((0, 3), dtype=np.int64), num_relations=1)
    assert empty.answers_of(0, 0).tolist() == []


def test_queries_cover_both_directions(tmp_path):
    kg = load_kg(_write_mkgformer(tmp_path))
    q = kg.queries("test")
    n = len(kg.triples["test"])
    assert q.shape == (2 * n, 3)
    h, r, t = kg.triples["test"][0]
    assert q[0].tolist() == [h, r, t] and q[n].tolist() == [t, r + kg.num_relations, h]


def test_image_folder_conventions():
    assert image_folder_name("/m/0abc") == "m.0abc"
    assert image_folder_name("02174461") == "n02174461"
    assert image_folder_name("E00042") == "E00042"
    assert readable_name("<http://dbpedia.org/resource/New_York_City>") == "New York City"


def _write_mkgformer(root: Path, train="a\tr1\tb\nb\tr2\tc\n", dev="a\tr1\tc\n",
                     test="c\tr2\ta\n") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "entity2text.txt").write_text("a\tAlpha\nb\tBeta\nz\tunused\n")
    (root / "relation2text.txt").write_text("r1\trelation one\nr2\trelation two\n")
    (root / "train.tsv").write_text(train)
    (root / "dev.tsv").write_text(dev)
    (root / "test.tsv").write_text(test)
    return root


def test_small_mkgformer_with_images(tmp_path):
    root = _write_mkgformer(tmp_path / "ds")
    (root / "images" / "a").mkdir(parents=True)
    for name in ("2.jpg", "1.png", "notes.txt"):
        (root / "images" / "a" / name).write_bytes(b"x")
    kg = load_kg(root)
    assert kg.entities == ["a", "b", "c"]  # text order, then first appearance
    assert kg.has_text.tolist() == [True, True, False]
    assert kg.entity_names[2] == "c"  # no text: the id made readable
    assert [Path(p).name for p in kg.entity_images[0]] == ["1.png", "2.jpg"]
    assert kg.stats()["images_found"] == 2
    assert kg.stats()["entities_without_text"] == 1


@pytest.mark.parametrize("bad_line,expected", [
    ("a\tr1\n", r"train.tsv:2: expected 'head<TAB>relation<TAB>tail'"),
    ("a\tr1\tb\textra\n", r"train.tsv:2"),
])
def test_malformed_mkgformer_line_names_file_and_line(tmp_path, bad_line, expected):
    root = _write_mkgformer(tmp_path, train="a\tr1\tb\n" + bad_line)
    with pytest.raises(DatasetError, match=expected):
        load_kg(root)


def test_missing_file_and_folder(tmp_path):
    root = _write_mkgformer(tmp_path / "ds")
    (root / "dev.tsv").unlink()
    with pytest.raises(DatasetError, match="missing file: .*dev.tsv"):
        load_kg(root)
    with pytest.raises(DatasetError, match="does not exist"):
        load_kg(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="cannot tell the dataset format"):
        detect_format(tmp_path / "empty")


def _write_openke(root: Path, train="2\n0 1 0\n1 2 1\n", ents="3\nA\t0\nB\t1\nC\t2\n") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "entity2id.txt").write_text(ents)
    (root / "relation2id.txt").write_text("2\nr0 0\nr1 1\n")
    (root / "train2id.txt").write_text(train)
    (root / "valid2id.txt").write_text("1\n2 0 0\n")
    (root / "test2id.txt").write_text("0\n")
    return root


def test_openke_h_t_r_order(tmp_path):
    kg = load_kg(_write_openke(tmp_path))
    # train2id.txt lines are "h t r": "0 1 0" is (A, r0, B).
    assert kg.triples["train"].tolist() == [[0, 0, 1], [1, 1, 2]]
    assert kg.triples["test"].shape == (0, 3)


@pytest.mark.parametrize("kwargs,expected", [
    ({"train": "3\n0 1 0\n1 2 1\n"}, "count line says 3 triples but 2 follow"),
    ({"train": "2\n0 1 0\n1 7 1\n"}, r"train2id.txt:3: entity id out of range"),
    ({"train": "2\n0 1 0\n1 2 5\n"}, r"train2id.txt:3: relation id out of range"),
    ({"train": "2\n0 1 0\n1 x 1\n"}, r"train2id.txt:3: non-integer"),
    ({"ents": "4\nA\t0\nB\t1\nC\t2\n"}, "count line says 4 entries but 3 follow"),
])
def test_openke_errors(tmp_path, kwargs, expected):
    with pytest.raises(DatasetError, match=expected):
        load_kg(_write_openke(tmp_path, **kwargs))


def test_cli_stats_prints_counts(capsys):
    path = shared_dataset("FB15k-237")
    assert main(["stats", str(path)]) == 0
    out = capsys.readouterr().out
    for figure in ("14,541", "237", "272,115", "17,535", "20,466"):
        assert figure in out


# ---------------------------------------------------------------------------- MyGO / NativE

MYGO_TINY = Path(__file__).parent / "data" / "mygo_db15k_tiny"


def _openke_as_mygo(src: Path, out: Path) -> Path:
    """DB15K's OpenKE files rewritten in the MyGO release layout: names are the OpenKE ids,
    triples ``h<TAB>r<TAB>t`` (OpenKE has ``h t r``)."""
    out.mkdir()
    n_ent = int((src / "entity2id.txt").read_text().split("\n", 1)[0])
    n_rel = int((src / "relation2id.txt").read_text().split("\n", 1)[0])
    (out / "entities.txt").write_text("".join(f"{i}\n" for i in range(n_ent)))
    (out / "relations.txt").write_text("".join(f"{i}\n" for i in range(n_rel)))
    for split in ("train", "valid", "test"):
        rows = (src / f"{split}2id.txt").read_text().splitlines()[1:]
        (out / f"{split}.txt").write_text("".join(
            "{0}\t{2}\t{1}\n".format(*row.split()) for row in rows if row.strip()))
    return out


def test_mygo_layout_loads_the_same_triples_as_openke(tmp_path):
    src = shared_dataset("DB15K")
    mygo = _openke_as_mygo(src, tmp_path / "DB15K")
    assert detect_format(mygo) == "mygo" and detect_format(src) == "openke"
    a, b = load_kg(src), load_kg(mygo)
    assert (b.num_entities, b.num_relations) == EXPECTED["DB15K"][:2]
    for split in ("train", "valid", "test"):
        np.testing.assert_array_equal(a.triples[split], b.triples[split])
    assert b.report.duplicate_triples == a.report.duplicate_triples
    fa, fb = a.filter_index(), b.filter_index()
    np.testing.assert_array_equal(fa.keys, fb.keys)
    np.testing.assert_array_equal(fa.answers, fb.answers)


def test_mygo_fixture_counts_and_readable_names():
    kg = load_kg(MYGO_TINY)
    assert detect_format(MYGO_TINY) == "mygo"
    assert (kg.num_entities, kg.num_relations) == (60, 22)
    assert {s: len(t) for s, t in kg.triples.items()} == {"train": 132, "valid": 29, "test": 17}
    assert kg.entities[:2] == ["1", "4"]  # the release's names: the OpenKE ids
    assert kg.entity_names[1] == "United States"  # from the URI in entity2id.txt
    assert kg.has_text.all()
    assert "country" in kg.relation_texts  # <http://dbpedia.org/ontology/country>
    assert kg.report.duplicate_triples == {"valid": 6}  # e.g. "136 0 136" three times


def _write_mygo(root: Path, train="a\tr\tb\nb\tr\tc\n", ents="a\nb\nc\n") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "entities.txt").write_text(ents)
    (root / "relations.txt").write_text("r\ns\n")
    (root / "train.txt").write_text(train)
    (root / "valid.txt").write_text("a\ts\tc\n")
    (root / "test.txt").write_text("")
    return root


@pytest.mark.parametrize("kwargs,expected", [
    ({"train": "a\tr\tb\na r c\n"}, r"train.txt:2: expected 'head<TAB>relation<TAB>tail'"),
    ({"train": "a\tr\tb\na\tr\tb\tc\n"}, r"train.txt:2: expected"),
    ({"train": "a\tr\tb\n\na\tr\tzz\n"}, r"train.txt:3: unknown entity 'zz' \(not in entities"),
    ({"train": "a\tq\tb\n"}, r"train.txt:1: unknown relation 'q' \(not in relations.txt\)"),
    ({"ents": "a\nb\na\n"}, r"entities.txt:3: 'a' appears twice \(first at line 1\)"),
    ({"ents": "a\n\nb\nc\n"}, r"entities.txt:2: blank line"),
])
def test_mygo_malformed_lines_name_file_and_line(tmp_path, kwargs, expected):
    with pytest.raises(DatasetError, match=expected):
        load_kg(_write_mygo(tmp_path, **kwargs))


def test_mygo_small_and_no_layout_error_lists_each_layout(tmp_path):
    kg = load_kg(_write_mygo(tmp_path / "ds", ents="a\nb\nc\nd\n\n"))  # trailing blank: fine
    assert kg.entities == ["a", "b", "c", "d"] and kg.num_relations == 2
    assert kg.triples["valid"].tolist() == [[0, 1, 2]] and kg.triples["test"].shape == (0, 3)
    assert not kg.has_text.any() and kg.report.warnings  # names stand in for text: reported
    (tmp_path / "none").mkdir()
    with pytest.raises(DatasetError) as err:
        load_kg(tmp_path / "none")
    for needed in ("mkgformer: entity2text.txt", "openke: entity2id.txt",
                   "mygo: entities.txt, relations.txt, train.txt"):
        assert needed in str(err.value)
