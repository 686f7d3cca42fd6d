"""Method hyperparameters: how a method declares the config keys it reads.

Each method that has hyperparameters declares them in its own file as a frozen dataclass, one field per
config key (the field's name is the key), each field an :class:`Option`: its default, what it means and
which values it accepts. An option several methods read is declared once, here, and their dataclasses
reference it. The registry (:func:`fedsubspace.methods.declared_options`) lists every key; the config
edge (:mod:`fedsubspace.configure`) reads, defaults and checks the values, and a method object receives
only its own dataclass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from fedsubspace.errors import UserError

OptionsT = TypeVar("OptionsT")


@dataclass(frozen=True)
class Check:
    """What values an option accepts: ``accepts(value)``, and ``expects`` says so in the error."""

    accepts: Callable[[Any], bool]
    expects: str  # completes "<key> ...": "must be in [0, 1]"


@dataclass(frozen=True)
class Option:
    """One hyperparameter as a method declares it."""

    default: Any
    doc: str
    check: Check | None = None

    def field(self) -> Any:
        """The dataclass field declaring this option (a fresh one: a field belongs to one dataclass)."""
        return dataclasses.field(default=self.default, metadata={"option": self})

    def validate(self, key: str, value: Any) -> None:
        """Refuse a value the option does not accept, in one line naming the config key."""
        if self.check is not None and not self.check.accepts(value):
            raise UserError(f"{key} {self.check.expects}")


def one_of(*choices: str) -> Check:
    listed = " or ".join(choices) if len(choices) <= 2 else f"{', '.join(choices[:-1])} or {choices[-1]}"
    return Check(lambda value: value in choices, f"must be {listed}")


NOT_NEGATIVE = Check(lambda value: value >= 0, "must not be negative")

# Options several methods read.
MAX_UPDATE_NORM = Option(
    None,
    "clip the Frobenius norm of each module's aggregated update to this before it is split into factors "
    "(null: no clip)",
    Check(lambda value: value is None or value > 0, "must be positive (or null to disable)"),
)
PRESERVE_NORM = Option(
    True,
    "rescale the rank-r truncation of the aggregated update to the update's own Frobenius norm (as the "
    "reference implementation does)",
)


@dataclass(frozen=True)
class NoOptions:
    """The options of a method that has no hyperparameters."""


@dataclass(frozen=True)
class Declared:
    """An option as the registry lists it: the declaration, the type its value has and who reads it."""

    option: Option
    kind: Any  # the field's annotation (float, bool, float | None, ...): what the config reads a value as
    methods: tuple[str, ...]


def declarations(options: type) -> dict[str, Option]:
    """The options a method's dataclass declares, by config key."""
    return {f.name: f.metadata["option"] for f in dataclasses.fields(options)}


def read_options(options: type[OptionsT], values: Mapping[str, Any]) -> OptionsT:
    """``options`` with the values ``values`` (config keys) gives for its fields; the others at their
    defaults. Values are taken as they are: the config edge has coerced and checked them."""
    return options(**{key: values[key] for key in declarations(options) if key in values})
