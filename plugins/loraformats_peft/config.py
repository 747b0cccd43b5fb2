"""PEFT `LoraConfig` semantics, shared by the PEFT and diffusers formats.

Pattern keys are regular expressions matched the way PEFT does: module path P uses the first
key K (in dict order) for which P matches `(.*\\.)?(K)$`; modules matching no key fall back to
`r` / `lora_alpha` (not to their own rank).
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from loraformats.errors import InvalidFileError, UnsupportedError

if TYPE_CHECKING:
    import regex

    from .schemas import LoraConfigFields, LycorisConfigFields

#: `init_lora_weights` values that rewrite the base weights at initialisation: the saved adapter is
#: then a delta against a modified base, not against the model users load.
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

#: Config fields that make an adapter something other than a plain per-module delta.
REFUSED_FIELDS = {
    "modules_to_save": "full replacement weights (modules_to_save) are not an adapter delta",
    "layer_replication": "layer_replication changes the model's structure",
    "trainable_token_indices": "trainable token deltas are not supported yet",
    "target_parameters": "LoRA on raw parameters (target_parameters) is not supported yet",
    "alora_invocation_tokens": "activated LoRA depends on the input tokens",
    "arrow_config": "Arrow routing depends on the input",
    "use_qalora": "QA-LoRA is tied to a quantised base",
    "use_bdlora": "block-diagonal LoRA is not supported yet",
}


#: PEFT tuners whose maths no other format shares, with the reason they are refused.
OTHER_TUNERS = {
    "OFT": (
        "PEFT OFT is refused: it rotates the input side with a ½·(X − Xᵀ) skew matrix and (by default) a "
        "truncated Neumann series for the Cayley transform, where LyCORIS's Diag-OFT rotates output rows "
        "with an exact Cayley transform and a norm constraint; the maths disagree"
    ),
    "BOFT": (
        "PEFT BOFT is refused: its butterfly rotates the input side with ½·(X − Xᵀ) blocks and scales "
        "outputs by boft_s, where LyCORIS's BOFT rotates output rows with a norm constraint; the maths "
        "disagree"
    ),
    "IA3": "PEFT (IA)3 adapters are not supported yet (ia3_l multiplies W; LyCORIS's multiplies by 1 + v)",
}


def lycoris_settings(
    config: LycorisConfigFields, names: list[str], rank: int | None, where: str
) -> tuple[int, float]:
    """(rank, alpha) of one LoHa/LoKr module under `config`; the rank must agree with the tensors
    when they decide it (`rank` None: a LoKr whose factors are both full, whose rank is the config's)."""
    stated = pattern_value(config.rank_pattern, names)
    stated = config.r if stated is None else stated
    if rank is not None and stated != rank:
        raise InvalidFileError(f"{where}: the config gives rank {stated}, the tensors {rank}")
    alpha = pattern_value(config.alpha_pattern, names)
    return stated, config.alpha if alpha is None else alpha


#: Seconds one pattern may spend matching one module name before it counts as hostile.
MATCH_TIMEOUT = 0.05


@functools.lru_cache(maxsize=4096)
def _pattern(key: str) -> regex.Pattern:
    import regex  # the `regex` module, for its match timeout; imported when a config has patterns

    try:
        return regex.compile(rf"(.*\.)?({key})$")
    except (regex.error, RecursionError, OverflowError) as error:
        raise InvalidFileError(f"pattern {key!r} is not a valid regular expression ({error})") from None


def pattern_value(patterns: dict, names: Iterable[str]) -> Any:
    """The value of the first pattern matching any spelling of the module, PEFT-style; else None.

    Patterns come from the file: matching runs with a timeout, so a catastrophically backtracking
    pattern is refused instead of hanging the conversion.
    """
    for key, value in patterns.items():
        compiled = _pattern(str(key))
        for name in names:
            try:
                if compiled.match(name, timeout=MATCH_TIMEOUT):
                    return value
            except TimeoutError:
                raise InvalidFileError(
                    f"pattern {key!r} takes too long to match (catastrophic backtracking)"
                ) from None
    return None


def module_settings(config: LoraConfigFields, names: list[str], rank: int, where: str) -> dict[str, Any]:
    """alpha and rank scaling of one module under `config`; its rank must agree with the tensors."""
    stated = pattern_value(config.rank_pattern, names)
    stated = config.r if stated is None else stated
    if stated != rank:
        raise InvalidFileError(f"{where}: the config gives rank {stated}, the tensors {rank}")
    alpha = pattern_value(config.alpha_pattern, names)
    return {
        "alpha": config.lora_alpha if alpha is None else alpha,
        "rank_scaling": "sqrt_rank" if config.use_rslora else "rank",
    }


def checked(
    config: LoraConfigFields | LycorisConfigFields, where: str
) -> LoraConfigFields | LycorisConfigFields:
    problem = config.refusal()
    if problem:
        raise UnsupportedError(problem, path=where)
    return config


def peft_name(path: str, aliases: Iterable[str]) -> str:
    """The module name without wrappers a runtime may drop (CLIP's `text_model.` in transformers >= 5).

    PEFT matches target names by suffix and patterns with `(.*\\.)?(KEY)$`, so the stripped name
    matches the module with or without the wrapper.
    """
    for alias in aliases:
        if path.startswith(alias):
            return path[len(alias) :]
    return path


def exact(name: str, shadowed: set[str]) -> str:
    r"""A pattern matching the module `name` alone. PEFT matches `(.*\.)?(KEY)$`, so where `name` ends
    another module's name (Flux's `proj_out` and `single_transformer_blocks.0.proj_out`) a `^` pins it
    to the whole name. Other names stay unanchored, so a runtime wrapper prefix still matches."""
    return ("^" if name in shadowed else "") + re.escape(name)


def shadowed(universe: Iterable[str]) -> set[str]:
    """The names among `universe` that are a dotted suffix of another name in it."""
    names = set(universe)
    suffixes = {name[i + 1 :] for name in names for i, char in enumerate(name) if char == "."}
    return names & suffixes


def number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def scale_patterns(
    modules: dict[str, tuple[int, float]], aliases: Iterable[str], universe: Iterable[str] = ()
) -> dict[str, Any]:
    """`r`, `alpha`, `rank_pattern`, `alpha_pattern` and `target_modules` for modules {path: (rank,
    alpha)}, as PEFT's LoRA and LyCORIS configs both spell them: the most common rank and alpha as
    defaults (as PEFT's own tools choose), an exact-name pattern (`exact`) for every other module.
    `universe`: every module name of the model in the same spelling, to find names that patterns
    would also match elsewhere."""
    names = {path: peft_name(path, aliases) for path in modules}
    hidden = shadowed([*universe, *names.values()])
    r = Counter(rank for rank, _ in modules.values()).most_common(1)[0][0]
    alpha = Counter(a for _, a in modules.values()).most_common(1)[0][0]
    return {
        "r": r,
        "alpha": number(alpha),
        "rank_pattern": {exact(names[p], hidden): rk for p, (rk, _) in modules.items() if rk != r},
        "alpha_pattern": {exact(names[p], hidden): number(a) for p, (_, a) in modules.items() if a != alpha},
        "target_modules": sorted(names.values()),
    }


def build_config(
    modules: dict[str, tuple[int, float]],
    aliases: Iterable[str] = (),
    *,
    use_rslora: bool = False,
    use_dora: bool = False,
    universe: Iterable[str] = (),
) -> dict[str, Any]:
    """A complete LoraConfig dict for modules {path: (rank, alpha)} (`scale_patterns`, with
    `alpha` spelled `lora_alpha`)."""
    patterns = scale_patterns(modules, aliases, universe)
    return {
        "r": patterns["r"],
        "lora_alpha": patterns["alpha"],
        "rank_pattern": patterns["rank_pattern"],
        "alpha_pattern": patterns["alpha_pattern"],
        "target_modules": patterns["target_modules"],
        "use_rslora": use_rslora,
        "use_dora": use_dora,
        "lora_bias": False,
    }
