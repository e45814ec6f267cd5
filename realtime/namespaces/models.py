"""Shared payload pieces: bounded ids and text. Every inbound model forbids
extra fields, so a typo in a client is an `invalid` reply, not silent loss."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, StringConstraints

# Ids become room names and index keys: printable, no spaces, bounded.
Id = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:@-]+$")]
ShortText = Annotated[str, StringConstraints(max_length=500)]
Text = Annotated[str, StringConstraints(min_length=1, max_length=2000)]


class Inbound(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
