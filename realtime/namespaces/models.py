"""Shared payload pieces: bounded ids and text. Every inbound model forbids
extra fields, so a typo in a client is an `invalid` reply, not silent loss."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from tracking.day import check_date


def _a_day(v: str) -> str:
    check_date(v)  # ValueError: "not a date" with the field
    return v


# A calendar day a day view may ask for, "YYYY-MM-DD" (tracking/day.py check_date).
Day = Annotated[str, StringConstraints(pattern=r"^\d{4}-\d{2}-\d{2}$"), AfterValidator(_a_day)]
# Ids become room names and index keys: printable, no spaces, bounded.
Id = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:@-]+$")]
# Integers stay within what JavaScript represents exactly (and MongoDB stores).
MAX_SAFE_INT = 2**53 - 1
Seq = Annotated[int, Field(ge=0, le=MAX_SAFE_INT)]
Ts = Annotated[int, Field(ge=0, le=MAX_SAFE_INT)]
ShortText = Annotated[str, StringConstraints(max_length=500)]
# WGS-84 degrees (or GCJ-02 / BD-09 where a coord_sys says so); finite.
Lat = Annotated[float, Field(ge=-90, le=90, allow_inf_nan=False)]
Lng = Annotated[float, Field(ge=-180, le=180, allow_inf_nan=False)]
Text = Annotated[str, StringConstraints(min_length=1, max_length=2000)]


class Inbound(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
