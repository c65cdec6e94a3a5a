"""The one base of every message: frozen, unknown fields refused, JSON-safe data only."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
