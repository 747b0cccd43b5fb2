"""Properties of header parsing and of the readers behind it, over generated and mutated inputs.

Whatever the bytes, parsing either returns a header or raises `InvalidFileError`; whatever a valid
file is mutated into, `detect`, `load` and `convert` either succeed or raise a `LoraFormatsError`.
Valid headers mean the same to us as to the safetensors library, in both directions.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save

import loraformats
from hostile import make_corpus
from loraformats.errors import InvalidFileError, LoraFormatsError
from loraformats.header import DTYPE_SIZES, Header, parse_header, read_header
from loraformats.tensors import MemoryTensor
from loraformats.validation import scan_nonfinite
from loraformats.writer import write_safetensors

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One directory per test module: hypothesis runs many examples per test function."""
    return tmp_path_factory.mktemp("properties")


def parses_or_refuses(raw: bytes, data_size: int | None = None) -> Header | None:
    try:
        return parse_header(raw, data_size=data_size)
    except InvalidFileError:
        return None


# ------------------------------------------------------------------------------ arbitrary input

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**62, max_value=2**130)
    | st.floats()
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from([*DTYPE_SIZES, "F13", ""]) | json_values,
        "shape": st.lists(st.integers(min_value=-2, max_value=2**64), max_size=4) | json_values,
        "data_offsets": st.lists(st.integers(min_value=-2, max_value=2**64), max_size=3) | json_values,
        "extra": json_values,
    },
)
headers = st.dictionaries(
    st.text(max_size=10) | st.just("__metadata__"),
    entries | json_values,
    max_size=5,
)


@SETTINGS
@given(raw=st.binary(max_size=512), data_size=st.none() | st.integers(min_value=0, max_value=2**40))
def test_any_bytes_parse_or_raise_invalid_file(raw, data_size):
    parses_or_refuses(raw, data_size)


@SETTINGS
@given(doc=headers, data_size=st.none() | st.integers(min_value=0, max_value=64))
def test_header_shaped_json_parses_or_raises_invalid_file(doc, data_size):
    header = parses_or_refuses(json.dumps(doc).encode(), data_size)
    if header is not None:
        for info in header.tensors.values():
            assert 0 <= info.start <= info.end and info.nbytes == info.end - info.start
            assert data_size is None or info.end <= data_size


@SETTINGS
@given(
    length=st.none() | st.integers(min_value=0, max_value=2**64 - 1),
    body=st.binary(max_size=256) | headers.map(lambda doc: json.dumps(doc).encode()),
    data=st.binary(max_size=64),
)
def test_any_file_reads_or_raises_invalid_file(scratch, length, body, data):
    path = scratch / "any.safetensors"
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    try:
        read_header(path)
    except InvalidFileError as error:
        assert "\n" not in str(error)


# --------------------------------------------------------------- agreement with the safetensors library

names = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1, max_size=12).filter(
    lambda name: name != "__metadata__"
)
shapes = st.lists(st.integers(min_value=0, max_value=5), max_size=3).map(tuple)
tensor_specs = st.dictionaries(names, st.tuples(st.sampled_from(sorted(TORCH_DTYPES)), shapes), max_size=6)
metadata_dicts = st.dictionaries(st.text(max_size=8), st.text(max_size=16), max_size=3)


def random_tensor(dtype: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random bytes (any bit pattern, NaNs included) viewed as `dtype`."""
    size = math.prod(shape) * DTYPE_SIZES[dtype]
    raw = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return raw.view(TORCH_DTYPES[dtype]).reshape(shape)


def raw_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@SETTINGS
@given(specs=tensor_specs, metadata=metadata_dicts, seed=st.integers(0, 2**16))
def test_what_safetensors_writes_reads_the_same(scratch, specs, metadata, seed):
    tensors = {name: random_tensor(dtype, shape, seed) for name, (dtype, shape) in specs.items()}
    path = scratch / "theirs.safetensors"
    path.write_bytes(save(tensors, metadata=metadata or None))
    header = read_header(path)
    assert header.metadata == metadata and set(header.tensors) == set(tensors)
    raw = path.read_bytes()
    for name, tensor in tensors.items():
        info = header.tensors[name]
        assert (info.dtype, info.shape) == (specs[name][0], tuple(tensor.shape))
        assert raw[header.data_start + info.start : header.data_start + info.end] == raw_bytes(tensor)


@SETTINGS
@given(specs=tensor_specs, metadata=metadata_dicts, seed=st.integers(0, 2**16))
def test_what_we_write_safetensors_reads_the_same(scratch, specs, metadata, seed):
    tensors = {name: random_tensor(dtype, shape, seed) for name, (dtype, shape) in specs.items()}
    ours = [(name, MemoryTensor.from_torch(tensor.contiguous())) for name, tensor in tensors.items()]
    path = scratch / "ours.safetensors"
    write_safetensors(path, ours, metadata, overwrite=True)
    with safe_open(path, framework="pt") as theirs:
        assert (theirs.metadata() or {}) == metadata and set(theirs.keys()) == set(tensors)
        for name, tensor in tensors.items():
            loaded = theirs.get_tensor(name)
            assert loaded.dtype == tensor.dtype and loaded.shape == tensor.shape
            assert raw_bytes(loaded) == raw_bytes(tensor)
    assert read_header(path).tensors.keys() == tensors.keys()


# -------------------------------------------------------------------- mutated valid files, end to end


@pytest.fixture(scope="module")
def seeds(scratch) -> list[bytes]:
    """Valid LoRAs: Kohya with and without metadata, and their diffusers conversion."""
    paths = make_corpus.valid_seeds(scratch / "seeds")
    converted = scratch / "seeds" / "valid.diffusers.safetensors"
    loraformats.convert(paths[1], "diffusers", converted)
    return [path.read_bytes() for path in [*paths, converted]]


def replace_in_header(data: bytes, pick: int, value: object) -> bytes:
    """Set one field of one tensor entry (or the metadata) of a valid file to `value`."""
    (n,) = struct.unpack("<Q", data[:8])
    doc = json.loads(data[8 : 8 + n])
    key = sorted(doc)[pick % len(doc)]
    if isinstance(doc[key], dict) and doc[key] and key != "__metadata__":
        field = sorted(doc[key])[pick % len(doc[key])]
        doc[key][field] = value
    else:
        doc[key] = value
    raw = json.dumps(doc).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    kind = draw(st.sampled_from(["flip", "truncate", "splice", "length", "field"]))
    if kind == "field":
        return replace_in_header(bytes(data), draw(st.integers(0, 100)), draw(json_values))
    at = draw(st.integers(0, len(data)))
    if kind == "flip":
        for position in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
            data[position] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        del data[at:]
    elif kind == "splice":
        data[at:at] = draw(st.binary(min_size=1, max_size=16))
    else:
        data[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
    return bytes(data)


@SETTINGS
@given(data=st.data(), target=st.sampled_from(["diffusers", "kohya", "peft"]))
def test_mutated_valid_files_fail_only_with_loraformats_errors(scratch, seeds, data, target):
    work = scratch / "mutated"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    path = work / "input.safetensors"
    content = data.draw(mutated(seeds))
    path.write_bytes(content)
    steps = {
        "detect": lambda: loraformats.detect(path),
        "load": lambda: touch_every_tensor(path),
        "convert": lambda: loraformats.convert(path, target, work / "output"),
    }
    for name, step in steps.items():
        try:
            step()
            event(f"{name} succeeded")
        except LoraFormatsError as error:
            assert "\n" not in str(error), error
            event(f"{name} refused: {type(error).__name__}")
    assert path.read_bytes() == content
    assert not [p.name for p in work.iterdir() if p.name.startswith(".")], "no temporary file is left"


def touch_every_tensor(path: Path) -> None:
    with loraformats.load(path) as adapters:
        for adapter in adapters.modules.values():
            for tensor in adapter.tensors().values():
                assert len(tensor.read_bytes()) == tensor.nbytes
        scan_nonfinite(adapters)


def test_mutation_seeds_are_valid(seeds, scratch):
    for index, content in enumerate(seeds):
        path = scratch / f"seed{index}.safetensors"
        path.write_bytes(content)
        assert loraformats.detect(path).family == "sd1"
        os.remove(path)


# ------------------------------------------------------------------------------ the batch checks

near_entries = st.builds(
    lambda dtype, shape, start, slack, flip: {
        "dtype": dtype,
        "shape": [True if flip and i == 0 else d for i, d in enumerate(shape)],
        "data_offsets": [start, start + math.prod(shape) * DTYPE_SIZES.get(dtype, 1) + slack],
    },
    st.sampled_from([*DTYPE_SIZES, "F13"]),
    st.lists(st.integers(min_value=-1, max_value=4), max_size=3),
    st.integers(min_value=-1, max_value=64),
    st.sampled_from([0, 0, 0, 1, -1]),
    st.booleans(),
)


@SETTINGS
@given(doc=st.dictionaries(st.text(max_size=6), near_entries | entries | json_values, max_size=6))
def test_the_batch_entry_check_accepts_only_what_the_entry_by_entry_check_accepts(doc):
    """`parse_header` checks all entries at once and falls back to one entry at a time to name a
    culprit: whatever the batch accepts, the careful check accepts with the same result."""
    from loraformats.header import _tensor_info, _tensor_infos

    batch = _tensor_infos(doc)
    if batch is not None:
        assert batch == {name: _tensor_info(name, entry) for name, entry in doc.items()}
        assert all(type(v) is int for info in batch.values() for v in (*info.shape, info.start, info.end))


@SETTINGS
@given(
    spans=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 8)), max_size=6),
    data_size=st.none() | st.integers(0, 64),
)
def test_the_tiling_shortcut_never_accepts_a_layout_the_full_check_refuses(spans, data_size):
    from loraformats.header import TensorInfo, _check_layout, _tiles

    tensors = {f"t{i}": TensorInfo("U8", (n,), start, start + n) for i, (start, n) in enumerate(spans)}
    if _tiles(tensors, data_size):
        _check_layout(tensors, data_size)  # raises if the shortcut was wrong
