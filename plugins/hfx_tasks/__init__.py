"""First-party evaluation tasks (entry-point group ``hfx.tasks``).

- ``embedded``: tasks on the corpus hfx generates itself (``hfx.data.embedded``), offline.
- ``hub``: lm-eval-format task files for well-known datasets (ARC, HellaSwag, PIQA, BoolQ,
  SST-2, COPA), usable when the Hugging Face hub is reachable.
"""
