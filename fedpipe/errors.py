"""One exception type for every user-facing problem, so the CLI can print it and exit 2."""

from __future__ import annotations


class FedpipeError(Exception):
    """A problem with the user's input or environment: shown without a traceback, exit code 2.

    `problems` holds one line per problem (field, server, value, what would be valid).
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []

    def __str__(self) -> str:
        head = super().__str__()
        return head if not self.problems else head + "\n" + "\n".join(f"  - {p}" for p in self.problems)
