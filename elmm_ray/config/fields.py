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


def _worker_count(value: Any) -> Any:
    """``N`` or ``[MIN, MAX]`` (an elastic range; ``[N, N]`` is ``N``)."""
    def whole(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if whole(value):
        if value < 1:
            raise PydanticCustomError(RULE_ERROR, "{message}", {
                "message": f"`train.num_workers` = {value}: give at least 1 worker",
                "problems": [f"`train.num_workers` = {value}: give at least 1 worker"]})
        return value
    if isinstance(value, list | tuple) and len(value) == 2 and all(whole(v) for v in value):
        low, high = value
        if not 1 <= low <= high:
            message = (f"`train.num_workers` = {list(value)}: an elastic range [MIN, MAX] "
                       "needs 1 <= MIN <= MAX")
            raise PydanticCustomError(RULE_ERROR, "{message}",
                                      {"message": message, "problems": [message]})
        return low if low == high else (low, high)
    message = (f"`train.num_workers` = {value!r}: give a worker count N or an elastic range "
               "[MIN, MAX]")
    raise PydanticCustomError(RULE_ERROR, "{message}", {"message": message, "problems": [message]})


# Ray Train workers: a count, or an elastic (MIN, MAX) range.
WorkerCount = Annotated[int | tuple[int, int], BeforeValidator(_worker_count)]


def _raise_problems(problems: list[str]) -> None:
    if problems:
        raise PydanticCustomError(RULE_ERROR, "{message}",
                                  {"message": "; ".join(problems), "problems": problems})
