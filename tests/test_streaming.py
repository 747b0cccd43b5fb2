"""Rename-only conversions copy byte ranges and never import torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from safetensors.torch import load_file, save_file


def test_rename_only_conversion_does_not_import_torch(tmp_path):
    source = tmp_path / "scale_one.safetensors"
    tensors = load_file("examples/sd15_tiny_kohya.safetensors")
    for name in [n for n in tensors if n.endswith(".alpha")]:
        rank = tensors[name.replace(".alpha", ".lora_down.weight")].shape[0]
        tensors[name] = tensors[name].new_tensor(float(rank))  # alpha = rank: scale 1, nothing to fold
    save_file(tensors, source, metadata={"ss_network_module": "networks.lora"})
    diffusers, kohya = str(tmp_path / "d.safetensors"), str(tmp_path / "k.safetensors")
    code = textwrap.dedent(f"""
        import sys, loraformats
        first = loraformats.convert({str(source)!r}, "diffusers", {diffusers!r})
        back = loraformats.convert({diffusers!r}, "kohya", {kohya!r})
        assert first.exactness.value == back.exactness.value == "identical", (first, back)
        print("torch" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    round_trip = load_file(tmp_path / "k.safetensors")
    assert round_trip.keys() == tensors.keys()
    assert all(round_trip[k].dtype == tensors[k].dtype and round_trip[k].equal(tensors[k]) for k in tensors)
