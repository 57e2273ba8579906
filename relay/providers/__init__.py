"""Providers: each platform's payloads and stream frames as canonical events."""

from __future__ import annotations

from typing import TYPE_CHECKING

from relay.providers.base import Context, Frame, Provider

if TYPE_CHECKING:
    from relay.config import SourceSettings

__all__ = ["WEBHOOK_PROVIDERS", "Context", "Frame", "Provider", "build_provider"]

# Providers whose single JSON bodies are stored as they came (their normaliser reads
# them back); every other provider mints events, stored in canonical form.
WEBHOOK_PROVIDERS = frozenset({"casedev", "generic"})


def build_provider(settings: SourceSettings) -> Provider:
    """The provider a source is configured with."""
    from relay.providers.casedev import CaseDev
    from relay.providers.casey import Casey
    from relay.providers.generic import Generic
    from relay.providers.llamacloud import LlamaCloud
    from relay.providers.mapping import Mapped
    from relay.providers.motus import Motus
    from relay.providers.scriberr import Scriberr

    match settings.provider:
        case "casedev":
            return CaseDev()
        case "generic":
            return Generic()
        case "motus":
            return Motus()
        case "llamacloud":
            return LlamaCloud()
        case "scriberr":
            return Scriberr()
        case "casey":
            return Casey()
        case "mapping":
            assert settings.mapping is not None
            return Mapped(settings.mapping)
    raise ValueError(f"unknown provider {settings.provider!r}")
