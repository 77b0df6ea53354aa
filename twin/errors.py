"""Errors that reach users.

Bad input is never a traceback: every problem with what a user handed us is an `InputError`
that names the file (or object) and the field, so the CLI can print one line and exit 2.
"""

from __future__ import annotations


class TwinError(Exception):
    """Base of every error Twin raises on purpose."""


class InputError(TwinError, ValueError):
    """Input that breaks a rule: names where (`source`), what (`field`) and why.

    >>> str(InputError("bad visit times", source="sessions.tsv", field="age"))
    'sessions.tsv: age: bad visit times'
    """

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None):
        self.message = message
        self.source = None if source is None else str(source)
        self.field = field
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [p for p in (self.source, self.field) if p]
        return ": ".join([*parts, self.message])


class CohortError(InputError):
    """A cohort that violates the schema; `problems` lists every violated rule."""

    def __init__(self, problems: list[str], *, source: str | None = None):
        self.problems = list(problems)
        head = f"{len(problems)} problem(s) with the cohort"
        super().__init__(head + ":\n  - " + "\n  - ".join(self.problems), source=source)
