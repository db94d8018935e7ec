"""`<stem>_tags.json` sidecars never mix two images' tags (issue 14 item 5)."""

from __future__ import annotations

import json

from conftest import make_image

from visual_buffet_siglip import cli
from visual_buffet_siglip.outputs import sidecar_path


def run(paths, checkpoints, *extra) -> int:
    return cli.main(["-q", "tag", *map(str, paths), "--format", "jsonl", "--sidecar", *extra,
                     "--model", str(checkpoints["siglip"]), "--device", "cpu", "--no-text-cache"])


def test_images_sharing_a_stem_get_an_error_not_a_shared_sidecar(tmp_path, checkpoints, caplog):
    jpg = make_image(tmp_path / "a.jpg", (40, 30), seed=1)
    png = make_image(tmp_path / "a.png", (40, 30), seed=2)
    alone = make_image(tmp_path / "b.png", (40, 30), seed=3)
    assert run([jpg, png, alone], checkpoints) == 1  # before: exit 0 and a_tags.json held only a.png's tags
    assert not (tmp_path / "a_tags.json").exists()
    assert json.loads(sidecar_path(str(alone)).read_text(encoding="utf-8"))["filename"] == "b.png"
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(str(jpg) in m and "a.png in the same folder would share a_tags.json" in m for m in errors)
    assert any(str(png) in m and "a.jpg in the same folder" in m for m in errors)
    # tagging one of them alone later is refused the same way: the name is ambiguous on disk
    assert run([png], checkpoints) == 1 and not (tmp_path / "a_tags.json").exists()


def test_a_sidecar_about_another_image_is_not_overwritten(tmp_path, checkpoints, caplog):
    image = make_image(tmp_path / "c.png", (40, 30), seed=4)
    theirs = json.dumps({"file": str(tmp_path / "c.tif"), "filename": "c.tif", "results": {"ram_plus": {}}})
    (tmp_path / "c_tags.json").write_text(theirs, encoding="utf-8")  # c.tif was moved away since
    assert run([image], checkpoints, "--overwrite") == 1
    assert (tmp_path / "c_tags.json").read_text(encoding="utf-8") == theirs
    assert any("holds the tags of 'c.tif'" in r.getMessage() for r in caplog.records)
