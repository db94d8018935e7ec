"""XMP sidecars, read back by an independent reader (exiftool): merged, never clobbered, byte-stable."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from visual_buffet_siglip.cli import main
from visual_buffet_siglip.vocabulary import TagOptions, parse_vocabulary
from visual_buffet_siglip.errors import XmpError
from visual_buffet_siglip.xmp import (MAX_SIDECAR_BYTES, Keyword, XmpSink, _merge_tree, _ours_alone, keywords_for,
                                      merge, read_sidecar, sidecar_path)

EXIFTOOL = shutil.which("exiftool")
needs_exiftool = pytest.mark.skipif(EXIFTOOL is None, reason="exiftool (Debian libimage-exiftool-perl) is "
                                    "installed by .ci/run")

VOCAB = parse_vocabulary("golden retriever\t0.04\tAnimals|Dogs|Golden retriever\nbeach\t\tPlaces|Beach\n"
                         "blurry photo\toff\nsunset\n")
OPTIONS = TagOptions(VOCAB, 0.01, 50)

DARKTABLE = """<?xml version="1.0" encoding="UTF-8"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="XMP Core 4.4.0-Exiv2">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:exif="http://ns.adobe.com/exif/1.0/"
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:xmpMM="http://ns.adobe.com/xap/1.0/mm/"
    xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:lr="http://ns.adobe.com/lightroom/1.0/"
    xmlns:darktable="http://darktable.sf.net/"
   exif:DateTimeOriginal="2023:06:01 10:00:00"
   xmp:Rating="3"
   xmpMM:DerivedFrom="IMG_1.JPG"
   darktable:xmp_version="5"
   darktable:history_end="2">
   <dc:subject>
    <rdf:Bag>
     <rdf:li>holiday</rdf:li>
    </rdf:Bag>
   </dc:subject>
   <lr:hierarchicalSubject>
    <rdf:Bag>
     <rdf:li>Trips|holiday</rdf:li>
    </rdf:Bag>
   </lr:hierarchicalSubject>
   <darktable:history>
    <rdf:Seq>
     <rdf:li darktable:num="0" darktable:operation="exposure" darktable:enabled="1" darktable:modversion="6"
      darktable:params="0000000000000000" darktable:multi_name="" darktable:multi_priority="0"/>
     <rdf:li darktable:num="1" darktable:operation="colorbalancergb" darktable:enabled="1"
      darktable:modversion="5" darktable:params="gz02eJxjYGBgYAAAAAUAAQ==" darktable:multi_name=""
      darktable:multi_priority="0"/>
    </rdf:Seq>
   </darktable:history>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
"""


def exif(*paths: Path, fields=("-XMP-dc:Subject", "-XMP-lr:HierarchicalSubject", "-XMP-xmp:Rating")) -> list[dict]:
    out = subprocess.run([EXIFTOOL, "-j", *fields, *map(str, paths)], check=True, capture_output=True, text=True)
    rows = json.loads(out.stdout)
    for row in rows:
        row.pop("SourceFile")
        for key in ("Subject", "HierarchicalSubject"):
            if isinstance(row.get(key), str):  # exiftool gives a one-item list as a string
                row[key] = [row[key]]
    return rows


def all_xmp(path: Path) -> dict:
    """Every XMP property exiftool sees, by group, except the keyword fields and our own namespace."""
    [row] = exif(path, fields=("-G1", "-struct", "-XMP:all"))
    return {k: v for k, v in row.items()
            if not k.startswith("XMP-vbsiglip") and k not in ("XMP-dc:Subject", "XMP-lr:HierarchicalSubject")}


def tags(*pairs):
    return [{"label": label, "confidence": conf} for label, conf in pairs]


def merged(existing, record_tags, options=OPTIONS, **kwargs):
    return merge(existing, keywords_for(record_tags, options, **kwargs), model="m", threshold=0.01)


@needs_exiftool
def test_new_sidecar_has_leaf_keywords_paths_and_our_record(tmp_path):
    path = tmp_path / "a.jpg.xmp"
    path.write_bytes(merged(None, tags(("golden retriever", 0.07), ("sunset", 0.02))))
    assert exif(path) == [{"Subject": ["Golden retriever", "sunset"],
                           "HierarchicalSubject": ["AI|Animals|Dogs|Golden retriever", "AI|sunset"]}]
    [ours] = exif(path, fields=("-struct", "-XMP-vbsiglip:all"))
    assert ours["Model"] == "m" and ours["Threshold"] == 0.01 and ours["Subjects"] == ["Golden retriever", "sunset"]
    assert [(k["Label"], k["Confidence"], k["Threshold"]) for k in ours["Keywords"]] == [
        ("golden retriever", 0.07, 0.04), ("sunset", 0.02, 0.01)]
    assert merged(path.read_bytes(), tags(("golden retriever", 0.07), ("sunset", 0.02))) == path.read_bytes()


@needs_exiftool
def test_exiftool_sidecar_with_user_keywords_and_rating(tmp_path):
    path = tmp_path / "IMG_1.JPG.xmp"
    subprocess.run([EXIFTOOL, "-q", "-o", str(path), "-XMP-dc:Subject=holiday", "-XMP-dc:Subject=Golden retriever",
                    "-XMP-lr:HierarchicalSubject=Trips|holiday", "-XMP-xmp:Rating=4"], check=True)
    before = exif(path)
    assert before == [{"Subject": ["holiday", "Golden retriever"], "HierarchicalSubject": ["Trips|holiday"],
                       "Rating": 4}]
    record = tags(("golden retriever", 0.07), ("beach", 0.03))
    path.write_bytes(merged(path.read_bytes(), record))
    after = exif(path)
    assert after == [{"Subject": ["holiday", "Golden retriever", "Beach"],  # the user's copy is not taken over
                      "HierarchicalSubject": ["Trips|holiday", "AI|Animals|Dogs|Golden retriever", "AI|Places|Beach"],
                      "Rating": 4}]
    once = path.read_bytes()
    path.write_bytes(merged(once, record))
    assert path.read_bytes() == once and exif(path) == after  # twice: no byte changes
    # a new vocabulary: our stale keywords go, the user's stay (their "Golden retriever" too)
    path.write_bytes(merged(once, tags(("sunset", 0.05))))
    assert exif(path) == [{"Subject": ["holiday", "Golden retriever", "sunset"],
                           "HierarchicalSubject": ["Trips|holiday", "AI|sunset"], "Rating": 4}]
    path.write_bytes(merged(path.read_bytes(), []))  # nothing above the thresholds any more
    assert exif(path) == before


@needs_exiftool
def test_darktable_sidecar_keeps_every_other_property(tmp_path):
    path = tmp_path / "IMG_1.JPG.xmp"
    path.write_text(DARKTABLE, encoding="utf-8")
    others = all_xmp(path)
    assert others["XMP-darktable:History"][1]["Operation"] == "colorbalancergb" and others["XMP-xmp:Rating"] == 3
    path.write_bytes(merged(path.read_bytes(), tags(("beach", 0.2))))
    assert all_xmp(path) == others
    assert exif(path) == [{"Subject": ["holiday", "Beach"], "HierarchicalSubject": ["Trips|holiday",
                                                                                   "AI|Places|Beach"], "Rating": 3}]


def test_keyword_limit_root_and_off_labels():
    record = tags(("sunset", 0.5), ("golden retriever", 0.4), ("beach", 0.3))
    words = keywords_for(record, OPTIONS, root="Auto|SigLIP", limit=2)
    assert [(k.subject, k.hierarchical) for k in words] == [
        ("sunset", "Auto|SigLIP|sunset"), ("Golden retriever", "Auto|SigLIP|Animals|Dogs|Golden retriever")]
    assert [k.hierarchical for k in keywords_for(record, OPTIONS, root="", limit=1)] == ["sunset"]


HOSTILE = {
    "entity bomb": b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;">'
                   b']><x:xmpmeta xmlns:x="adobe:ns:meta/">&b;</x:xmpmeta>',
    "external entity": b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
                       b'<x:xmpmeta xmlns:x="adobe:ns:meta/">&e;</x:xmpmeta>',
    "invalid UTF-8": DARKTABLE.replace("holiday", "caf\xe9").encode("latin-1"),
    "not XML": b"\x00\x01 not xml",
    "not XMP": b"<html><body>hello</body></html>",
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_sidecars_are_refused_naming_the_file(kind):
    with pytest.raises(XmpError, match=r"^evil\.jpg\.xmp: .*left unchanged"):
        merge(HOSTILE[kind], [], model="m", threshold=0.01, source="evil.jpg.xmp")


def test_sink_refuses_hostile_files_and_still_writes_the_others(tmp_path, caplog):
    images = []
    for name in ("bomb", "huge", "fifo", "link", "good"):
        image = tmp_path / f"{name}.jpg"
        image.write_bytes(b"not really a jpeg, never opened")
        images.append(image)
    (tmp_path / "bomb.jpg.xmp").write_bytes(HOSTILE["entity bomb"])
    with open(tmp_path / "huge.jpg.xmp", "wb") as handle:
        handle.truncate(50 * 1024 * 1024)
    os.mkfifo(tmp_path / "fifo.jpg.xmp")
    os.symlink(tmp_path / "good.jpg", tmp_path / "link.jpg.xmp")
    hashes = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()
              if p.is_file() and not p.name.startswith("fifo")}
    sink = XmpSink(OPTIONS, model="m")
    for image in images:
        sink.write(str(image), None, {"tags": tags(("beach", 0.2))})
    sink.close()
    assert (sink.written, sink.failed) == (1, 4)
    assert b"Beach" in (tmp_path / "good.jpg.xmp").read_bytes()
    for name, digest in hashes.items():  # refused sidecars and every image unchanged
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == digest
    errors = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    for name, why in (("bomb", "refused"), ("huge", "52,428,800 bytes"), ("fifo", "pipe"), ("link", "symbolic")):
        assert f"{name}.jpg.xmp" in errors and why in errors
    assert MAX_SIDECAR_BYTES < 50 * 1024 * 1024


def test_no_keywords_and_no_sidecar_writes_nothing(tmp_path):
    image = tmp_path / "plain.jpg"
    image.write_bytes(b"never opened")
    sink = XmpSink(OPTIONS, model="m")
    sink.write(str(image), None, {"tags": tags(("blurry photo", 0.9))})  # off: never a keyword
    sink.write(str(image), None, {"tags": []})
    assert not (tmp_path / "plain.jpg.xmp").exists() and (sink.written, sink.failed) == (0, 0)


def test_sidecar_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sidecar_path("pics/IMG_1.JPG") == Path("pics/IMG_1.JPG.xmp")
    assert sidecar_path("pics/IMG_1.JPG", "out") == Path("out/pics/IMG_1.JPG.xmp")
    assert sidecar_path(str(tmp_path / "pics" / "a.png"), "out") == Path("out/pics/a.png.xmp")
    assert sidecar_path("/elsewhere/a.png", "out") == Path("out/elsewhere/a.png.xmp")
    assert read_sidecar(tmp_path / "missing.xmp") is None


# --- the fast path (sidecars holding only our record) gives the tree merge's bytes ------------

def outcome(merger, existing, keywords, model="m"):
    """The bytes a merge gives, or its error."""
    try:
        return merger(existing, keywords, model=model, threshold=0.01, source="a.jpg.xmp")
    except XmpError as exc:
        return f"XmpError: {exc}"


# few letters, so subjects repeat; the characters minidom escapes, and some XML cannot hold
WORDS = st.text(alphabet=st.sampled_from(list('ab |&<>"\'\t\n\r\xe9\U0001f415\x00\x0b')), max_size=5)
KEYWORDS = st.lists(st.builds(Keyword, WORDS, st.floats(0, 1), st.sampled_from([0.01, 0.04, 1e-05]), WORDS, WORDS),
                    max_size=4)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=KEYWORDS, then=KEYWORDS, model=WORDS)
def test_fast_path_gives_the_tree_merges_bytes(first, then, model):
    new = outcome(merge, None, first, model)
    assert new == outcome(_merge_tree, None, first, model)  # a new sidecar
    if isinstance(new, bytes):
        assert outcome(merge, new, first, model) == outcome(_merge_tree, new, first, model)  # a rerun
        assert outcome(merge, new, then, model) == outcome(_merge_tree, new, then, model)  # a new vocabulary


def test_fast_path_cases_and_a_sidecar_the_user_edited_between_runs():
    first = keywords_for(tags(("golden retriever", 0.07), ("sunset", 0.02)), OPTIONS)
    then = keywords_for(tags(("beach", 0.5)), OPTIONS)
    new = merge(None, first, model="m", threshold=0.01)
    assert _ours_alone(new) and merge(new, first, model="m", threshold=0.01) == new
    assert merge(new, then, model="m", threshold=0.01) == merge(None, then, model="m", threshold=0.01)
    # the user adds a keyword and a rating: no longer ours alone, the tree merge keeps both
    edited = new.replace(b"<rdf:li>sunset</rdf:li>\n    </rdf:Bag>\n   </dc:subject>",
                         b"<rdf:li>sunset</rdf:li>\n     <rdf:li>holiday</rdf:li>\n    </rdf:Bag>\n   </dc:subject>"
                         ).replace(b'rdf:about=""', b'rdf:about="" xmp:Rating="4"').replace(
                         b"<rdf:Description ", b'<rdf:Description xmlns:xmp="http://ns.adobe.com/xap/1.0/" ')
    assert edited.count(b"holiday") == 1 and not _ours_alone(edited)
    for keywords in (first, then, []):
        out = merge(edited, keywords, model="m", threshold=0.01)
        assert out == _merge_tree(edited, keywords, model="m", threshold=0.01, source="s")
        assert b"<rdf:li>holiday</rdf:li>" in out and b'xmp:Rating="4"' in out
    renamed = new.replace(b"<rdf:li>sunset</rdf:li>", b"<rdf:li>sunrise</rdf:li>", 1)  # in dc:subject only
    assert b"<rdf:li>sunset</rdf:li>" in renamed and not _ours_alone(renamed)
    assert merge(renamed, then, model="m", threshold=0.01) == _merge_tree(renamed, then, model="m", threshold=0.01,
                                                                          source="s")
    assert b"<rdf:li>sunrise</rdf:li>" in merge(renamed, then, model="m", threshold=0.01)  # the user's now
    assert not _ours_alone(merge(None, [], model="m", threshold=0.01))


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_sidecars_are_refused_with_keywords_too(kind):
    keywords = keywords_for(tags(("beach", 0.2)), OPTIONS)
    with pytest.raises(XmpError, match=r"^evil\.jpg\.xmp: .*left unchanged"):
        merge(HOSTILE[kind], keywords, model="m", threshold=0.01, source="evil.jpg.xmp")


# --- end to end: tag, then retag with a tuned vocabulary --------------------------------------

@needs_exiftool
def test_tag_then_retag_with_xmp_end_to_end(tmp_path, images, checkpoints, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    photos = Path("photos")
    photos.mkdir()
    for image in images[:3]:
        shutil.copy(image, photos / image.name)
    (photos / "img0.png.xmp").write_text(DARKTABLE, encoding="utf-8")  # a darktable sidecar with user keywords
    first = Path("first.tsv")
    first.write_text("dog\t\tAnimals|Dogs|Dog\ncat\t0\tAnimals|Cats|Cat\nbeach\toff\nsunset\n", encoding="utf-8")
    model = ["--model", str(checkpoints["siglip"]), "--device", "cpu", "--dtype", "float32", "--no-text-cache"]
    image_bytes = {p: p.read_bytes() for p in photos.glob("*.png")}
    run = ["-q", "tag", str(photos), "--threshold", "0", "--labels-file", str(first), "--xmp",
           "--save-embeddings", "pics.emb", "-o", "tags.json", *model]
    assert main(run) == 0
    sidecars = sorted(photos.glob("*.xmp"))
    assert [p.name for p in sidecars] == ["img0.png.xmp", "img1.png.xmp", "img2.png.xmp"]
    rows = exif(*sidecars)
    for row in rows:
        ours = [s for s in row["Subject"] if s != "holiday"]
        assert sorted(ours) == ["Cat", "Dog", "sunset"]  # "beach" is off: scored, never a keyword
    assert rows[0]["Rating"] == 3 and "holiday" in rows[0]["Subject"] and "Trips|holiday" in rows[0][
        "HierarchicalSubject"]
    others = all_xmp(sidecars[0])
    written = {p: p.read_bytes() for p in sidecars}
    assert main(["-q", "tag", str(photos), "--threshold", "0", "--labels-file", str(first), "--xmp",
                 "-o", "tags2.json", *model]) == 0
    assert {p: p.read_bytes() for p in sidecars} == written  # a second run changes no byte

    # tuned vocabulary: "dog" off, a new label; retag from the store, sidecars under another folder too
    tuned = Path("tuned.tsv")
    tuned.write_text("dog\toff\tAnimals|Dogs|Dog\ncat\t0\tAnimals|Cats|Cat\nbeach\t0\tPlaces|Beach\n", encoding="utf-8")
    assert main(["-q", "retag", "pics.emb", "--labels-file", str(tuned), "--xmp", "-o", "retag.json", *model]) == 0
    rows = exif(*sidecars)
    assert all(sorted(s for s in row["Subject"] if s != "holiday") == ["Beach", "Cat"] for row in rows)
    assert all_xmp(sidecars[0]) == others and rows[0]["Rating"] == 3
    assert all(sorted(h for h in row["HierarchicalSubject"] if not h.startswith("Trips"))
               == ["AI|Animals|Cats|Cat", "AI|Places|Beach"] for row in rows)
    retagged = json.loads(Path("retag.json").read_text(encoding="utf-8"))
    assert all(sorted(t["label"] for t in r["tags"]) == ["beach", "cat"] for r in retagged)

    assert main(["-q", "retag", "pics.emb", "--labels-file", str(tuned), "--xmp-dir", "out",
                 "--xmp-max-keywords", "1", "-o", "retag.json", *model]) == 0
    copies = sorted(Path("out/photos").glob("*.xmp"))
    assert [p.name for p in copies] == ["img0.png.xmp", "img1.png.xmp", "img2.png.xmp"]
    assert all(len(row["Subject"]) == 1 for row in exif(*copies))
    assert {p: p.read_bytes() for p in photos.glob("*.png")} == image_bytes  # images never modified


def test_a_failed_sidecar_makes_the_run_exit_1(tmp_path, images, checkpoints, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(images[0], tmp_path / "a.png")
    shutil.copy(images[1], tmp_path / "b.png")
    (tmp_path / "a.png.xmp").write_bytes(HOSTILE["external entity"])
    code = main(["-q", "tag", "a.png", "b.png", "--xmp", "-o", "out.json", "--model", str(checkpoints["siglip"]),
                 "--device", "cpu", "--no-text-cache"])
    assert code == 1
    assert (tmp_path / "a.png.xmp").read_bytes() == HOSTILE["external entity"]
    assert b"vbsiglip" in (tmp_path / "b.png.xmp").read_bytes()
    assert len(json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))) == 2
