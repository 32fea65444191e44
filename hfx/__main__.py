"""``python -m hfx ...``: the ``hfx`` command, for launchers that start a module (``torchrun -m``,
``python -m torch.distributed.run``, ``accelerate launch -m``)."""

import sys

from hfx.cli import main

if __name__ == "__main__":
    sys.exit(main())
