"""The base of every recipe section: unknown keys rejected, assignments validated. A leaf module (pydantic
only), so that distillation methods can declare their own config sections without importing the schema."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict

# `device=0` arrives from YAML as an int, `device=0,1` as a string: both mean GPU indices
Device = Annotated[str, BeforeValidator(lambda v: str(v) if isinstance(v, int) and not isinstance(v, bool) else v)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
