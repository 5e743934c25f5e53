"""Telephony providers as plugins: the interface (``interface``), how a kind is found
(``discovery``), which provider dials a connection (``choice``) and the built providers
wired into the daemon's common parts (``assembly``). Zadarma is the first kind
(``dpvoip.zadarma.provider``); README "Writing a provider" shows a third."""

from dpvoip.providers.interface import (
    Dialler,
    DialRequest,
    Provider,
    ProviderConfig,
    ProviderError,
    ProviderHealth,
    ProviderKind,
    ProviderTools,
    Recorder,
    RecordingGone,
    RecordingLinks,
    WebPart,
)

__all__ = [
    "DialRequest",
    "Dialler",
    "Provider",
    "ProviderConfig",
    "ProviderError",
    "ProviderHealth",
    "ProviderKind",
    "ProviderTools",
    "Recorder",
    "RecordingGone",
    "RecordingLinks",
    "WebPart",
]
