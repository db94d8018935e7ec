"""How much accelerator memory tagging takes: a peak-memory prediction from `modelfacts`.

Tagging keeps only the vision tower on the accelerator. The text tower lives in
RAM and visits the accelerator only to encode labels missing from the label
cache (`residency`), before any image runs; scoring runs on the CPU in float64,
so the label matrix never occupies accelerator memory. The peak that
`torch.cuda.max_memory_allocated` reports is therefore the larger of

  tagging:  vision weights + a batch of per-image activations + workspace
  encoding: vision weights + text weights + one text batch's activations + workspace

and the card must also hold the CUDA context, which lives outside torch's
allocator. Quantized models (bitsandbytes places them at load and cannot move
them) keep both towers resident.

Activations follow what a no-grad forward keeps alive at its worst moment,
counted from the transformers SigLIP encoder layer (`_layer_peak`) plus the
pixel batch and NaFlex's padding mask; tests/test_memory.py checks it against
the tensors a real forward keeps alive on the CPU, and benchmarks/gpu_check.py
against `torch.cuda.max_memory_allocated` on a GPU. Pure: no torch import, so
the planner and `plan --simulate` stay cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .modelfacts import CHANNELS, text_shape, vision_params, vision_shape, vision_tokens

if TYPE_CHECKING:
    from .modelfacts import ModelInfo, TowerShape

GIB = float(2**30)
MIB = 2**20

# Bytes per parameter. 8bit/4bit are averages: embeddings, norms and the kept-whole layers stay in half.
WEIGHT_BYTES = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "8bit": 1.1, "4bit": 0.6}
ACTIVATION_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
CUDA_CONTEXT_BYTES = 512 * MIB  # CUDA context + kernel images: outside torch's allocator
WORKSPACE_BYTES = 64 * MIB  # cuBLAS/cuBLASLt workspaces and attention scratch, inside the allocator
TEXT_BATCH = 64  # labels per text-tower call (engine.TEXT_BATCH)
TEXT_TOKENS = 64  # every prompt is padded to max_length=64 (config.MAX_LENGTH)
# The planner fills about 80% of free accelerator memory: the rest covers fragmentation,
# other tenants and this model's own error (benchmarks/gpu_check.py measures it).
HEADROOM = 0.20


def vision_weight_bytes(model: ModelInfo, precision: str) -> int:
    return int(vision_params(model) * WEIGHT_BYTES[precision])


def text_weight_bytes(model: ModelInfo, precision: str) -> int:
    """The text tower (with logit scale and bias): the whole model minus its vision tower."""
    return int(max(0.0, model.params_m * 1e6 - vision_params(model)) * WEIGHT_BYTES[precision])


def _attention_scores(heads: int, rows: int, cols: int, act: int) -> int:
    """Eager attention's peak: the scores, their float32 softmax and its cast back (a no-op in float32)."""
    return heads * rows * cols * (act + 4 + (act if act != 4 else 0))


def _layer_peak(shape: TowerShape, tokens: int, act: int, attention: str) -> int:
    """One encoder layer's worst moment, per sequence.

    Attention: layer input, layer-norm output, q, k, v, the attention output and
    its contiguous copy (7 widths), plus q/k/v copies where a fused kernel wants
    them contiguous (PyTorch's CPU kernel does): 10 widths; eager adds its score
    matrices. MLP: the layer input (the encoder loop still holds it), the
    residual, the layer-norm output, fc1's output and its GELU.
    """
    if attention == "eager":
        attn = 7 * tokens * shape.width * act + _attention_scores(shape.heads, tokens, tokens, act)
    else:
        attn = 10 * tokens * shape.width * act
    mlp = tokens * (3 * shape.width + 2 * shape.mlp) * act
    return max(attn, mlp)


def per_image_bytes(model: ModelInfo, tokens: int, dtype: str, attention: str = "sdpa") -> int:
    """Accelerator memory one more image in a batch adds at the forward's peak."""
    act = ACTIVATION_BYTES[dtype]
    pixels = tokens * CHANNELS * model.patch_size ** 2 * (4 + act)  # float32 pixels + the model's copy
    mask = 0
    if model.family == "naflex":  # the padding mask over every token pair: boolean, float for eager
        mask = tokens * tokens * (act if attention == "eager" else 1)
    return pixels + mask + _layer_peak(vision_shape(model), tokens, act, attention)


def text_batch_bytes(model: ModelInfo, dtype: str, attention: str = "sdpa") -> int:
    """Activations of one text-tower call (TEXT_BATCH prompts of TEXT_TOKENS)."""
    return TEXT_BATCH * _layer_peak(text_shape(model), TEXT_TOKENS, ACTIVATION_BYTES[dtype], attention)


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted accelerator memory, in bytes, part by part (see the module docstring)."""

    vision_weights: int
    resident_text_weights: int  # text tower kept beside the vision tower while tagging (quantized models)
    label_matrix: int  # on the accelerator: 0, scoring runs on the CPU in float64
    per_image: int
    batch: int
    workspace: int
    text_encode: int  # text weights + activations while encoding missing labels here; 0 if encoded elsewhere
    context: int  # CUDA context: counted against free memory, not by torch's allocator

    @property
    def activations(self) -> int:
        return self.per_image * self.batch

    @property
    def resident(self) -> int:
        """What stays allocated between batches."""
        return self.vision_weights + self.resident_text_weights + self.label_matrix + self.workspace

    @property
    def tagging(self) -> int:
        return self.resident + self.activations

    @property
    def encoding(self) -> int:
        return self.resident + self.text_encode

    @property
    def peak_allocated(self) -> int:
        """What `torch.cuda.max_memory_allocated` should report over a run."""
        return max(self.tagging, self.encoding)

    @property
    def peak_total(self) -> int:
        """What the card must have free: the allocator's peak plus the CUDA context."""
        return self.peak_allocated + self.context

    def parts_gb(self) -> dict[str, float]:
        """The parts in GiB, for reports."""
        return {"vision_weights": self.vision_weights / GIB, "resident_text_weights": self.resident_text_weights / GIB,
                "label_matrix": self.label_matrix / GIB, "activations": self.activations / GIB,
                "workspace": self.workspace / GIB, "text_encode": self.text_encode / GIB,
                "context": self.context / GIB, "peak_allocated": self.peak_allocated / GIB,
                "peak_total": self.peak_total / GIB}


def predict(model: ModelInfo, dtype: str, quantization: str, batch: int, attention: str, tokens: int,
            text_here: bool, accelerator: bool = True) -> MemoryEstimate:
    """Peak accelerator memory for tagging `batch` images of `tokens` patches each.

    text_here: whether missing labels are encoded on this accelerator (else on
    the CPU). Quantized towers stay where bitsandbytes put them, so both count
    as resident. accelerator=False (CPU): no CUDA context or workspace.
    """
    precision = quantization if quantization != "none" else dtype
    text_weights = text_weight_bytes(model, precision)
    resident_text = text_weights if quantization != "none" else 0
    encode = text_batch_bytes(model, dtype, attention) if (text_here or resident_text) else 0
    if text_here and not resident_text:
        encode += text_weights
    return MemoryEstimate(
        vision_weights=vision_weight_bytes(model, precision), resident_text_weights=resident_text,
        label_matrix=0, per_image=per_image_bytes(model, tokens, dtype, attention), batch=max(0, batch),
        workspace=WORKSPACE_BYTES if accelerator else 0, text_encode=encode,
        context=CUDA_CONTEXT_BYTES if accelerator else 0)


def weights_gb(model: ModelInfo, precision: str) -> float:
    """Weight memory of both towers at a dtype or quantization ("float16", "4bit", ...)."""
    return model.params_m * 1e6 * WEIGHT_BYTES[precision] / GIB


def per_image_gb(model: ModelInfo, tokens: int, dtype: str, attention: str = "sdpa") -> float:
    """Working set one more image in a batch adds (`per_image_bytes`)."""
    return per_image_bytes(model, tokens, dtype, attention) / GIB


def split_precision(precision: str) -> tuple[str, str]:
    """(activation dtype, quantization) for a precision; quantized layers compute in half."""
    return (precision, "none") if precision in ("float32", "float16", "bfloat16") else ("float16", precision)


def min_memory_gb(model: ModelInfo, precision: str, attention: str = "sdpa", max_num_patches: int = 256) -> float:
    """Free accelerator memory `model` needs to tag one image at a time at a dtype or quantization.

    Counts the vision tower only (the text tower can encode labels on the CPU),
    the CUDA context and the planner's margin; quantized models keep both towers.
    """
    dtype, quant = split_precision(precision)
    estimate = predict(model, dtype, quant, 1, attention, vision_tokens(model, max_num_patches), text_here=False)
    return estimate.peak_total / GIB / (1 - HEADROOM)


def fits(model: ModelInfo, precision: str, free_gb: float, max_num_patches: int) -> bool:
    """Whether `model` can tag one image at a time in `free_gb` of accelerator memory."""
    return min_memory_gb(model, precision, max_num_patches=max_num_patches) <= free_gb


__all__ = ["MemoryEstimate", "predict", "per_image_bytes", "weights_gb", "per_image_gb", "min_memory_gb", "fits",
           "split_precision", "WEIGHT_BYTES", "GIB", "HEADROOM"]
