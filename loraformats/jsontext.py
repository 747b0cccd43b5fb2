"""JSON inside headers and configs comes from strangers: parse it without crashing on bombs."""

from __future__ import annotations

import json
from typing import Any


def parse_json(text: str) -> Any:
    """`json.loads`, where nesting bombs and absurd numbers are a `ValueError` like any bad JSON."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
