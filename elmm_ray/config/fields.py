"""Building blocks of the config schema: strict scalar types, the section settings and
the error a cross-field rule raises (``ctx["problems"]`` holds the finished messages)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, ConfigDict, Strict
from pydantic_core import PydanticCustomError

# Error type of the rules below; ``ctx["problems"]`` holds the finished messages.
RULE_ERROR = "config_rule"

SECTION = ConfigDict(extra="forbid", frozen=True)


def _empty_to_none(value: Any) -> Any:
    return None if value == "" else value


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return value


Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
# An optional string: "" counts as unset (None).
OptStr = Annotated[Annotated[str, Strict()] | None, BeforeValidator(_empty_to_none)]


def _raise_problems(problems: list[str]) -> None:
    if problems:
        raise PydanticCustomError(RULE_ERROR, "{message}",
                                  {"message": "; ".join(problems), "problems": problems})
