"""sd-scripts' `sshs_model_hash` and `sshs_legacy_hash`, computed without torch or a second file.

sd-scripts serialises the final tensors with safetensors (only `ss_*` metadata in that header)
and hashes (a) every byte after the header, (b) 64 KiB at offset 1 MiB of the whole buffer.
safetensors orders tensors by dtype (descending, in its own enum order), then by name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence

from loraformats.canonical import AdapterSet
from loraformats.tensors import TensorData

#: safetensors' Dtype enum order (ascending); verified against the library in the tests.
SAFETENSORS_DTYPE_ORDER = (
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
    "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64",
)  # fmt: skip

_LEGACY_OFFSET, _LEGACY_SIZE = 0x100000, 0x10000


def safetensors_order(tensors: Sequence[tuple[str, TensorData]]) -> list[tuple[str, TensorData]]:
    rank = {name: i for i, name in enumerate(SAFETENSORS_DTYPE_ORDER)}
    return sorted(tensors, key=lambda item: (-rank[item[1].dtype], item[0]))


def _header_length(ordered: Sequence[tuple[str, TensorData]], metadata: dict[str, str]) -> int:
    doc: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, tensor in ordered:
        doc[name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    return len(raw) + (-len(raw) % 8)


def sshs_hashes(
    tensors: Sequence[tuple[str, TensorData]], metadata: dict[str, str]
) -> tuple[str, str | None]:
    """(sshs_model_hash, sshs_legacy_hash) as sd-scripts computes them; legacy None if unknowable."""
    import hashlib  # OpenSSL's load costs a few ms that conversions to other formats need not pay

    ordered = safetensors_order(tensors)
    ss_metadata = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    header_length = _header_length(ordered, ss_metadata)
    window_start = _LEGACY_OFFSET - 8 - header_length  # position of the legacy window in the data section
    model, legacy = hashlib.sha256(), hashlib.sha256()
    position = 0
    for _, tensor in ordered:
        data = tensor.read_bytes()
        model.update(data)
        low, high = max(window_start, position), min(window_start + _LEGACY_SIZE, position + len(data))
        if low < high:
            legacy.update(data[low - position : high - position])
        position += len(data)
    # A window starting inside a (rare) >1 MiB header depends on metadata order, which is unknowable.
    return model.hexdigest(), legacy.hexdigest()[:8] if window_start >= 0 else None


def keeps_source_tensors(adapters: AdapterSet, tensors: list[tuple[str, TensorData]]) -> bool:
    """Whether `tensors` are exactly the source file's tensors (same names, each copied from its own
    bytes): then a hash of the source that cannot be recomputed (LyCORIS hashes in an order the file
    does not keep) still holds. Header only."""
    from pathlib import Path

    from loraformats.errors import LoraFormatsError
    from loraformats.header import read_header
    from loraformats.tensors import FileTensor, ReshapedTensor

    source = Path(adapters.provenance.path)
    try:
        header = read_header(source) if source.is_file() else None
    except (LoraFormatsError, OSError):
        header = None
    if header is None or {name for name, _ in tensors} != set(header.tensors):
        return False
    for name, tensor in tensors:
        base, info = tensor, header.tensors[name]
        while isinstance(base, ReshapedTensor):
            base = base.base
        same_shape = (tensor.dtype, tuple(tensor.shape)) == (info[0], tuple(info[1]))
        if not isinstance(base, FileTensor) or not same_shape:
            return False
        try:
            same_file = base.source.path.samefile(source)
        except OSError:  # e.g. a temporary copy of a pickled input, already removed
            return False
        if base.offset != header.data_start + info.start or not same_file:
            return False
    return True


#: Where LyCORIS's LoCon module puts each tensor in its state dict (`LoConModule.custom_state_dict`).
LOCON_ORDER = {"dora_scale": 0, "alpha": 1, "lora_up.weight": 2, "lora_down.weight": 3, "lora_mid.weight": 4}


def lycoris_model_hash(
    tensors: list[tuple[str, TensorData]], suffix_order: Callable[[set[str]], dict[str, int]] | None = None
) -> str:
    """LyCORIS's `sshs_model_hash`: "0x" + SHA-256 of every tensor's bytes in its network's state-dict
    order: text encoders (by slot) then the denoiser, modules in model order (as `tensors` are written),
    each module's tensors in its algorithm's order (`suffix_order`, LoCon's by default). For a network
    LyCORIS built on the same model classes as the family tables, this is the hash LyCORIS writes."""
    import hashlib

    modules: dict[str, list[tuple[str, TensorData]]] = {}
    for name, tensor in tensors:
        stem, _, suffix = name.partition(".")
        modules.setdefault(stem, []).append((suffix, tensor))

    def component(stem: str) -> tuple[int, int]:
        found = re.match(r"lora_te(\d?)_", stem)
        return (0, int(found[1] or 0)) if found else (1, 0)

    digest = hashlib.sha256()
    for stem in sorted(modules, key=component):  # stable: model order within a component
        entries = modules[stem]
        rank = (suffix_order or (lambda _: LOCON_ORDER))({suffix for suffix, _ in entries})
        for _, tensor in sorted(entries, key=lambda entry: rank.get(entry[0], len(rank))):
            digest.update(tensor.read_bytes())
    return f"0x{digest.hexdigest()}"
