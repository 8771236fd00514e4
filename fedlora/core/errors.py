"""Exceptions with messages that name the field, the bad value and the fix."""

from __future__ import annotations


class ConfigError(ValueError):
    """One or more configuration problems, all reported at once.

    ``subject`` names what was checked (the run's configuration, one SuperNode's node config).
    """

    def __init__(self, problems: list[str], subject: str = "the configuration") -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in {subject}:\n{lines}")
