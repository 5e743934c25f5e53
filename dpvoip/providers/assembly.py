"""The configured providers built, and read by the daemon's common parts.

``build_all`` asks each configured kind for its provider and refuses what the daemon
could not wire (two providers claiming one web path or one origin); ``choice`` is what
click-to-call dials through; ``ProvidersCollector`` is their part of ``/metrics``;
``check_lines`` their part of ``dpvoip check``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from dpvoip.providers.choice import ProviderChoice
from dpvoip.providers.interface import Provider, ProviderConfig, ProviderTools


class WiringError(ValueError):
    """Providers the daemon cannot wire together (said at start, naming them)."""


def build_all(configured: Sequence[ProviderConfig], tools: ProviderTools) -> list[Provider]:
    """Each configured provider built by its kind, in configuration order."""
    built: list[Provider] = []
    paths: dict[str, str] = {}
    origins: dict[str, str] = {}
    for item in configured:
        provider = item.plugin.build(item.name, item.settings, tools)
        if (provider.name, provider.kind) != (item.name, item.kind):
            raise WiringError(f"the {item.kind!r} plugin built provider {provider.name!r} "
                              f"({provider.kind}) when asked for {item.name!r}")
        for part in provider.web:
            path = part.path.strip("/")
            if path in paths:
                raise WiringError(f"providers {paths[path]!r} and {item.name!r} both serve "
                                  f"/voip/{path}/")
            paths[path] = item.name
        for origin in provider.origins:
            if origins.setdefault(origin.name, item.name) != item.name:
                raise WiringError(f"providers {origins[origin.name]!r} and {item.name!r} "
                                  f"both record calls as {origin.name!r}")
        built.append(provider)
    return built


def choice(built: Sequence[Provider]) -> ProviderChoice:
    """Click-to-call's diallers (by name) and recording links (in order)."""
    return ProviderChoice(
        [(p.name, p.dialler) for p in built if p.dialler is not None],
        [p.recordings for p in built if p.recordings is not None])


def check_lines(configured: Sequence[ProviderConfig]) -> list[str]:
    """What ``dpvoip check`` says of the configured providers, from the configuration."""
    lines: list[str] = []
    for item in configured:
        lines.extend(item.plugin.check_lines(item.name, item.settings))
    return lines or ["providers: none configured"]


def senders(built: Sequence[Provider]) -> list[str]:
    """The networks that post to the providers' web parts (not counted by the limits)."""
    return [network for p in built for part in p.web for network in part.senders]


class ProvidersCollector(Collector):
    """Every provider's figures at each scrape. Families of one name (two providers of
    one kind) are merged into one: a family's name may appear once in the exposition."""

    def __init__(self, built: Sequence[Provider]) -> None:
        self._built = built

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for provider in self._built:
            for family in provider.metrics():
                kept = families.setdefault(family.name, family)
                if kept is not family:
                    kept.samples.extend(family.samples)
        yield from families.values()
