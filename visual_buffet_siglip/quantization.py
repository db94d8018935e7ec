"""bitsandbytes settings for `quantization = "8bit" | "4bit"`.

Only `nn.Linear` layers are quantized. The vision tower's attention-pooling
head is kept in the plan's dtype: it calls `nn.MultiheadAttention`, which reads
`out_proj.weight` directly instead of calling the layer, so a 4-bit packed
weight there breaks the forward (and 8-bit would cost accuracy on the one
layer that produces the image embedding). NaFlex's patch embedding is an
`nn.Linear` whose weight dtype Siglip2 casts the pixels to: quantized, 8-bit
crashes and 4-bit silently feeds uint8 pixels, so it is kept whole too.
Everything else quantizes cleanly: `logit_scale` / `logit_bias` are
parameters, SigLIP v1's patch embedding is a Conv2d and the token embedding an
Embedding, none of which bitsandbytes touches.
"""

from __future__ import annotations

import logging
from typing import Any

from .plan import HALF, Plan

# Matched by transformers from the start of a module name up to a module
# boundary, so this covers vision_model.head.{attention.out_proj,mlp.fc1,mlp.fc2}
# in both SiglipModel and Siglip2Model (and not text_model.head, a plain Linear).
SKIP_MODULES: tuple[str, ...] = ("vision_model.head", "vision_model.embeddings.patch_embedding")


class _DropCastNotice(logging.Filter):
    """bitsandbytes logs "inputs will be cast ... to float16" on every 8-bit matmul of a float32 model."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "will be cast from" not in record.getMessage()


def quantization_config(plan: Plan) -> Any:
    """The `transformers.BitsAndBytesConfig` for `plan.quantization` (8bit or 4bit nf4)."""
    import torch
    from transformers import BitsAndBytesConfig

    notice = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropCastNotice) for f in notice.filters):
        notice.addFilter(_DropCastNotice())

    skip = list(SKIP_MODULES)
    if plan.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if plan.quantization == "4bit":
        compute = plan.dtype if plan.dtype in HALF else "float32"
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=getattr(torch, compute),
            llm_int8_skip_modules=skip)
    raise ValueError(f"quantization = {plan.quantization!r}: no bitsandbytes config for it "
                     "(expected '8bit' or '4bit')")


__all__ = ["quantization_config", "SKIP_MODULES"]
