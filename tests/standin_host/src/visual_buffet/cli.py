"""`visual-buffet tag IMAGE... -p PLUGIN [--threshold T] [--limit N]`: JSON per image on stdout."""

from __future__ import annotations

import argparse
import dataclasses
import json

from .engine import TaggingEngine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="visual-buffet")
    sub = parser.add_subparsers(dest="command", required=True)
    tag = sub.add_parser("tag")
    tag.add_argument("images", nargs="+")
    tag.add_argument("-p", "--plugin", action="append", required=True)
    tag.add_argument("--threshold", type=float)
    tag.add_argument("--limit", type=int)
    args = parser.parse_args(argv)
    options = {k: v for k, v in (("threshold", args.threshold), ("limit", args.limit)) if v is not None}
    engine = TaggingEngine()
    out = {}
    for image in args.images:
        results = engine.tag_image(image, args.plugin, {name: options for name in args.plugin})
        out[image] = {name: dataclasses.asdict(result) for name, result in results.items()}
    print(json.dumps(out, indent=2))
    return 0
