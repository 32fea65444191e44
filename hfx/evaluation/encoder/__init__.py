"""Zero-shot and n-way k-shot evaluation of encoders (hfx MLM models, BERT, RoBERTa, ...).

Python API::

    from hfx.evaluation.encoder import n_way_k_shot, zero_shot
    result = n_way_k_shot(model, tokenizer, test_split, support_data=train_split, n_way=5, k_shot=5)
    result.metrics  # {"acc": ..., "acc_stderr": ..., "acc_ci95": ...}
    zero_shot(mlm, tokenizer, test_split, method="cloze", template="{text} It is about {mask}.",
              verbalizers={"sports": "sport", "politics": "politics"})

The building blocks (:func:`sample_episodes`, :func:`embed_texts`, :func:`classify`,
:func:`description_scores`, :func:`cloze_scores`, :func:`nli_scores`) work on plain lists of texts.
``import hfx.evaluation.encoder.pipelines`` registers ``pipeline("hfx-zero-shot-classification")``.
See ``docs/evaluation.md`` (section "Encoders").
"""

from .embedding import POOLINGS, embed_texts, pool
from .episodes import Episode, sample_episodes
from .evaluators import EncoderResult, n_way_k_shot, zero_shot
from .prototypes import DISTANCES, classify, mean_and_ci95, prototypes, similarity
from .zeroshot import METHODS, cloze_scores, description_scores, nli_scores, verbalizer_ids

__all__ = [
    "DISTANCES",
    "METHODS",
    "POOLINGS",
    "EncoderResult",
    "Episode",
    "classify",
    "cloze_scores",
    "description_scores",
    "embed_texts",
    "mean_and_ci95",
    "n_way_k_shot",
    "nli_scores",
    "pool",
    "prototypes",
    "sample_episodes",
    "similarity",
    "verbalizer_ids",
    "zero_shot",
]
