"""Which provider kinds are installed: entry points of the group ``dpvoip.providers``.

A kind is a package anywhere on ``sys.path`` whose distribution declares, in its
``setup.py`` or ``pyproject.toml``::

    [project.entry-points."dpvoip.providers"]
    asterisk = "dpvoip_asterisk.provider:KIND"

and the object named there is a ``ProviderKind``. Entry points rather than Twisted's
plugin system: they need no cache file rebuilt after an install (``dropin.cache``, which
a non-root user cannot write), and a kind's module is imported only when a configuration
names that kind.

The built-in kinds (Zadarma, Asterisk) are found even when dpvoip runs from a source tree that
was never installed (no entry points there); an installed entry point of the same name
does not replace a built-in kind.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any

from dpvoip.providers.interface import ProviderKind

GROUP = "dpvoip.providers"

#: The kinds dpvoip ships: name -> "module:attribute", as their entry points say.
BUILT_IN = {"zadarma": "dpvoip.zadarma.provider:KIND",
            "asterisk": "dpvoip.asterisk.provider:KIND"}

KindLoader = Callable[[], ProviderKind[Any]]


def _import(target: str) -> Callable[[], ProviderKind[Any]]:
    module, _, attribute = target.partition(":")

    def load() -> ProviderKind[Any]:
        found: ProviderKind[Any] = getattr(importlib.import_module(module), attribute)
        return found

    return load


def installed() -> dict[str, KindLoader]:
    """Every kind's name and how to load it (nothing imported yet)."""
    kinds: dict[str, KindLoader] = {}
    for point in entry_points(group=GROUP):
        kinds.setdefault(point.name, point.load)
    kinds.update({name: _import(target) for name, target in BUILT_IN.items()})
    return kinds


def built_in(name: str) -> ProviderKind[Any]:
    """A kind dpvoip ships (the ``[zadarma]`` section's)."""
    return _import(BUILT_IN[name])()


def load(name: str, kinds: Mapping[str, KindLoader]) -> ProviderKind[Any]:
    """The kind ``name``: ``LookupError`` naming the installed kinds when there is none,
    ``ImportError`` (or whatever its module raises) when its plugin cannot be loaded,
    ``TypeError`` when what it names is not that kind."""
    loader = kinds.get(name)
    if loader is None:
        raise LookupError(f"unknown kind {name!r} (installed: {', '.join(sorted(kinds))})")
    kind = loader()
    if getattr(kind, "kind", None) != name or not callable(getattr(kind, "build", None)):
        raise TypeError(f"the plugin installed as kind {name!r} is not a provider kind of "
                        "that name")
    return kind
