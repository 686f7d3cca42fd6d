"""Aggregation methods, one file each; :func:`get_method` finds them by name."""

from fedsubspace.errors import UserError
from fedsubspace.methods import fedavg, fedsvd, subspace_reg, svd  # noqa: F401  (registers them)
from fedsubspace.methods.base import METHODS, Method, MethodOptions, Regularizer

__all__ = ["METHODS", "Method", "MethodOptions", "Regularizer", "get_method"]


def get_method(name: str, options: MethodOptions) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name](options)
