"""Pre-training data: the embedded corpus and tasks, documents, NSP pairs, MLM masking, causal-LM packing.

- ``hfx.data.embedded``: seeded corpus and evaluation tasks the project generates itself
  (``embedded_corpus``, ``write_embedded_data``, ``load_embedded``; files and fields are listed there).
- ``hfx.data.documents``: ``load_documents`` (text files, json/csv/parquet, ``"embedded"``, datasets
  names), ``build_nsp_pairs``, ``tokenize_for_mlm``, ``pack_for_causal_lm``.
- ``hfx.data.masking``: ``mask_tokens`` (15% selected; 80% mask, 10% random ordinary token, 10% kept)
  and ``DataCollatorForPreTraining``.
"""

from .documents import IS_NEXT, NOT_NEXT, build_nsp_pairs, load_documents, pack_for_causal_lm, split_sentences, tokenize_for_mlm
from .embedded import embedded_corpus, load_embedded, write_embedded_data
from .masking import DataCollatorForPreTraining, mask_tokens, require_mask_token

__all__ = [
    "DataCollatorForPreTraining",
    "IS_NEXT",
    "NOT_NEXT",
    "build_nsp_pairs",
    "embedded_corpus",
    "load_documents",
    "load_embedded",
    "mask_tokens",
    "pack_for_causal_lm",
    "require_mask_token",
    "split_sentences",
    "tokenize_for_mlm",
    "write_embedded_data",
]
