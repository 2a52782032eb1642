"""The method registry: `register_method`, `get_method`, `available_methods`.

Registration runs one way: each method file imports this module and registers itself; the package's __init__
imports this module and then the method files. Nothing here imports a method.
"""

from __future__ import annotations

from adalora_cli.errors import UserError
from adalora_cli.methods.base import Method

_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in _METHODS or method.name != method.name.lower():
        raise ValueError(f"bad or duplicate method name {method.name!r}")
    if method.needs_allocator and method.make_allocator is None:
        raise ValueError(f"method {method.name!r} needs an allocator but provides none")
    if method.adapter and (method.plan is None or method.make_layer is None or method.initial_scaling is None):
        raise ValueError(f"adapter method {method.name!r} must provide plan, make_layer and initial_scaling")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        raise UserError(f"unknown method {name!r}; choose one of: {', '.join(available_methods())}") from None


def available_methods() -> list[str]:
    return sorted(_METHODS)
