"""One JSON object per line, the layout of the project's tables: parse errors name the file and line."""

from __future__ import annotations

import json
from typing import Any


def parse_object(line: str, where: str, error: type[Exception] = ValueError) -> dict[str, Any]:
    """The JSON object on `line`; anything else raises `error` naming `where` (e.g. "file.jsonl:3")."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON: {e.msg}") from None
    if not isinstance(value, dict):
        raise error(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value
