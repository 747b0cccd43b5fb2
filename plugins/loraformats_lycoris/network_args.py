"""`ss_network_args` (sd-scripts' JSON of the network arguments): kept, and corrected where the file
written says otherwise. It is the only place LyCORIS records `algo`, `use_tucker`, `dora_wd`,
`wd_on_output` or `train_norm`, so a conversion that changes one of them updates the stated value;
arguments not stated are not added, values that still hold and every other argument are left
exactly as they were (same JSON text when nothing changes).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from loraformats.adapters import Adapter, DoRA

from .suffixes import ALGO_ALIASES, ALGO_NAMES

ARGS = "ss_network_args"
TUCKER_KEYS = ("use_tucker", "use_conv_cp", "use_cp")


def _truth(value: object) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return None


def facts(modules: Iterable[Adapter]) -> dict[str, object]:
    """What the modules written say about the network arguments (only what they decide)."""
    modules = list(modules)
    inners = [m.inner if isinstance(m, DoRA) else m for m in modules]
    algorithms = {ALGO_NAMES.get(a.algorithm) for a in inners if a.algorithm != "norm"} - {None}
    result: dict[str, object] = {}
    if len(algorithms) == 1:
        result["algo"] = algorithms.pop()
    result["dora_wd"] = any(isinstance(m, DoRA) for m in modules)
    axes = {m.axis for m in modules if isinstance(m, DoRA)}
    if len(axes) == 1:
        result["wd_on_output"] = axes.pop() == "output"
    result["use_tucker"] = any(f.endswith(".tucker") for a in inners for f in a.features())
    result["train_norm"] = any(a.algorithm == "norm" for a in inners)
    return result


def updated_metadata(metadata: dict[str, str], modules: Iterable[Adapter]) -> dict[str, str]:
    """`metadata` with `ss_network_args` corrected (and `ss_network_module` when a plain Kohya network
    now holds LyCORIS modules); untouched when absent, unreadable or already right."""
    modules = list(modules)
    if metadata.get("ss_network_module") == "networks.lora" and any(
        (m.inner if isinstance(m, DoRA) else m).algorithm != "lora" for m in modules
    ):
        metadata["ss_network_module"] = "lycoris.kohya"
    raw = metadata.get(ARGS)
    if raw is None:
        return metadata
    try:
        args = json.loads(raw)
    except ValueError:
        return metadata
    if not isinstance(args, dict):
        return metadata
    changed = False
    for key, value in facts(modules).items():
        if key == "algo":
            stated = args.get("algo")
            same = isinstance(stated, str) and ALGO_ALIASES.get(stated.lower(), stated.lower()) == value
            if stated is not None and not same:
                args["algo"], changed = value, True
            continue
        keys = TUCKER_KEYS if key == "use_tucker" else (key,)
        stated_keys = [k for k in keys if k in args]
        stated = next((_truth(args[k]) for k in stated_keys), None)
        if stated_keys and stated is not None and stated != value:
            for k in stated_keys:
                args[k] = value if isinstance(args[k], bool) else str(value)
            changed = True
    if changed:
        metadata[ARGS] = json.dumps(args)
    return metadata
