"""``python -m clustersync``: see :mod:`clustersync.runner.cli`."""

import sys

from .runner.cli import main

if __name__ == "__main__":  # spawned workers import this module as __mp_main__: do nothing there
    sys.exit(main())
