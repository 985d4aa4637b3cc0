"""Make a command's module callable as its function: `d2vcli.pretrain(cfg, ws)` is `d2vcli.pretrain.pretrain(cfg, ws)`.

Python binds a submodule to its package's attribute whenever the submodule is imported, so the
package attribute `d2vcli.pretrain` is, and stays, the module `d2vcli/pretrain.py`: it cannot be
the function instead. This gives the module object the function's call (and, through
`__wrapped__`, its signature for `inspect.signature` and IDEs); everything else about the module
is unchanged. Module `__class__` assignment is supported Python (3.5+), made for this kind of use.
"""

from __future__ import annotations

import sys
import types
from typing import Callable


class CallableModule(types.ModuleType):
    """A module that calls `self.__wrapped__` when called."""

    def __call__(self, *args, **kwargs):
        return self.__wrapped__(*args, **kwargs)


def make_callable(module_name: str, fn: Callable) -> None:
    """Calling module `module_name` (already in sys.modules: call this from the module itself) calls `fn`."""
    module = sys.modules[module_name]
    module.__class__ = CallableModule
    module.__wrapped__ = fn
