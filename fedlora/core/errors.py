"""Exceptions with messages that name the field, the bad value and the fix."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """One or more configuration problems, all reported at once.

    ``subject`` names what was checked (the run's configuration, one SuperNode's node config).
    """

    def __init__(self, problems: list[str], subject: str = "the configuration") -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in {subject}:\n{lines}")


class RunError(RuntimeError):
    """A run cannot go on, for a reason its message gives in full (the command prints it, no traceback)."""


class Problems:
    """Collects configuration problems, each as ``field=value: fix``, to raise one :class:`ConfigError`."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, field: str, value: Any, fix: str) -> None:
        """Record that ``field`` has the bad ``value`` and how to fix it."""
        self.items.append(f"{field}={value!r}: {fix}")

    def note(self, text: str) -> None:
        """Record a problem whose text already names the field, the value and the fix."""
        self.items.append(text)

    def raise_if_any(self, subject: str = "the configuration") -> None:
        """Raise :class:`ConfigError` listing every problem, if there is one."""
        if self.items:
            raise ConfigError(self.items, subject)
