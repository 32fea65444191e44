"""First-party long-context attention backends: hfx_sliding_window (Longformer), hfx_block_sparse
(BigBird) and hfx_lsh (Reformer).

Each module defines its ``AttentionInterface`` function and ends with ``COMPONENT``, the object its
entry point (group ``hfx.attention``) resolves to; ``import hfx`` registers every one with transformers'
``AttentionInterface`` and ``AttentionMaskInterface`` under its name. See ``docs/long-context.md``.
"""

from .common import attach_global_token_ids

__all__ = ["attach_global_token_ids"]
