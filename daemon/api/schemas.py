"""The request bodies of the API's POST routes."""

from __future__ import annotations

from pydantic import BaseModel, Field


class KeepBody(BaseModel):
    keep: bool = True


class FalsePositiveBody(BaseModel):
    value: bool = True
    by: str = Field("", max_length=200)
    note: str = Field("", max_length=2000)


class AckBody(BaseModel):
    by: str = Field("web", max_length=200)
    camera: str | None = Field(None, max_length=32)
    note: str = Field("", max_length=2000)
