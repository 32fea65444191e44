"""First-party position encodings: sinusoidal, learned and rotary.

Each module ends with ``COMPONENT``, the object its entry point (group ``hfx.position``) resolves to.
A position module maps ``(inputs_embeds, position_ids)`` to ``(inputs_embeds, rotary)``: absolute
encodings are added to the embeddings, rotary ones return ``(cos, sin)`` for the attention layer.
"""
