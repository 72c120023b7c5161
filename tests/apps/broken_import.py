"""A module that raises while it is imported."""

raise RuntimeError("this module is broken on purpose")


def main() -> None:  # pragma: no cover - never reached
    pass
