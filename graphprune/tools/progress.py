"""Progress display for long work: a rich spinner or bar on a terminal, nothing when the output is
not a terminal (logs, pipes, CI) or after `--quiet`."""

from __future__ import annotations

from rich.console import Console

#: switched off by the CLI's --quiet
ENABLED = True


class _Silent:
    """Stands in for a rich Status when progress is off."""

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *_) -> None:
        return None

    def update(self, *_, **__) -> None:
        return None


def enabled(console: Console) -> bool:
    return ENABLED and console.is_terminal


def status(console: Console, text: str):
    """`console.status(text)` when progress shows, else a silent stand-in with the same `update`."""
    return console.status(text) if enabled(console) else _Silent()
