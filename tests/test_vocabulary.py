"""Sanity checks for the built-in label vocabulary (data/vocabulary.txt).

The file is read by path rather than through the package so the test works
whether or not ``visual_buffet_siglip`` is importable.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

VOCAB_PATH = Path(__file__).parents[1] / "visual_buffet_siglip" / "data" / "vocabulary.txt"

MIN_LABELS = 1000

# Irregular plurals -> singular.
IRREGULAR_PLURALS = {
    "people": "person",
    "children": "child",
    "men": "man",
    "women": "woman",
    "mice": "mouse",
    "geese": "goose",
    "teeth": "tooth",
    "feet": "foot",
}

# Singular words ending in "s" that the simple "s" -> "" rule must leave
# alone (besides the "-ss" and "-us" endings, which are never stripped).
INVARIANT_S_WORDS = {
    "analysis", "axis", "canvas", "chassis", "christmas", "ferris", "gas",
    "iris", "lens", "mantis", "news", "oasis", "series", "species", "tennis",
}

# British / American spelling pairs: at most one spelling may be used.
SPELLING_VARIANTS = [
    ("grey", "gray"),
    ("colour", "color"),
    ("harbour", "harbor"),
    ("theatre", "theater"),
    ("jewellery", "jewelry"),
    ("aeroplane", "airplane"),
    ("tyre", "tire"),
]


def load_labels() -> list[str]:
    """Return the labels in file order, skipping blank and ``#`` comment lines."""
    labels = []
    for line in VOCAB_PATH.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        labels.append(line.split("\t")[0])  # the label column of the vocabulary format
    return labels


def singularize(word: str) -> str:
    """Reduce one lowercase English word to a rough singular form.

    Deliberately simple; it only has to map the usual plural endings onto the
    same key as their singular, without merging unrelated words.
    """
    if word in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[word]
    if word in INVARIANT_S_WORDS or word.endswith(("ss", "us")):
        return word
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"  # berries -> berry
    if len(word) > 4 and word.endswith("ves"):
        return word[:-3] + "f"  # leaves -> leaf, wolves -> wolf
    if len(word) > 3 and word.endswith("es") and word[:-2].endswith(("s", "x", "ch", "sh", "z")):
        return word[:-2]  # buses -> bus, boxes -> box, peaches -> peach
    if len(word) > 2 and word.endswith("s"):
        return word[:-1]  # dogs -> dog, kiwis -> kiwi
    return word


def normalize(label: str) -> str:
    """Key under which near-duplicate labels collide.

    Words are split on spaces and hyphens, singularised, then joined with no
    separator, so "sea shell" / "seashell" / "sea-shells" share one key.
    """
    words = label.replace("-", " ").split()
    key = "".join(singularize(w) for w in words)
    # "knife"/"knives" -> "knif"; applied after joining so it is consistent.
    if key.endswith("fe"):
        key = key[:-1]
    return key


@pytest.fixture(scope="module")
def labels() -> list[str]:
    return load_labels()


def test_file_exists():
    assert VOCAB_PATH.is_file(), f"missing {VOCAB_PATH}"


def test_minimum_size(labels):
    assert len(labels) >= MIN_LABELS, f"only {len(labels)} labels"


def test_labels_are_clean(labels):
    bad = []
    for label in labels:
        problems = []
        if label != label.strip():
            problems.append("not stripped")
        if label != label.lower():
            problems.append("not lowercase")
        if not label.isascii():
            problems.append("not ascii")
        if "  " in label or "\t" in label:
            problems.append("not single-spaced")
        if not label:
            problems.append("empty")
        elif not label[-1].isalnum():
            problems.append("trailing punctuation")
        if problems:
            bad.append((label, problems))
    assert not bad, f"malformed labels: {bad[:20]}"


def test_labels_are_unique(labels):
    seen = set()
    dupes = sorted({label for label in labels if label in seen or seen.add(label)})
    assert not dupes, f"duplicate labels: {dupes}"


def test_no_near_duplicates(labels):
    groups: dict[str, list[str]] = defaultdict(list)
    for label in labels:
        groups[normalize(label)].append(label)
    collisions = {key: group for key, group in groups.items() if len(group) > 1}
    assert not collisions, f"near-duplicate labels: {collisions}"


@pytest.mark.parametrize("british, american", SPELLING_VARIANTS)
def test_single_spelling_variant(labels, british, american):
    words = {w for label in labels for w in label.replace("-", " ").split()}
    assert not (british in words and american in words), (
        f"both spellings used: {british!r} and {american!r}"
    )


def test_no_collisions_across_spelling_variants(labels):
    # "grey whale" vs "gray whale", "watercolour" vs "watercolor", ...
    groups: dict[str, list[str]] = defaultdict(list)
    for label in labels:
        unified = label
        for british, american in SPELLING_VARIANTS:
            unified = unified.replace(british, american)
        groups[normalize(unified)].append(label)
    collisions = {key: group for key, group in groups.items() if len(group) > 1}
    assert not collisions, f"labels differing only by spelling: {collisions}"


# --- the normaliser itself -------------------------------------------------


@pytest.mark.parametrize(
    "a, b",
    [
        ("dog", "dogs"),
        ("bus", "buses"),
        ("leaf", "leaves"),
        ("person", "people"),
        ("child", "children"),
        ("mouse", "mice"),
        ("berry", "berries"),
        ("box", "boxes"),
        ("peach", "peaches"),
        ("knife", "knives"),
        ("sea shell", "seashell"),
        ("t-shirt", "t shirts"),
        ("goose", "geese"),
    ],
)
def test_normalize_merges_variants(a, b):
    assert normalize(a) == normalize(b)


@pytest.mark.parametrize(
    "word",
    ["glass", "dress", "bus", "cactus", "tennis", "iris", "oasis", "christmas", "grass"],
)
def test_normalize_keeps_singulars_ending_in_s(word):
    assert normalize(word) == word


@pytest.mark.parametrize(
    "a, b",
    [
        ("man", "woman"),
        ("cat", "catfish"),
        ("glass", "eyeglasses"),
        ("sea", "seal"),
        ("ski", "skier"),
    ],
)
def test_normalize_keeps_distinct_words(a, b):
    assert normalize(a) != normalize(b)


# --- keyword paths of the built-in vocabulary ---------------------------------

# The top-level categories the file's header documents; every path starts with one.
TOP_LEVELS = {
    "Activities", "Animals", "Architecture", "Art", "Clothing", "Documents", "Events", "Food", "Nature",
    "Objects", "People", "Places", "Plants", "Sports", "Style", "Time", "Vehicles", "Weather",
}


@pytest.fixture(scope="module")
def rows() -> list[list[str]]:
    """The tab-separated columns of each entry line, in file order."""
    return [line.split("\t") for line in VOCAB_PATH.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_every_label_has_a_keyword_path(rows):
    bad = [row for row in rows if len(row) != 3 or row[1] != "" or not row[2]]
    assert not bad, f"expected label<TAB><TAB>keyword path (empty threshold): {bad[:10]}"


def test_keyword_paths_are_well_formed(rows):
    bad = []
    for label, _, path in rows:
        parts = path.split("|")
        if any(not part or part != " ".join(part.split()) for part in parts):
            bad.append((label, path, "empty or badly spaced part"))
        elif parts[0] not in TOP_LEVELS:
            bad.append((label, path, "top level not in the documented set"))
        elif any(not (part[0].isupper() or part[0].isdigit()) for part in parts):
            bad.append((label, path, "a part does not start with a capital"))
        elif len(parts) > 4:
            bad.append((label, path, "deeper than 4 levels"))
    assert not bad, f"malformed keyword paths: {bad[:20]}"


def test_keyword_leaf_names_the_label(rows):
    """Below the second level a path ends in the label itself; above, it may be a category ("dog": Animals|Dogs)."""
    bad = [(label, path) for label, _, path in rows
           if path.count("|") > 1 and path.split("|")[-1].lower() != label]
    assert not bad, f"leaf keyword differs from the label: {bad[:20]}"


def test_keyword_paths_are_unique(rows):
    seen: dict[str, str] = {}
    dupes = [(label, seen[path]) for label, _, path in rows if seen.setdefault(path, label) != label]
    assert not dupes, f"labels sharing one keyword path: {dupes}"


def test_header_documents_the_top_levels():
    header = " ".join(line.lstrip("# ") for line in VOCAB_PATH.read_text(encoding="utf-8").splitlines()
                      if line.startswith("#"))
    missing = sorted(top for top in TOP_LEVELS if top not in header)
    assert not missing, f"top-level categories not named in the file's header: {missing}"


def test_every_top_level_is_used(rows):
    used = {path.split("|")[0] for _, _, path in rows}
    assert used == TOP_LEVELS, f"documented but unused: {sorted(TOP_LEVELS - used)}"
