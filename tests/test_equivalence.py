"""Our confidences equal transformers' own full forward (fp32, <= 1e-5) on every SigLIP family."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import LABELS, make_settings, reference_scores

from visual_buffet_siglip.engine import SiglipTagger
from visual_buffet_siglip.vocabulary import normalize_labels


def scores_from_tags(records, labels) -> np.ndarray:
    index = {label: i for i, label in enumerate(labels)}
    out = np.full((len(records), len(labels)), np.nan)
    for row, record in enumerate(records):
        for tag in record["tags"]:
            out[row, index[tag["label"]]] = tag["confidence"]
    return out


def tags_only(records):
    return [record["tags"] for record in records]


def test_tag_matches_reference(checkpoint, images):
    tagger = SiglipTagger(make_settings(checkpoint))
    records = tagger.tag(images)
    labels = list(normalize_labels(LABELS))
    ours = scores_from_tags(records, labels)
    reference = reference_scores(checkpoint, images, labels)
    assert not np.isnan(ours).any(), "threshold 0 must keep every label"
    diff = np.abs(ours - reference).max()
    print(f"max abs difference vs transformers: {diff:.2e}")
    assert diff <= 1e-5
    # the scores are not degenerate: labels and images are told apart
    assert reference.std() > 1e-3


def test_embedding_api_matches_tag_path_and_reference(checkpoint, images):
    tagger = SiglipTagger(make_settings(checkpoint))
    labels = list(normalize_labels(LABELS))
    scores = tagger.score(tagger.embed_images(images), tagger.embed_texts(labels))
    assert scores.dtype == np.float32 and scores.shape == (len(images), len(labels))
    assert np.abs(scores - reference_scores(checkpoint, images, labels)).max() <= 1e-5
    assert np.abs(scores - scores_from_tags(tagger.tag(images), labels)).max() <= 1e-6


@pytest.mark.parametrize("batch_size", [1, 3])
def test_batch_size_does_not_change_results(checkpoint, images, batch_size):
    base = scores_from_tags(SiglipTagger(make_settings(checkpoint, batch_size=4)).tag(images), LABELS_N)
    other = scores_from_tags(SiglipTagger(make_settings(checkpoint, batch_size=batch_size)).tag(images),
                             LABELS_N)
    assert np.abs(base - other).max() <= 1e-6


def test_deterministic(checkpoint, images):
    tagger = SiglipTagger(make_settings(checkpoint))
    assert tags_only(tagger.tag(images)) == tags_only(tagger.tag(images))


def test_mixed_case_labels_are_lowercased_before_tokenizing(checkpoints, images):
    # the Gemma tokenizer of fixed-resolution SigLIP 2 does not lowercase by itself
    tagger = SiglipTagger(make_settings(checkpoints["siglip2"], labels=["BEACH"]))
    lower = SiglipTagger(make_settings(checkpoints["siglip2"], labels=["beach"]))
    assert tags_only(tagger.tag(images)) == tags_only(lower.tag(images))
    assert tagger.tag(images)[0]["tags"][0]["label"] == "beach"


def test_naflex_max_num_patches_reaches_the_processor(checkpoints, images):
    labels = LABELS_N
    tagger = SiglipTagger(make_settings(checkpoints["naflex"], max_num_patches=64))
    ours = scores_from_tags(tagger.tag(images), labels)
    reference = reference_scores(checkpoints["naflex"], images, labels, max_num_patches=64)
    assert np.abs(ours - reference).max() <= 1e-5
    default = reference_scores(checkpoints["naflex"], images, labels)
    assert np.abs(default - reference).max() > 1e-4  # the setting really changes the input


LABELS_N = list(normalize_labels(LABELS))
