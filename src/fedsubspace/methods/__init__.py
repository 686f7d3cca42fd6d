"""Aggregation methods, one file each; :func:`get_method` finds them by name."""

from fedsubspace.errors import UserError
from fedsubspace.methods import (  # noqa: F401  (importing a method registers it)
    fedavg,
    fedex,
    fedgalore,
    fedrot,
    fedsa,
    fedsvd,
    ffa,
    flexlora,
    flora,
    glora,
    hetlora,
    rolora,
    subspace_reg,
    svd,
)
from fedsubspace.methods.base import (
    METHODS,
    ClientContext,
    ClientStart,
    LiveParameters,
    LocalPlan,
    LocalSchedule,
    Method,
    MethodOptions,
    Regularizer,
    heterogeneous_methods,
)

__all__ = [
    "METHODS",
    "ClientContext",
    "ClientStart",
    "LiveParameters",
    "LocalPlan",
    "LocalSchedule",
    "Method",
    "MethodOptions",
    "Regularizer",
    "get_method",
    "heterogeneous_methods",
]


def get_method(name: str, options: MethodOptions) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name](options)
