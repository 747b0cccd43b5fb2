"""The safetensors header is validated before any use; each violation is one clear error."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from loraformats.errors import InvalidFileError
from loraformats.header import read_header


def write_raw(path, header: dict | bytes, data: bytes = b"") -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_reads_what_safetensors_writes(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.float16)}, path, metadata={"k": "v"})
    header = read_header(path)
    assert header.metadata == {"k": "v"}
    assert header.tensors["a"].shape == (2, 3) and header.tensors["a"].dtype == "F32"
    assert header.tensors["b"].nbytes == 8


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BAD_HEADERS = {
    "not json": (b"{not json", b"", "not valid JSON"),
    "not an object": (b"[1, 2]", b"", "not an object"),
    "non-string metadata": ({"__metadata__": {"a": 1}}, b"", "strings to strings"),
    "unknown dtype": ({"t": entry(dtype="F13")}, b"\0" * 8, "unknown dtype"),
    "negative shape": ({"t": entry(shape=(-2,))}, b"\0" * 8, "non-negative"),
    "bool shape": ({"t": entry(shape=(True,), offsets=(0, 4))}, b"\0" * 4, "non-negative"),
    "size mismatch": ({"t": entry(shape=(3,))}, b"\0" * 8, "needs 12 bytes"),
    "reversed offsets": ({"t": entry(offsets=(8, 0))}, b"\0" * 8, "data_offsets"),
    "out of range": ({"t": entry(offsets=(8, 16))}, b"\0" * 8, "gap"),
    "beyond the end": ({"t": entry(offsets=(0, 8))}, b"\0" * 4, "data section has 4"),
    "overlap": ({"t": entry(), "u": entry(offsets=(4, 12))}, b"\0" * 12, "overlaps"),
    "trailing bytes": ({"t": entry()}, b"\0" * 12, "trailing bytes"),
    "extra field": ({"t": {**entry(), "x": 1}}, b"\0" * 8, "exactly dtype"),
}


@pytest.mark.parametrize("case", BAD_HEADERS, ids=list(BAD_HEADERS))
def test_malformed_headers_are_named(tmp_path, case):
    header, data, message = BAD_HEADERS[case]
    path = tmp_path / "bad.safetensors"
    write_raw(path, header, data)
    with pytest.raises(InvalidFileError, match=message) as raised:
        read_header(path)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_duplicate_names_are_refused(tmp_path):
    path = tmp_path / "dup.safetensors"
    raw = f'{{"t": {json.dumps(entry())}, "t": {json.dumps(entry())}}}'.encode()
    write_raw(path, raw, b"\0" * 8)
    with pytest.raises(InvalidFileError, match="twice"):
        read_header(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x10\x00")
    with pytest.raises(InvalidFileError, match="too short"):
        read_header(path)


def test_header_length_beyond_file(tmp_path):
    path = tmp_path / "lie.safetensors"
    path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(InvalidFileError, match="exceeds the file size"):
        read_header(path)


def test_huge_header_length_is_capped(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(InvalidFileError, match="100 MB cap"):
        read_header(path)


def test_pickles_are_named_as_such(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"a": torch.zeros(2)}, path)
    with pytest.raises(InvalidFileError, match="zip archive"):
        read_header(path)


def test_directory_and_missing_path(tmp_path):
    with pytest.raises(InvalidFileError, match="directory"):
        read_header(tmp_path)
    with pytest.raises(InvalidFileError, match="no such file"):
        read_header(tmp_path / "missing.safetensors")
