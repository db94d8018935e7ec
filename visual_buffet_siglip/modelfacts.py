"""What each SigLIP checkpoint is: the registry, tower shapes and parameter counts.

The one place for model facts (widths, layers, MLP widths, heads, parameter
counts): `models` reads them to check names and derive facts from a config.json,
`memory` to predict memory, `planner` to size batches. Pure data, no imports
from the rest of the package, so anything may import it without a circle.
"""

from __future__ import annotations

from dataclasses import dataclass

CHANNELS = 3
NAFLEX_POSITIONS = 256  # NaFlex checkpoints learn a 16 x 16 position grid, resized to each image


@dataclass(frozen=True)
class TowerShape:
    """One transformer tower's dimensions, as in its transformers config."""

    width: int
    layers: int
    mlp: int  # intermediate_size
    heads: int

    def layer_params(self) -> int:
        """One encoder layer: q/k/v/out projections, fc1/fc2, two layer norms (weights and biases)."""
        d, i = self.width, self.mlp
        return 4 * d * d + 2 * d * i + 9 * d + i


# Real checkpoints' vision towers by size class, smallest first. so400m's MLP (4304) is not a multiple of 64.
VISION_SHAPES = {
    "base": TowerShape(768, 12, 3072, 12),
    "large": TowerShape(1024, 24, 4096, 16),
    "so400m": TowerShape(1152, 27, 4304, 16),
    "giant": TowerShape(1536, 40, 6144, 16),
}
SIZE_ORDER = tuple(VISION_SHAPES)
# Text towers: the same as the vision tower, except giant-opt pairs a giant vision tower with so400m text.
TEXT_SHAPES = {**VISION_SHAPES, "giant": VISION_SHAPES["so400m"]}
# Vision-tower parameters (millions) the registry records per size class; totals differ by text tower.
VISION_PARAMS_M = {"base": 93, "large": 316, "so400m": 428, "giant": 1164}
MIN_VRAM_GB_FP16 = {"base": 2.0, "large": 4.0, "so400m": 6.0, "giant": 12.0}  # listed by `models`


@dataclass(frozen=True)
class ModelInfo:
    """What the planner needs to know about a checkpoint before loading it."""

    id: str
    family: str  # "siglip", "siglip2" (fixed resolution, model_type siglip) or "naflex"
    size: str  # base, large, so400m, giant
    image_size: int | None  # None for NaFlex (resolution follows max_num_patches)
    patch_size: int
    params_m: int  # whole model (vision + text), millions of parameters
    vision_params_m: int
    vision_width: int
    vision_layers: int
    in_registry: bool = True
    vision_mlp: int = 0  # intermediate size; 0: the size class's (VISION_SHAPES)
    vision_heads: int = 0  # attention heads; 0: the size class's

    @property
    def min_vram_gb_fp16(self) -> float:
        """The smallest GPU memory (GB) that fits this size class at half precision (listed by `models`)."""
        return MIN_VRAM_GB_FP16[self.size]


def _entry(model_id: str, family: str, size: str, image_size: int | None, patch: int, params_m: int) -> ModelInfo:
    shape = VISION_SHAPES[size]
    return ModelInfo(model_id, family, size, image_size, patch, params_m, VISION_PARAMS_M[size],
                     shape.width, shape.layers)


def _build_registry() -> dict[str, ModelInfo]:
    rows: list[ModelInfo] = []
    for res in (224, 256, 384, 512):
        rows.append(_entry(f"google/siglip-base-patch16-{res}", "siglip", "base", res, 16, 203))
    for res in (256, 384):
        rows.append(_entry(f"google/siglip-large-patch16-{res}", "siglip", "large", res, 16, 652))
    for res in (224, 384):
        rows.append(_entry(f"google/siglip-so400m-patch14-{res}", "siglip", "so400m", res, 14, 878))
    rows.append(_entry("google/siglip-so400m-patch16-256-i18n", "siglip", "so400m", 256, 16, 1129))
    rows.append(_entry("google/siglip-base-patch16-256-multilingual", "siglip", "base", 256, 16, 371))
    for res in (224, 256, 384, 512):
        rows.append(_entry(f"google/siglip2-base-patch16-{res}", "siglip2", "base", res, 16, 375))
    rows.append(_entry("google/siglip2-base-patch32-256", "siglip2", "base", 256, 32, 376))
    for res in (256, 384, 512):
        rows.append(_entry(f"google/siglip2-large-patch16-{res}", "siglip2", "large", res, 16, 882))
    for res in (224, 384):
        rows.append(_entry(f"google/siglip2-so400m-patch14-{res}", "siglip2", "so400m", res, 14, 1136))
    for res in (256, 384, 512):
        rows.append(_entry(f"google/siglip2-so400m-patch16-{res}", "siglip2", "so400m", res, 16, 1136))
    for res in (256, 384):
        rows.append(_entry(f"google/siglip2-giant-opt-patch16-{res}", "siglip2", "giant", res, 16, 1871))
    rows.append(_entry("google/siglip2-base-patch16-naflex", "naflex", "base", None, 16, 375))
    rows.append(_entry("google/siglip2-so400m-patch16-naflex", "naflex", "so400m", None, 16, 1136))
    return {row.id: row for row in rows}


REGISTRY: dict[str, ModelInfo] = _build_registry()


def vision_tower_params(shape: TowerShape, patch: int, positions: int, head: bool = True) -> int:
    """Parameters of a SiglipVisionTransformer (patch embedding, positions, layers, attention-pooling head)."""
    d = shape.width
    count = CHANNELS * patch * patch * d + d  # Conv2d (SigLIP) or Linear (NaFlex): same count
    count += positions * d + shape.layers * shape.layer_params() + 2 * d  # + post layer norm
    if head:  # probe, MultiheadAttention (packed in-projection + out), layer norm, MLP
        count += d + 4 * d * d + 4 * d + 2 * d + 2 * d * shape.mlp + shape.mlp + d
    return count


def vision_shape(model: ModelInfo) -> TowerShape:
    """The vision tower's shape: the checkpoint's own when known, else its size class's."""
    default = VISION_SHAPES.get(model.size, VISION_SHAPES["base"])
    return TowerShape(model.vision_width, model.vision_layers, model.vision_mlp or default.mlp,
                      model.vision_heads or default.heads)


def text_shape(model: ModelInfo) -> TowerShape:
    return TEXT_SHAPES.get(model.size, VISION_SHAPES["base"])


def vision_params(model: ModelInfo) -> int:
    """The vision tower's exact parameter count for this geometry (patch embedding and positions included)."""
    positions = NAFLEX_POSITIONS if model.image_size is None else (model.image_size // model.patch_size) ** 2
    return vision_tower_params(vision_shape(model), model.patch_size, positions)


def vision_tokens(model: ModelInfo, max_num_patches: int = 256) -> int:
    """Patch tokens per image: (image_size / patch)^2, or max_num_patches for NaFlex."""
    if model.family == "naflex" or model.image_size is None:
        return int(max_num_patches)
    return max(1, (model.image_size // model.patch_size) ** 2)


__all__ = ["ModelInfo", "REGISTRY", "TowerShape", "VISION_SHAPES", "TEXT_SHAPES", "SIZE_ORDER", "VISION_PARAMS_M",
           "MIN_VRAM_GB_FP16", "vision_tower_params", "vision_shape", "text_shape", "vision_params",
           "vision_tokens"]
