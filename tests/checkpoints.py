"""Random-weight SigLIP checkpoints of the real architectures, built and saved locally.

No model hub is reachable in tests, so each family is rebuilt from its config
class with a tokenizer trained on the fly, saved with `save_pretrained`, and
loaded back through the same code path users take. `shape="tiny"` keeps tests
fast; "small" has widths 4-bit CPU kernels accept (multiples of 64); "base" and "so400m"
reproduce the real vision/text sizes for benchmarks.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

FAMILIES = ("siglip", "siglip2", "naflex")

_WORDS = ("this is a photo of the dog cat golden retriever beach mountain car red blue green sky tree "
          "house person city street night sunset food pizza flower bird boat snow river bridge "
          "portrait macro black and white long exposure aerial view wedding concert kitchen").split()

# name -> (hidden, intermediate, layers, heads) for vision and text towers
SHAPES = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    "small": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
    "base": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    "so400m": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16),
}
IMAGE = {"tiny": (32, 8), "small": (64, 16), "base": (224, 16), "so400m": (384, 14)}


def _corpus() -> list[str]:
    n = len(_WORDS)
    return [" ".join(_WORDS[i:] + _WORDS[:i]) + "." for i in range(n)] * 8


def _sentencepiece_tokenizer(folder: Path, sentences: list[str] | None = None):
    """SiglipTokenizer from a unigram model trained on `sentences` (default: the test corpus)."""
    import sentencepiece as spm
    from transformers import SiglipTokenizer

    # trained into memory: given a model_prefix, sentencepiece records that (temporary) path in the
    # model file, so the same sentences would give a different spiece.model in every folder
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences or _corpus()), model_writer=model, vocab_size=120, model_type="unigram",
        hard_vocab_limit=False, bos_id=-1, eos_id=1, unk_id=2, pad_id=-1, minloglevel=2)
    path = folder / "spm.model"
    path.write_bytes(model.getvalue())
    return SiglipTokenizer(vocab_file=str(path))


def _bpe_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="\u2581", behavior="merged_with_previous")
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=200, special_tokens=specials))
    state = tok.model.__getstate__()
    import json

    model = json.loads(state)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def _gemma_tokenizer():
    """Gemma-style BPE as the fixed-resolution SigLIP 2 checkpoints ship (it does not lowercase)."""
    from transformers import GemmaTokenizer

    vocab, merges = _bpe_vocab()
    return GemmaTokenizer(vocab=vocab, merges=merges, padding_side="right", add_bos_token=False,
                          add_eos_token=True)


def _siglip2_tokenizer():
    """NaFlex checkpoints load Siglip2Tokenizer: Gemma BPE plus lowercasing."""
    from transformers import Siglip2Tokenizer

    vocab, merges = _bpe_vocab()
    return Siglip2Tokenizer(vocab=vocab, merges=merges, padding_side="right")


def build_checkpoint(family: str, folder: Path, shape: str = "tiny", seed: int = 0) -> Path:
    """Save a random `family` checkpoint (siglip, siglip2 or naflex) of `shape` into `folder`."""
    from transformers import (Siglip2Config, Siglip2Model, Siglip2Processor, SiglipConfig, SiglipModel,
                              SiglipProcessor)
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dims = SHAPES[shape]
    image_size, patch = IMAGE[shape]
    if family == "naflex":
        patch = 16  # Siglip2Processor passes patch_size=16 to its image processor whatever the config says
    torch.manual_seed(seed)
    if family == "siglip":
        tokenizer = _sentencepiece_tokenizer(folder)
    elif family == "siglip2":
        tokenizer = _gemma_tokenizer()
    else:
        tokenizer = _siglip2_tokenizer()
    special = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                   bos_token_id=tokenizer.bos_token_id)
    text = dict(dims, vocab_size=len(tokenizer), max_position_embeddings=64, **special)
    if family == "naflex":
        vision = dict(dims, patch_size=patch, num_patches=256)
        model = Siglip2Model(Siglip2Config(text_config=text, vision_config=vision))
        processor = Siglip2Processor(image_processor=Siglip2ImageProcessorPil(patch_size=patch, max_num_patches=256),
                                     tokenizer=tokenizer)
    else:
        vision = dict(dims, image_size=image_size, patch_size=patch)
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        processor = SiglipProcessor(image_processor=SiglipImageProcessorPil(
            size={"height": image_size, "width": image_size}), tokenizer=tokenizer)
    with torch.no_grad():  # a realistic temperature and bias, as trained checkpoints have
        model.logit_scale.fill_(torch.log(torch.tensor(10.0 if shape in ("tiny", "small") else 110.0)))
        model.logit_bias.fill_(-2.0 if shape in ("tiny", "small") else -12.0)
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    for leftover in folder.glob("spm.*"):
        leftover.unlink()
    return folder
