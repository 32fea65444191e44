"""Data for pre-training: the embedded corpus and tasks (``hfx.data.embedded``)."""

from .embedded import embedded_corpus, load_embedded, write_embedded_data

__all__ = ["embedded_corpus", "load_embedded", "write_embedded_data"]
