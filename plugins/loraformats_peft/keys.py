"""PEFT's tensor naming, shared by the PEFT and diffusers formats: factor suffixes, DoRA magnitudes,
and the `loraformats.alphas` note that lets a round trip restore the original alpha tensors."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from loraformats.adapters import Adapter, DoRA, Exactness, LoHa, LoKr, LoRA
from loraformats.canonical import AdapterSet, ModuleKey
from loraformats.errors import UnsupportedError
from loraformats.families import Layer
from loraformats.formats import ReadContext
from loraformats.header import Header
from loraformats.jsontext import parse_json
from loraformats.report import Step
from loraformats.tensors import MemoryTensor, TensorData

ALPHAS_KEY = "loraformats.alphas"

SUFFIXES = (  # (suffix, role); the module path is what precedes the suffix
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_magnitude_vector", "magnitude"),
    (".alpha", "alpha"),
)
ENDINGS = tuple(suffix for suffix, _ in SUFFIXES)
#: `…lora_A.<adapter name>.weight`: a state dict saved with the adapter name left in.
NAMED = re.compile(r"^(?P<stem>.+)\.lora_(?P<factor>A|B)\.(?P<adapter>[A-Za-z0-9_-]+)\.weight$")
NOT_YET = {
    "lora_B.bias": "LoRA bias (lora_B.bias) is not supported yet",
    "lora_embedding_": "embedding LoRA (lora_embedding_A/B) is not supported yet",
    "hada_": "LoHa modules are not supported yet",
    "lokr_": "LoKr modules are not supported yet",
    "oft_": "OFT modules are not supported yet",
    "boft_": "BOFT modules are not supported yet",
    "ia3_l": "(IA)3 modules are not supported yet",
}


#: PEFT's LoHa and LoKr parameter names (saved without `.weight`; the same as LyCORIS's suffixes).
LYCORIS_ROLES = (
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
)  # fmt: skip
LYCORIS_ENDINGS = tuple(f".{role}" for role in LYCORIS_ROLES)


def split_lycoris_key(key: str) -> tuple[str, str] | None:
    """(module stem, role) of a PEFT LoHa/LoKr tensor name, or None."""
    if key.endswith(LYCORIS_ENDINGS):
        stem, _, role = key.rpartition(".")
        return stem, role
    return None


#: SUFFIXES by their last one or two dot-separated parts, so a name is split with dictionary lookups.
_ROLE_OF_LAST = {suffix[1:]: role for suffix, role in SUFFIXES if suffix.count(".") == 1}
_ROLE_OF_WEIGHT = {suffix[1:-7]: role for suffix, role in SUFFIXES if suffix.endswith(".weight")}


def split_key(key: str) -> tuple[str, str] | None:
    """(module stem, role) of a PEFT-style tensor name, or None."""
    head, dot, last = key.rpartition(".")  # detection splits every name it sees: no suffix loop
    if last == "weight":
        stem, dot, factor = head.rpartition(".")
        role = _ROLE_OF_WEIGHT.get(factor) if dot else None
    else:
        stem, role = head, _ROLE_OF_LAST.get(last) if dot else None
    if role is not None:
        return stem, role
    named = NAMED.match(key) if ".lora_" in key else None
    if named:
        return named["stem"], "down" if named["factor"] == "A" else "up"
    return None


def not_yet(key: str, default: str) -> str:
    return next((why for part, why in NOT_YET.items() if part in key), default)


def parts(module: Adapter, where: str) -> tuple[LoRA, DoRA | None]:
    """The plain LoRA inside a module, and the DoRA wrapper if any; anything else is refused."""
    dora = module if isinstance(module, DoRA) else None
    lora = dora.inner if dora else module
    if not isinstance(lora, LoRA) or lora.mid is not None or (dora and dora.axis != "output"):
        raise UnsupportedError(f"PEFT-style LoRA cannot hold {sorted(module.features())} ({where})")
    return lora, dora


def shaped(factor: TensorData, layer: Layer) -> TensorData:
    """PEFT's factor shapes for the layer kind: 4-D on convs, 2-D on linears (bytes unchanged)."""
    shape = (
        (factor.shape if len(factor.shape) == 4 else (*factor.shape, 1, 1))
        if layer.kind == "conv2d"
        else (factor.shape[:2])
    )
    return factor if shape == factor.shape else factor.reshaped(shape)


def magnitude(dora: DoRA, layer: Layer) -> TensorData:
    """PEFT's `lora_magnitude_vector` layout: (out,) on linears, (1, out, 1, 1) on convs."""
    count = math.prod(dora.magnitude.shape)
    shape = (1, count, 1, 1) if layer.kind == "conv2d" else (count,)
    return dora.magnitude if dora.magnitude.shape == shape else dora.magnitude.reshaped(shape)


def module_tensors(stem: str, module: Adapter, layer: Layer, down: TensorData, up: TensorData) -> list:
    """The tensors of one module under `stem`, given its (possibly rescaled) factors."""
    tensors = [(f"{stem}.lora_A.weight", shaped(down, layer)), (f"{stem}.lora_B.weight", shaped(up, layer))]
    if isinstance(module, DoRA):
        tensors.append((f"{stem}.lora_magnitude_vector", magnitude(module, layer)))
    return tensors


def alpha_notes(loras: dict[ModuleKey, LoRA], *, config_gives_alpha: bool = False) -> dict[ModuleKey, dict]:
    """The original alpha tensors (dtype, shape, bytes), for a round trip to restore bit for bit.

    A module without an alpha tensor is noted as absent when a config will give it one on the way
    back (always for PEFT; for diffusers when other modules' alphas need a config).
    """
    notes = {key: alpha_note(lora) for key, lora in loras.items()}
    if not config_gives_alpha and all(note.get("absent") for note in notes.values()):
        return {}
    return notes


def alpha_note(lora: LoRA) -> dict[str, Any]:
    if lora.alpha is None:
        return {
            "absent": True,
            **({"rank_scaling": lora.rank_scaling} if lora.rank_scaling != "rank" else {}),
        }
    note = {"dtype": lora.alpha.dtype, "shape": list(lora.alpha.shape), "hex": lora.alpha.read_bytes().hex()}
    if lora.rank_scaling != "rank":
        note["rank_scaling"] = lora.rank_scaling
    return note


def encode_notes(notes: dict[ModuleKey, dict]) -> str:
    return json.dumps(
        {f"{c}:{p}": note for (c, p), note in notes.items()}, sort_keys=True, separators=(",", ":")
    )


def _valid_fold(folded: object) -> bool:
    """A fold note we could have written: a factor, a sane exponent, a float dtype."""
    from loraformats.exponent import FLOATS

    return (
        isinstance(folded, dict)
        and folded.get("factor") in ("up", "down")
        and type(folded.get("log2")) is int
        and abs(folded["log2"]) <= 64
        and folded.get("dtype", "F32") in FLOATS
    )


def restore_lycoris_alpha(module: LoHa | LoKr, note: dict) -> bool:
    """Put back the source's alpha tensor (or its absence) and, for LoKr, the scale rule it was read
    under; False (nothing changed) when that would change the scale the config gives (edited since)."""
    from dataclasses import replace

    convention = note.get("convention", "peft")
    if convention not in ("lycoris", "peft"):
        raise ValueError(convention)
    alpha = None
    if note.get("absent") is not True:
        alpha = MemoryTensor(bytes.fromhex(note["hex"]), note["dtype"], tuple(note["shape"]))
    lokr = {}
    if isinstance(module, LoKr):
        lokr = {"convention": convention, "peft_rank": None if convention == "lycoris" else module.peft_rank}
    restored = replace(module, alpha=alpha, **lokr)
    if not math.isclose(restored.scale, module.scale, rel_tol=1e-6):
        return False
    module.alpha = alpha
    if isinstance(module, LoKr):
        module.convention, module.peft_rank = restored.convention, restored.peft_rank
    return True


def restore_alphas(adapters: AdapterSet, header: Header, context: ReadContext) -> None:
    """Undo what a loraformats write did to alphas (recorded under `loraformats.alphas`)."""
    try:
        notes = parse_json(header.metadata.get(ALPHAS_KEY, "{}"))
    except ValueError:
        notes = None
    if not isinstance(notes, dict):
        context.warnings.append(f"ignored an unreadable {ALPHAS_KEY} entry")
        return
    unfolded = stale = 0
    for address, note in notes.items():
        component, _, path = address.partition(":")
        module = adapters.modules.get((component, path))
        lora = module.inner if isinstance(module, DoRA) else module
        try:
            if not isinstance(note, dict):
                raise ValueError(address)
            if isinstance(lora, (LoHa, LoKr)):  # noted by the PEFT LoHa/LoKr writer (lycoris.py)
                stale += not restore_lycoris_alpha(lora, note)
                continue
            if not isinstance(lora, LoRA):
                raise ValueError(address)
            scaling = note.get("rank_scaling", "rank")
            if note.get("absent") is True:
                alpha = None
            else:
                alpha = MemoryTensor(bytes.fromhex(note["hex"]), note["dtype"], tuple(note["shape"]))
            folded = note.get("folded")
            if folded and not _valid_fold(folded):
                raise ValueError(address)
            noted = LoRA(lora.down, lora.up, None, alpha, scaling).scale
            stated = lora.scale * (2.0 ** folded["log2"] if folded else 1.0)
            if not math.isclose(noted, stated, rel_tol=1e-6):  # float32 re-expression is not an edit
                stale += 1  # the file was edited after we wrote it (e.g. its config): the file wins
                continue
            if alpha is None:
                lora.alpha, lora.rank_scaling = None, scaling
                continue
            if folded:
                from loraformats.exponent import can_shift, shift_tensor

                factor = getattr(lora, folded["factor"])
                if not can_shift(factor, -int(folded["log2"]), folded.get("dtype", factor.dtype)):
                    raise ValueError(address)  # a note that does not fit these values
                restored = shift_tensor(factor, -int(folded["log2"]), folded.get("dtype", factor.dtype))
                setattr(lora, folded["factor"], restored)
                unfolded += 1
            lora.alpha, lora.rank_scaling = alpha, scaling
        except (KeyError, ValueError, TypeError):
            context.warnings.append(f"ignored a {ALPHAS_KEY} note that does not fit this file: {address}")
    if stale:
        context.warnings.append(
            f"{stale} {ALPHAS_KEY} notes disagree with the file's own scales (edited since?): "
            "the file's scales were used"
        )
    if unfolded:
        detail = "power-of-two alpha folds undone and original alphas restored from loraformats.alphas"
        step = Step(
            stage="read", name="unfold alpha", exactness=Exactness.EXACT, modules=unfolded, detail=detail
        )
        adapters.provenance.steps.append(step)
