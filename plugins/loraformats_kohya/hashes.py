"""sd-scripts' `sshs_model_hash` and `sshs_legacy_hash`, computed without torch or a second file.

sd-scripts serialises the final tensors with safetensors (only `ss_*` metadata in that header)
and hashes (a) every byte after the header, (b) 64 KiB at offset 1 MiB of the whole buffer.
safetensors orders tensors by dtype (descending, in its own enum order), then by name.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

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
