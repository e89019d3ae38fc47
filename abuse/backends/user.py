"""``python:MODULE:CLASS`` — a user's own Backend subclass.

MODULE is a dotted module name on ``sys.path`` or the path of a ``.py``
file; CLASS (which may be dotted, ``Outer.Inner``) is constructed as
``CLASS(size)``.  Errors in naming the class raise ValueError; errors
inside the user's own module propagate unchanged, with their traceback.
"""

from __future__ import annotations

import errno
import importlib
import importlib.util
import os
import sys
from types import ModuleType

from abuse.backends.base import Backend

__all__ = ["load_backend_class", "open_user_backend"]


def _module_from_file(path: str, spec: str) -> ModuleType:
    if not os.path.isfile(path):
        raise FileNotFoundError(errno.ENOENT, f"backend {spec!r}: no such file {path}")
    name = "abuse_user_backend_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"backend {spec!r}: cannot load {path} as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # classes defined there must find their module (pickle, dataclasses)
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _module_by_name(name: str, spec: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        # Only the named module (or a parent package) missing is a bad spec;
        # an import failing inside it is the user's bug and keeps its traceback.
        if err.name is None or not (name == err.name or name.startswith(err.name + ".")):
            raise
        raise ValueError(f"backend {spec!r}: no module named {err.name!r}") from None


def load_backend_class(target: str, class_name: str, spec: str) -> type[Backend]:
    """The Backend subclass ``class_name`` of module or file ``target``.

    ``spec`` names the whole spec in messages.  Raises ValueError if the
    module, file or class does not exist or is not a Backend subclass,
    FileNotFoundError for a missing ``.py`` file.
    """
    if target.endswith(".py") or os.sep in target:
        module = _module_from_file(os.path.expanduser(target), spec)
    else:
        module = _module_by_name(target, spec)
    found: object = module
    for part in class_name.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise ValueError(f"backend {spec!r}: {target} has no {class_name!r}") from None
    if not (isinstance(found, type) and issubclass(found, Backend)):
        raise ValueError(f"backend {spec!r}: {class_name} is not a subclass of abuse.Backend")
    return found


def open_user_backend(target: str, class_name: str, size: int, spec: str) -> Backend:
    """``CLASS(size)`` for the class found by :func:`load_backend_class`."""
    return load_backend_class(target, class_name, spec)(size)  # type: ignore[call-arg]
