"""Every installed format passes the conformance checks in `loraformats.testing`."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraformats.plugins import registry
from loraformats.testing import check_format

EXAMPLE = Path(__file__).parents[1] / "examples" / "sd15_tiny_kohya.safetensors"
WRITABLE = [name for name, fmt in registry.formats().items() if fmt.writable]


@pytest.mark.parametrize("format_name", WRITABLE)
def test_format_round_trips_through_the_canonical_form(format_name, tmp_path):
    check_format(format_name, EXAMPLE, tmp_path)


def test_a_format_that_drops_a_tensor_fails_conformance(tmp_path, monkeypatch):
    from loraformats_kohya.format import KohyaFormat

    original = KohyaFormat.encode

    def drop_one(self, adapters, options):
        encoded = original(self, adapters, options)
        encoded.tensors = [t for t in encoded.tensors if not t[0].endswith("attn1_to_q.lora_up.weight")]
        return encoded

    monkeypatch.setattr(KohyaFormat, "encode", drop_one)
    with pytest.raises(Exception, match=r"needs both|differ"):
        check_format("kohya", EXAMPLE, tmp_path)
