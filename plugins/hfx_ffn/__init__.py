"""First-party feed-forward components. Each module ends with ``COMPONENT`` (group ``hfx.ffn``)."""
