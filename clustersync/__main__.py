"""``python -m clustersync``: see :mod:`clustersync.cli`."""

import sys

from .cli import main

if __name__ == "__main__":  # spawned workers import this module as __mp_main__: do nothing there
    sys.exit(main())
