"""Decision-making algorithms on the diffrl core; ``AGENTS`` maps each kind to (ConfigClass, AgentClass)."""

from __future__ import annotations

AGENTS: dict[str, tuple[type, type]] = {}
