"""``clustersync run --reload``: notice when the app's source changes, for a rolling restart.

For development. The supervisor polls a :class:`Watcher` every
:data:`POLL` seconds on the relay's loop and, when a ``.py`` file under the
watched directory was added, changed or removed, restarts the workers one at
a time (as SIGHUP does). It is the standard library alone: ``os.scandir`` and
the files' modification times, no inotify.

The directory watched is ``--app-dir`` if given, else the current directory,
recursively; hidden directories, ``__pycache__``, ``node_modules``,
``site-packages`` and virtual environments (a directory holding
``pyvenv.cfg``) are skipped, and at most :data:`MAX_FILES` files are watched.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Sequence, Tuple

__all__ = ["Watcher", "POLL", "MAX_FILES", "describe_changes"]

#: Seconds between two looks at the files.
POLL = 0.5
#: The most files watched; beyond, the rest are not (and a warning says so once).
MAX_FILES = 10_000
SKIP_DIRS = frozenset({"__pycache__", "node_modules", "site-packages"})

logger = logging.getLogger("clustersync")

_Stamp = Tuple[int, int, int]  # mtime in ns, size, inode: an editor that replaces the file changes the inode


class Watcher:
    """The ``.py`` files under ``root`` and their modification stamps; :meth:`changed` says what changed."""

    def __init__(self, root: str, suffixes: Sequence[str] = (".py",)) -> None:
        self.root = os.path.abspath(root)
        self.suffixes = tuple(suffixes)
        self._warned = False
        self._stamps = self._scan()

    def __len__(self) -> int:
        """How many files are watched."""
        return len(self._stamps)

    def changed(self) -> List[str]:
        """The files added, changed or removed since the last call (or since the watcher was made), sorted."""
        now = self._scan()
        before = self._stamps
        self._stamps = now
        out = [path for path, stamp in now.items() if before.get(path) != stamp]
        out.extend(path for path in before if path not in now)
        return sorted(out)

    def _scan(self) -> Dict[str, _Stamp]:
        stamps: Dict[str, _Stamp] = {}
        pending = [self.root]
        while pending:
            directory = pending.pop()
            try:
                entries = list(os.scandir(directory))
            except OSError:  # gone, or not readable
                continue
            if directory != self.root and any(e.name == "pyvenv.cfg" for e in entries):
                continue  # a virtual environment
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if not entry.name.startswith(".") and entry.name not in SKIP_DIRS:
                            pending.append(entry.path)
                    elif entry.name.endswith(self.suffixes):
                        if len(stamps) >= MAX_FILES:
                            if not self._warned:
                                self._warned = True
                                logger.warning(
                                    "--reload watches only the first %d files under %s; "
                                    "point --app-dir at your app's own directory",
                                    MAX_FILES,
                                    self.root,
                                )
                            return stamps
                        st = entry.stat()
                        stamps[entry.path] = (st.st_mtime_ns, st.st_size, st.st_ino)
                except OSError:  # removed meanwhile
                    continue
        return stamps


def describe_changes(root: str, paths: Sequence[str]) -> str:
    """``app.py changed`` or ``app.py and 2 more changed``, paths relative to ``root``."""
    first = os.path.relpath(paths[0], root) if paths else "?"
    more = f" and {len(paths) - 1} more" if len(paths) > 1 else ""
    return f"{first}{more} changed"
