"""The one exception type for user mistakes, and the one path by which OS and parse errors become one.

The CLI prints a :class:`UserError`'s message on one line and exits 2. Parse errors while reading a file
(not UTF-8, not JSON or YAML, a truncated safetensors file) become a UserError naming the file and the
fix inside :func:`reading`; an ``OSError`` anywhere (permissions, a name too long, a file where a
directory belongs) becomes one in :func:`from_os_error`, at the command line's edge.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from safetensors import SafetensorError


class UserError(Exception):
    """Bad input the user can fix (config, data, paths). Never a bug in fedsubspace."""


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and on which line."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"line {mark.line + 1}: {problem}" if mark is not None else problem


@contextmanager
def reading(path: Path, fix: str) -> Iterator[None]:
    """Parse errors while reading ``path`` become a UserError naming it and ``fix``."""
    try:
        yield
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; {fix}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML ({yaml_problem(exc)}); {fix}") from None
    except (ValueError, SafetensorError) as exc:  # json's errors are ValueErrors
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path} is unreadable or truncated ({detail}); {fix}") from None


def as_user_error(exc: UserError | OSError) -> UserError:
    """The one line a user mistake or an operating-system refusal ends in."""
    return from_os_error(exc) if isinstance(exc, OSError) else exc


def from_os_error(exc: OSError) -> UserError:
    """An operating-system error as one line naming the file and what to do."""
    if exc.filename is None:
        return UserError(str(exc))
    name = exc.filename
    if isinstance(exc, PermissionError):
        return UserError(f"{name}: permission denied; change its permissions or choose another path")
    if exc.errno == errno.ENAMETOOLONG:
        return UserError(f"{name}: a path component is over 255 characters; choose a shorter path")
    if isinstance(exc, FileExistsError | NotADirectoryError):
        return UserError(f"{name} is a file where a directory is needed; choose another path")
    if isinstance(exc, IsADirectoryError):
        return UserError(f"{name} is a directory where a file is needed; name a file")
    if exc.errno == errno.ENOSPC:
        return UserError(f"{name}: no space left on the device; free some and run again")
    return UserError(f"{name}: {exc.strerror or exc}")
