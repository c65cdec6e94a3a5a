"""The one base of every message: frozen, unknown fields refused, JSON-safe data only."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DoneReply(Message):
    """The answer to a command that has nothing to report but that it was done."""

    kind: Literal["done_reply"] = "done_reply"
