"""Privacy mechanisms: DP-SGD on clients, client-level DP on the server, SecAgg+ on Flower.

Opacus calls ``logging.basicConfig`` when imported (opacus.utils.module_utils), which gives the root
logger a handler: every Flower log line would then print twice. It is imported here first, and the root
logger is put back as it was.
"""

import logging

_root = logging.getLogger()
_handlers, _level = list(_root.handlers), _root.level
import opacus.utils.module_utils  # noqa: E402, F401  (see the docstring)

_root.handlers[:] = _handlers
_root.setLevel(_level)
