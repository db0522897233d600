"""Justifications that mention expressions: kept as data so they print with the model's names."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Note:
    """``fmt`` with ``{0}``, ``{1}``… standing for the expressions ``args`` (printed as inline math)."""

    fmt: str
    args: tuple

    fixed: bool = False     # quotes a forward equation as declared: index renaming must not touch it

    def __init__(self, fmt: str, *args, fixed: bool = False):
        self.fmt, self.args, self.fixed = fmt, tuple(args), fixed

    def xreplace(self, mapping) -> "Note":
        if self.fixed:
            return self
        return Note(self.fmt, *[a.xreplace(mapping) if hasattr(a, "xreplace") else a for a in self.args])

    def render(self, math) -> str:
        """``math(expr)`` prints one expression as inline math in the target format."""
        return self.fmt.format(*[math(a) for a in self.args])
