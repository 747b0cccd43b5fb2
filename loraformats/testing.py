"""Conformance checks any format plugin can run against itself (the built-ins pass them).

from loraformats.testing import check_format
check_format("my-format", sample_lora_path, tmp_path)
"""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

from .conversion import convert, load
from .formats import ReadContext
from .header import read_header
from .plugins import registry
from .verification import compare


def check_no_data_read(format_name: str, path: str | os.PathLike) -> None:
    """`sniff` and `parse` must work from the header alone: reading tensor data fails the check."""
    fmt = registry.formats()[format_name]
    path = Path(path)

    def refuse(*args, **kwargs):
        raise AssertionError(f"{format_name} read tensor data while sniffing or parsing")

    with mock.patch("os.pread", refuse):
        if fmt.container == "directory":
            assert fmt.sniff_path(path).score >= 1.0, f"{format_name} does not recognise its own output"
            parts = fmt.parts(path, ReadContext(families=registry.families()))
        else:
            header = read_header(path)
            evidence = fmt.sniff(header)
            assert evidence.score >= 1.0, f"{format_name} does not recognise its own output: {evidence}"
            parts = [(header, fmt.parse(header))]
    for header, parsed in parts:
        claimed = {name for module in parsed.modules for name in module.tensors.values()}
        missing = set(header.tensors) - claimed - set(parsed.unsupported)
        assert not missing, f"{format_name} left tensors unclaimed: {missing}"


def check_format(format_name: str, sample: str | os.PathLike, workdir: str | os.PathLike) -> None:
    """Round trip `sample` through `format_name` and back to the canonical form, and check it.

    - the written file holds every module of the sample, and nothing else;
    - every module makes the same change to a seeded random base (within the dtype tolerance);
    - where the plan says every step was `identical`, every factor is byte-for-byte the same;
    - the format recognises its own output and claims every tensor from the header alone.
    """
    workdir = Path(workdir)
    suffix = ".safetensors" if registry.formats()[format_name].container == "file" else ""
    written = workdir / f"conformance.{format_name}{suffix}"
    report = convert(sample, format_name, written, force=True)
    check_no_data_read(format_name, written)
    with load(sample) as original, load(written, format=format_name, family=original.family.name) as back:
        assert set(back.modules) == set(original.modules), "modules differ after the round trip"
        result = compare(original, back)
        assert result.ok, f"changes differ: {result.failures[:3]}"
        if report.exactness.value == "identical":
            for key, adapter in original.modules.items():
                for role, tensor in adapter.tensors().items():
                    other = back.modules[key].tensors().get(role)
                    assert other is not None and other.read_bytes() == tensor.read_bytes(), (key, role)
