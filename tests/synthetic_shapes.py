"""Synthetic photos of counted, coloured shapes with their captions, for a SigLIP trained here.

Each picture shows one, two or three shapes of one kind and one colour, so its
caption ("two red circles") is exactly true of it. What the caption does not
name varies freely: background shade and texture (plain, gradient, noise),
fill texture (solid, speckled), sizes, positions, colour jitter and the
picture's size and aspect ratio. Shapes are 26-60% of the shorter side across
(`RADII`), two to five 8 px patches at the model's 64 px input; grid backgrounds and
striped fills were dropped, as their edges cost a model this small its shapes. A fixed set of attribute combinations
is held out of training (`HELD_OUT`), so tests can ask whether the model
composes attributes it learned separately.

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
# Radius ranges (share of the shorter side) for one, two and three shapes: as large as fits, since each
# 8 px patch more across a shape is what lets a model this small tell its kind; they overlap, so size
# hints at the count without giving it away
RADII = ((0.17, 0.3), (0.15, 0.25), (0.13, 0.2))
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
    elif kind == "grid":
        step = max(2, int(min(w, h) * rng.uniform(0.08, 0.2)))
        yy, xx = np.mgrid[0:h, 0:w]
        lines = ((yy % step) < max(1, step // 6)) | ((xx % step) < max(1, step // 6))
        pixels = pixels + np.where(lines, 1.0, 0.0)[..., None] * rng.choice([-35.0, 35.0])
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _place(rng: np.random.Generator, n: int, w: int, h: int) -> list[tuple[float, float, float]]:
    """n non-overlapping (cx, cy, r) discs inside the picture, sized to its shorter side."""
    side = min(w, h)
    for _ in range(200):
        r = side * rng.uniform(*RADII[n - 1])
        spots: list[tuple[float, float, float]] = []
        for _ in range(50):
            cx, cy = rng.uniform(r * 1.1, w - r * 1.1), rng.uniform(r * 1.1, h - r * 1.1)
            if all((cx - x) ** 2 + (cy - y) ** 2 > (r + q + side * 0.03) ** 2 for x, y, q in spots):
                spots.append((cx, cy, r))
                if len(spots) == n:
                    return spots
    raise RuntimeError(f"cannot place {n} shapes in {w}x{h}")  # pragma: no cover - never at these sizes


def _outline(shape: str, cx: float, cy: float, r: float, turn: float) -> list[tuple[float, float]] | None:
    """Polygon corners for squares and triangles (None for circles), turned a little."""
    if shape == "circle":
        return None
    corners = 4 if shape == "square" else 3
    start = (-np.pi / 2 if corners == 3 else np.pi / 4) + turn
    reach = r * (1.0 if corners == 4 else 1.15)
    return [(cx + reach * np.cos(start + 2 * np.pi * i / corners), cy + reach * np.sin(start + 2 * np.pi * i / corners))
            for i in range(corners)]


def render(combo: Combo, rng: np.random.Generator, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """One RGB picture of `combo` at `size` (width, height); everything unnamed drawn from `rng`."""
    w, h = size
    image = _background(rng, w, h)
    colour = np.clip(np.array(COLOURS[combo.colour]) + rng.integers(-22, 23, size=3), 0, 255)
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    for cx, cy, r in _place(rng, COUNTS.index(combo.count) + 1, w, h):
        corners = _outline(combo.shape, cx, cy, r, rng.uniform(-0.25, 0.25))
        if corners is None:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        else:
            draw.polygon(corners, fill=255)
    fill = np.broadcast_to(colour.astype(np.float32), (h, w, 3)).copy()
    kind = FILLS[rng.integers(len(FILLS))]
    if kind == "striped":
        period = max(2, int(min(w, h) * rng.uniform(0.04, 0.08)))
        yy, xx = np.mgrid[0:h, 0:w]
        stripes = ((xx + yy) // period) % 2 == 1 if rng.random() < 0.5 else (yy // period) % 2 == 1
        fill[stripes] *= 0.7
    elif kind == "speckled":
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
