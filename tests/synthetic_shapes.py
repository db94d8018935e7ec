"""Synthetic photos of counted, coloured shapes with their captions, for a SigLIP trained here.

Each picture shows one, two or three shapes of one kind and one colour, so its
caption ("two red circles") is exactly true of it. What the caption does not
name varies freely: background shade and texture (plain, gradient, noise),
fill texture (solid, speckled), sizes, positions, colour jitter and the
picture's size and aspect ratio. The three kinds cover the same area at the same
size, and every shape is drawn at one narrow size range (`SIZE`), so how much of the
picture is coloured (one, two or three shapes' worth) tells the count apart from colour
and kind; shapes never touch.
A fixed set of attribute combinations is held out of training (`HELD_OUT`), so tests
can ask whether the model composes attributes it learned separately.

Everything is a pure function of a seed: tools/train_tiny_siglip.py trains on
`sample(seed, ...)` streams and tests/test_quality.py evaluates on others.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COUNTS = ("one", "two", "three")
COLOURS = {"red": (210, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 215),
           "yellow": (235, 205, 30), "purple": (140, 60, 185)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ("plain", "gradient", "noise")
# Every shape's size (share of the picture's mean side), whatever the count: the coloured share of the
# picture is then one, two or three times a shape's area, so a model this small reads the count off it
# whatever the colour and kind. Each count's own size range with the total areas apart (0.24-0.265,
# 0.19-0.2, 0.165-0.175) left only 2-3% between counts' areas, and the count was then the attribute
# learnt last and named per colour and kind (held-out count 0.80 with kinds weighted in the loss)
SIZE = (0.165, 0.175)
# Distance from a shape's centre to its farthest point, in units of its size: a circle, a square and an
# equilateral triangle this far across all cover pi (0.85 size)^2
REACH = {"circle": 0.85, "square": 1.07, "triangle": 1.33}
# ... and to the nearest point of its edge: closer than that, two shapes certainly overlap
INNER = {"circle": REACH["circle"], "square": REACH["square"] * 0.5 ** 0.5, "triangle": REACH["triangle"] * 0.5}
FILLS = ("solid", "speckled")


@dataclass(frozen=True)
class Combo:
    """What a caption says: how many shapes, of which colour and kind."""

    count: str
    colour: str
    shape: str

    @property
    def label(self) -> str:
        """The tag text, e.g. "two red circles" (the tagger wraps it in the prompt)."""
        noun = self.shape if self.count == "one" else self.shape + "s"
        return f"{self.count} {self.colour} {noun}"


ALL = tuple(Combo(k, c, s) for k in COUNTS for c in COLOURS for s in SHAPES)
# One colour per (count, shape) pair is never shown in training; every attribute value, and every
# pair of values but the held-out ones, is still seen.
HELD_OUT = tuple(x for x in ALL
                 if (COUNTS.index(x.count) + list(COLOURS).index(x.colour) + SHAPES.index(x.shape)) % 5 == 0)
TRAIN = tuple(x for x in ALL if x not in HELD_OUT)
LABELS = tuple(x.label for x in ALL)


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A neutral (low-saturation) background, so the shapes' colour is the only strong one."""
    level = rng.uniform(15, 245)
    tint = rng.uniform(-12, 12, size=3)
    base = np.clip(level + tint, 0, 255)
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    pixels = np.broadcast_to(base, (h, w, 3)).astype(np.float32)
    if kind == "gradient":
        ramp = np.linspace(-1, 1, h if rng.random() < 0.5 else w, dtype=np.float32) * rng.uniform(20, 60)
        pixels = pixels + (ramp[:, None, None] if ramp.shape[0] == h else ramp[None, :, None])
    elif kind == "noise":
        pixels = pixels + rng.normal(0, rng.uniform(6, 20), size=(h, w, 1)).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, size: float, turn: float) -> None:
    """One filled shape, `REACH[shape]` x size from its centre to its farthest point, turned a little."""
    reach = size * REACH[shape]
    if shape == "circle":
        draw.ellipse([cx - reach, cy - reach, cx + reach, cy + reach], fill=255)
        return
    corners = 4 if shape == "square" else 3
    start = (-np.pi / 2 if corners == 3 else np.pi / 4) + turn
    angles = [start + 2 * np.pi * i / corners for i in range(corners)]
    draw.polygon([(cx + reach * np.cos(a), cy + reach * np.sin(a)) for a in angles], fill=255)


def _shapes(rng: np.random.Generator, combo: Combo, w: int, h: int) -> Image.Image:
    """The mask of `combo`'s shapes: all one size, inside the picture, none touching another."""
    side = (w * h) ** 0.5
    count = COUNTS.index(combo.count) + 1
    pad = max(2, round(side * 0.04))  # the least gap between two shapes
    for _ in range(200):
        size = side * rng.uniform(*SIZE)
        far, near = size * REACH[combo.shape], size * INNER[combo.shape]
        grow = 1 + pad / near  # drawn this much larger, a shape's edges move out by at least `pad`
        box = int(2 * far) + 4 * pad + 2  # each shape is drawn in its own small square, then tried in place
        # where earlier shapes and their gaps lie, with a box-wide margin all round so no square falls off it
        mask, taken = Image.new("L", (w, h), 0), np.zeros((h + 2 * box, w + 2 * box), dtype=bool)
        centres: list[tuple[float, float]] = []
        for _ in range(50):
            cx, cy, turn = rng.uniform(far, w - far), rng.uniform(far, h - far), rng.uniform(-0.25, 0.25)
            apart = [(cx - x) ** 2 + (cy - y) ** 2 for x, y in centres]
            if any(d < (2 * near + pad) ** 2 for d in apart):
                continue  # certainly touching
            x0, y0 = int(cx - far) - 2 * pad, int(cy - far) - 2 * pad
            one = Image.new("L", (box, box), 0)
            _draw(ImageDraw.Draw(one), combo.shape, cx - x0, cy - y0, size, turn)
            here = taken[y0 + box:y0 + 2 * box, x0 + box:x0 + 2 * box]
            if any(d < (2 * far + pad) ** 2 for d in apart) and (np.asarray(one) > 0)[here].any():
                continue  # close enough to touch, and the pixels do
            halo = Image.new("L", (box, box), 0)
            _draw(ImageDraw.Draw(halo), combo.shape, cx - x0, cy - y0, size * grow, turn)
            here |= np.asarray(halo) > 0
            mask.paste(255, (x0, y0), one)
            centres.append((cx, cy))
            if len(centres) == count:
                return mask
    raise RuntimeError(f"cannot place {combo.label} in {w}x{h}")  # pragma: no cover - never at these sizes


def render(combo: Combo, rng: np.random.Generator, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """One RGB picture of `combo` at `size` (width, height); everything unnamed drawn from `rng`."""
    w, h = size
    image = _background(rng, w, h)
    colour = np.clip(np.array(COLOURS[combo.colour]) + rng.integers(-22, 23, size=3), 0, 255)
    mask = _shapes(rng, combo, w, h)
    fill = np.broadcast_to(colour.astype(np.float32), (h, w, 3)).copy()
    kind = FILLS[rng.integers(len(FILLS))]
    if kind == "speckled":
        fill *= rng.uniform(0.8, 1.15, size=(h, w, 1)).astype(np.float32)
    image.paste(Image.fromarray(np.clip(fill, 0, 255).astype(np.uint8)), (0, 0), mask)
    return image


def sample(seed: int, combos: tuple[Combo, ...] = ALL, size: tuple[int, int] | None = (64, 64)
           ) -> Iterator[tuple[Image.Image, Combo]]:
    """An endless, seed-determined stream of (picture, combo), cycling through `combos` in shuffled rounds.

    size=None draws a random size (48-128 px a side, aspect 3:4 to 4:3), as photos come.
    """
    rng = np.random.default_rng(seed)
    while True:
        for index in rng.permutation(len(combos)):
            if size is None:
                side = int(rng.integers(48, 129))
                aspect = rng.uniform(0.75, 1.333)
                dims = (max(32, int(side * aspect)), side)
            else:
                dims = size
            yield render(combos[index], rng, dims), combos[index]


def take(seed: int, n: int, combos: tuple[Combo, ...] = ALL, size: tuple[int, int] | None = (64, 64)
         ) -> list[tuple[Image.Image, Combo]]:
    """The first n items of `sample(seed, combos, size)`."""
    stream = sample(seed, combos, size)
    return [next(stream) for _ in range(n)]
