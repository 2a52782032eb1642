"""The adaptation methods, one file each, and their registry (`registry.py`), re-exported here:
`register_method`, `get_method`, `available_methods`.

Each method file registers itself with `methods.registry` when imported; this package imports them all below.
"""

from __future__ import annotations

from adalora_cli.methods.registry import available_methods, get_method, register_method
from adalora_cli.methods import adalora, dylora, eva, full, lora, prilora  # noqa: F401  (each registers itself)

__all__ = ["available_methods", "get_method", "register_method"]
