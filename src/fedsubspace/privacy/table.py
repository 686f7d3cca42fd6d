"""The README's compatibility table, rendered from the methods' own declarations (``Method.privacy``)."""

from __future__ import annotations

from fedsubspace.markdown import markdown_table
from fedsubspace.methods import METHODS
from fedsubspace.methods.privacy import Support


def _cell(support: Support) -> str:
    return f"{'yes' if support.ok else 'no'}: {support.why}"


def compatibility_table() -> str:
    """Rows: the methods; columns: DP-SGD, client-level DP, SecAgg+; each cell yes/no and the reason."""
    rows = [
        [name, _cell(cls.privacy.dp_sgd), _cell(cls.privacy.client_dp), _cell(cls.privacy.secagg)]
        for name, cls in sorted(METHODS.items())
    ]
    return markdown_table(["method", "DP-SGD", "client-level DP", "SecAgg+"], rows)
