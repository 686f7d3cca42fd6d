"""Markdown tables, for the report and the benchmarks."""

from collections.abc import Iterable, Sequence


def markdown_table(titles: Sequence[str], rows: Iterable[Sequence[str]], *, rule: str = "---") -> str:
    """A markdown table of already formatted cells; ``rule`` sets every column's alignment."""
    lines = ["| " + " | ".join(titles) + " |", "|" + "|".join(rule for _ in titles) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)
