"""PEFT's LoHa and LoKr tuners (`LoHaConfig`, `LoKrConfig`): one component's config and tensors.

PEFT does not load factor shapes from the file: it re-creates every module from the config
(`r`, `decompose_both`, `decompose_factor`, `use_effective_conv2d`) and then copies the tensors in.
So the config written here is chosen to make PEFT create exactly the factors the adapters hold;
where no config can (a LoHa whose two products have different ranks, a LoKr factorisation no single
`decompose_factor` gives, Tucker on some k×k convs and not others), the component is refused with the
reason instead of being written for PEFT to reject or, worse, to mis-shape.

Scales: PEFT uses alpha / r for every module, including a LoKr whose two factors are full (where
LyCORIS, ComfyUI and A1111 use 1). A LoKr read under LyCORIS's rule is therefore written with
alpha = r for that module (scale 1, exact); one read from PEFT keeps its own r and alpha.
"""

from __future__ import annotations

import math
from typing import Any

from loraformats.adapters import Adapter, LoHa, LoKr
from loraformats.canonical import AdapterSet, ModuleKey
from loraformats.errors import UnsupportedError
from loraformats.families import CANONICAL, Component, Layer
from loraformats.tensors import TensorData

from .config import peft_name, scale_patterns

#: LycorisConfig fields written besides the maths, with PEFT's defaults, so the config is complete.
DEFAULTS: dict[str, Any] = {
    "task_type": None,
    "base_model_name_or_path": None,
    "revision": None,
    "inference_mode": True,
    "rank_dropout": 0.0,
    "module_dropout": 0.0,
    "init_weights": True,
    "modules_to_save": None,
    "layers_to_transform": None,
    "layers_pattern": None,
}


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's `factorization` (peft/tuners/lokr/layer.py), which PEFT uses to re-create LoKr factors.

    It differs from LyCORIS's in one case: when `factor` divides the dimension it returns
    (factor, dimension / factor) unordered, where LyCORIS puts the smaller first.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def _refuse(component: str, why: str) -> UnsupportedError:
    return UnsupportedError(f"PEFT cannot hold {component}'s LyCORIS modules as they are: {why}")


def _square_kernel(layer: Layer) -> bool:
    return layer.kind == "conv2d" and tuple(layer.kernel) != (1, 1)


def encode_component(
    adapters: AdapterSet, component: Component, keys: list[ModuleKey], runtime_name
) -> tuple[dict[str, Any], dict[ModuleKey, list[tuple[str, TensorData]]], dict[ModuleKey, dict]]:
    """(config fields, tensors by module as (suffix, tensor), alpha notes) of an all-LoHa or all-LoKr
    component."""
    modules = {key: adapters.modules[key] for key in keys}
    kinds = {type(module) for module in modules.values()}
    if len(kinds) != 1 or not kinds <= {LoHa, LoKr}:
        names = sorted({m.algorithm for m in modules.values()})
        raise _refuse(component.name, f"one PEFT adapter has one tuner type, and it mixes {names}")
    loha = kinds == {LoHa}
    effective = any(_square_kernel(adapters.layer(k)) and _is_tucker(m) for k, m in modules.items())
    for key, module in modules.items():
        layer = adapters.layer(key)
        if _square_kernel(layer) and _decomposed_w2(module) and _is_tucker(module) != effective:
            raise _refuse(
                component.name,
                "use_effective_conv2d is one switch for every k×k convolution, and some have Tucker "
                f"cores while others ({key[1]}) do not",
            )
    settings: dict[str, tuple[int, float]] = {}
    tensors: dict[ModuleKey, list[tuple[str, TensorData]]] = {}
    notes: dict[ModuleKey, dict] = {}
    extra: dict[str, Any] = {"use_effective_conv2d": effective}
    if not loha:
        extra |= _lokr_switches(component.name, modules, adapters)
    for key, module in modules.items():
        layer = adapters.layer(key)
        name = runtime_name(component, key[1])
        if loha:
            rank = _loha_rank(component.name, key, module)
        else:
            rank = _lokr_rank(component.name, key, module, layer, extra["decompose_both"])
        settings[name] = (rank, module.scale * rank)
        roles = module.tensors().items()
        tensors[key] = [(role, _peft_shape(role, tensor, layer)) for role, tensor in roles if role != "alpha"]
        notes[key] = _note(module)
    config = {**DEFAULTS, "peft_type": "LOHA" if loha else "LOKR", **_patterns(settings, component), **extra}
    return config, tensors, notes


def _is_tucker(module: Adapter) -> bool:
    return getattr(module, "hada_t1", None) is not None or getattr(module, "lokr_t2", None) is not None


def _decomposed_w2(module: Adapter) -> bool:
    return isinstance(module, LoHa) or module.lokr_w2 is None


def _loha_rank(component: str, key: ModuleKey, loha: LoHa) -> int:
    r1, r2 = loha.ranks
    if r1 != r2:
        raise _refuse(component, f"{key[1]} has ranks {r1} and {r2}; PEFT's LoHa has one rank per module")
    return r1


def _lokr_switches(component: str, modules: dict[ModuleKey, LoKr], adapters: AdapterSet) -> dict[str, Any]:
    """decompose_both and the one decompose_factor that reproduces every module's Kronecker shapes."""
    shapes = {}
    for key, lokr in modules.items():
        layer, (a, c) = adapters.layer(key), _w1_shape(lokr)
        shapes[key] = ((a, layer.out_features // a), (c, layer.in_features // c))
    candidates = sorted({dims[0][0] for dims in shapes.values()} | {dims[1][0] for dims in shapes.values()})
    for factor in [-1, *candidates]:
        if all(
            factorization(a * b, factor) == (a, b) and factorization(c * d, factor) == (c, d)
            for (a, b), (c, d) in shapes.values()
        ):
            decompose_both = any(m.lokr_w1 is None for m in modules.values())
            return {"decompose_both": decompose_both, "decompose_factor": factor}
    raise _refuse(
        component,
        "PEFT re-creates every module's Kronecker shapes from one decompose_factor, and none gives these "
        "(LyCORIS orders a factor pair small-first where PEFT does not, e.g. factor 4 on 4 channels, "
        "and unbalanced_factorization swaps them)",
    )


def _w1_shape(lokr: LoKr) -> tuple[int, int]:
    if lokr.lokr_w1 is not None:
        return tuple(lokr.lokr_w1.shape)
    return lokr.lokr_w1_a.shape[0], lokr.lokr_w1_b.shape[1]


def _lokr_rank(component: str, key: ModuleKey, lokr: LoKr, layer: Layer, decompose_both: bool) -> int:
    """The r that makes PEFT create this module's factors: full w1 iff not (decompose_both and
    r < max(a, c) / 2); full w2 iff r >= max(b, d) / 2 (d without the kernel)."""
    a, c = _w1_shape(lokr)
    b, d = layer.out_features // a, layer.in_features // c
    ranks = {t.shape[0] for t in (lokr.lokr_w1_b, lokr.lokr_w2_b) if t is not None}
    if len(ranks) > 1:
        raise _refuse(component, f"{key[1]} has two ranks {sorted(ranks)}; PEFT's LoKr has one per module")
    if ranks:
        rank = ranks.pop()
    elif lokr.convention == "peft" and lokr.peft_rank:
        rank = lokr.peft_rank
    else:
        rank = max(a, b, c, d)  # both factors full: any r this large makes PEFT create them full
    problems = []
    if (lokr.lokr_w1 is None) != (decompose_both and rank < max(a, c) / 2):
        problems.append("lokr_w1")
    if (lokr.lokr_w2 is not None) != (rank >= max(b, d) / 2):
        problems.append("lokr_w2")
    if problems:
        raise _refuse(
            component,
            f"with r = {rank}, PEFT would create {' and '.join(problems)} of {key[1]} in the other form "
            "(full vs low-rank)",
        )
    return rank


FLAT = ("hada_w1_a", "hada_w2_a", "hada_w1_b", "hada_w2_b", "lokr_w2_a", "lokr_w2_b")


def _peft_shape(role: str, tensor: TensorData, layer: Layer) -> TensorData:
    """PEFT keeps plain (non-Tucker) LoHa/LoKr factors 2-D; 4-D copies (some trainers) are reshaped."""
    if role in FLAT and len(tensor.shape) == 4:
        return tensor.reshaped((tensor.shape[0], math.prod(tensor.shape[1:])))
    return tensor


def _note(module: Adapter) -> dict:
    """What the round trip back needs: the original alpha tensor and, for LoKr, its scale rule."""
    alpha = module.alpha
    note: dict[str, Any] = (
        {"absent": True}
        if alpha is None
        else {"dtype": alpha.dtype, "shape": list(alpha.shape), "hex": alpha.read_bytes().hex()}
    )
    if isinstance(module, LoKr):
        note["convention"] = module.convention
    return note


def _patterns(settings: dict[str, tuple[int, float]], component: Component) -> dict[str, Any]:
    universe = (peft_name(path, component.path_aliases) for path in component.named_paths(CANONICAL))
    return scale_patterns(settings, component.path_aliases, universe)
