"""``python -m iteravg ...`` is the ``iteravg`` command (the MXNet training CLI, ``iteravg.mx.cli``)."""

import sys

from iteravg.mx.cli import main

if __name__ == "__main__":
    sys.exit(main())
