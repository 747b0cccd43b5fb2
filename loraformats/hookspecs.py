"""Hook specifications. Every hook is a registration hook: it receives a `register` callback.

A plugin is any module or object with functions named like these hooks and decorated with
`loraformats.hookimpl`. Built-in plugins use exactly these hooks, through the entry-point
group `loraformats`, as a third party would.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("loraformats")
hookimpl = pluggy.HookimplMarker("loraformats")


@hookspec
def register_formats(register: Callable[[object], None]) -> None:
    """Called once, the first time formats are needed. Call `register(format)` for each
    `loraformats.Format` subclass instance the plugin provides. Names must be unique."""


@hookspec
def register_families(register: Callable[[object], None]) -> None:
    """Called once, the first time families are needed. Call `register(family)` for each
    `loraformats.Family` the plugin provides (its tables may load lazily). Names must be unique."""


@hookspec
def register_transforms(register: Callable[[object], None]) -> None:
    """Called once, the first time a conversion is planned. Call `register(transform)` for each
    `loraformats.Transform` (a canonical-to-canonical graph edge) the plugin provides."""
