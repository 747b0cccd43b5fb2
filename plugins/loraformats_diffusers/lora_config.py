"""PEFT `LoraConfig` semantics that diffusers' `lora_adapter_metadata` inherits.

Pattern keys are regular expressions matched the way PEFT does: module path P uses the first
key K (in dict order) for which P matches `(.*\\.)?(K)$`; modules matching no key fall back to
`r` / `lora_alpha` (not to their own rank).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field


class LoraConfigFields(BaseModel):
    """The `LoraConfig` fields loraformats reads from and writes into `lora_adapter_metadata`."""

    model_config = ConfigDict(extra="allow")

    r: int = 8
    lora_alpha: float = 8
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    target_modules: list[str] | str | None = None
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    fan_in_fan_out: bool = False


def pattern_value(patterns: dict, names: Iterable[str]):
    """The value of the first pattern matching any spelling of the module, PEFT-style; else None."""
    for key, value in patterns.items():
        for name in names:
            if re.match(rf"(.*\.)?({key})$", name):
                return value
    return None


def peft_name(path: str, aliases: Iterable[str]) -> str:
    """The module name without wrappers a runtime may drop (CLIP's `text_model.` in transformers >= 5).

    PEFT matches target names by suffix and patterns with `(.*\\.)?(KEY)$`, so the stripped name
    matches the module with or without the wrapper.
    """
    for alias in aliases:
        if path.startswith(alias):
            return path[len(alias) :]
    return path


def number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def build_config(modules: dict[str, tuple[int, float]], aliases: Iterable[str] = ()) -> dict:
    """A complete LoraConfig dict for modules {path: (rank, alpha)}: defaults + patterns for the rest."""
    suffixes = {path: peft_name(path, aliases) for path in modules}
    r = Counter(rank for rank, _ in modules.values()).most_common(1)[0][0]
    alpha = Counter(a for _, a in modules.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": number(alpha),
        "rank_pattern": {re.escape(suffixes[p]): rk for p, (rk, _) in modules.items() if rk != r},
        "alpha_pattern": {re.escape(suffixes[p]): number(a) for p, (_, a) in modules.items() if a != alpha},
        "target_modules": sorted(suffixes[p] for p in modules),
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
    }
