"""Sub-commands of the ``hfx`` CLI, one module each (see ``hfx/cli.py``)."""
