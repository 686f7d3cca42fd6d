"""Aggregation methods, one file each; :func:`get_method` finds them by name."""

from collections.abc import Mapping
from typing import Any

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
    Regularizer,
    declared_options,
    heterogeneous_methods,
)
from fedsubspace.methods.options import read_options

__all__ = [
    "METHODS",
    "ClientContext",
    "ClientStart",
    "LiveParameters",
    "LocalPlan",
    "LocalSchedule",
    "Method",
    "Regularizer",
    "declared_options",
    "get_method",
    "heterogeneous_methods",
]


def get_method(name: str, options: Mapping[str, Any] | None = None, seed: int = 0) -> Method:
    """The method ``name`` with its own options read from ``options`` (config keys: other methods' keys
    are left alone, missing ones take their defaults) and the run's ``seed``."""
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    values = options or {}
    unknown = sorted(set(values) - set(declared_options()))
    if unknown:
        raise ValueError(f"no method has an option {unknown[0]!r}")
    cls = METHODS[name]
    return cls(read_options(cls.Options, values), seed)
