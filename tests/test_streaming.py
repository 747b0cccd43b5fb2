"""Rename-only conversions copy byte ranges and never import torch; conversions that set no option
and print no JSON never import pydantic either (it costs more start-up than the rest)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from safetensors.torch import load_file, save_file


def test_rename_only_conversion_does_not_import_torch_or_pydantic(tmp_path):
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
        print("torch" in sys.modules, "pydantic" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False False"
    round_trip = load_file(tmp_path / "k.safetensors")
    assert round_trip.keys() == tensors.keys()
    assert all(round_trip[k].dtype == tensors[k].dtype and round_trip[k].equal(tensors[k]) for k in tensors)


def flux_kohya(path) -> None:
    """A small sd-scripts-style FLUX.1 file (production names and widths, rank 2, scale 1): fused
    q/k/v and linear1, a 1:1 module and the shift/scale-swapped final adaLN."""
    import torch

    from loraformats.plugins import registry

    component = registry.families()["flux1"].components["transformer"]
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for path_ in (
        "transformer_blocks.0.attn.to_qkv",
        "transformer_blocks.0.attn.to_out.0",
        "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
        "norm_out.linear",
    ):
        layer = component.modules[path_]
        stem = "lora_unet_" + component.name_in(path_, "bfl").replace(".", "_")
        tensors[f"{stem}.lora_down.weight"] = torch.randn(
            2, layer.in_features, generator=generator
        ).bfloat16()
        tensors[f"{stem}.lora_up.weight"] = torch.randn(layer.out_features, 2, generator=generator).bfloat16()
        tensors[f"{stem}.alpha"] = torch.tensor(2.0).bfloat16()
    save_file(tensors, path, metadata={"ss_network_module": "networks.lora_flux"})


def test_flux_split_fuse_and_reorder_do_not_import_torch_or_pydantic(tmp_path):
    source = tmp_path / "flux.safetensors"
    flux_kohya(source)
    diffusers, kohya, comfy = (str(tmp_path / f"{n}.safetensors") for n in ("d", "k", "c"))
    code = textwrap.dedent(f"""
        import sys, loraformats
        split = loraformats.convert({str(source)!r}, "diffusers", {diffusers!r})
        fused = loraformats.convert({diffusers!r}, "kohya", {kohya!r})
        comfy = loraformats.convert({kohya!r}, "comfyui", {comfy!r})
        assert {{r.exactness.value for r in (split, fused, comfy)}} == {{"identical"}}, (split, fused, comfy)
        assert "split" in [s.name for s in split.steps] and "fuse (shared)" in [s.name for s in fused.steps]
        print("torch" in sys.modules, "pydantic" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False False"
    original, back = load_file(source), load_file(kohya)
    assert original.keys() == back.keys()
    assert all(original[k].dtype == back[k].dtype and original[k].equal(back[k]) for k in original)


def test_detect_inspect_formats_and_help_do_not_import_torch(tmp_path):
    source = tmp_path / "flux.safetensors"
    flux_kohya(source)
    for command in (["detect", str(source)], ["inspect", str(source)], ["formats"], ["--help"]):
        code = textwrap.dedent(f"""
            import contextlib, io, sys
            from loraformats.cli import main
            with contextlib.redirect_stdout(io.StringIO()) as out:
                try:
                    code = main({command!r})
                except SystemExit as done:  # --help exits
                    code = done.code
            assert code == 0, (code, out.getvalue())
            assert "flux1" in out.getvalue() or {command!r}[0] not in ("detect", "inspect")
            print("torch" in sys.modules)
        """)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (command, done.stderr)
        assert done.stdout.strip() == "False", command


def _file_tensors(path, rows: list[tuple[int, int]], seed: int = 0):
    """bf16-sized blocks written back to back into `path`, as FileTensors (plus their bytes)."""
    import numpy as np

    from loraformats.tensors import FileTensor, SourceFile

    rng = np.random.default_rng(seed)
    blobs = [rng.integers(0, 256, r * c * 2, dtype=np.uint8).tobytes() for r, c in rows]
    path.write_bytes(b"".join(blobs))
    source, offset, tensors = SourceFile(path), 0, []
    for (r, c), blob in zip(rows, blobs, strict=True):
        tensors.append(FileTensor(source, offset, "BF16", (r, c)))
        offset += len(blob)
    return source, tensors, blobs


@pytest.mark.parametrize("band", [1 << 18, 40, 1])  # one piece per block; a few rows; one row
def test_block_diagonal_of_file_blocks_matches_numpy(tmp_path, monkeypatch, band):
    import numpy as np

    from loraformats import tensors
    from loraformats.tensors import BlockDiagonal, ComputedTensor

    monkeypatch.setattr(tensors, "_BAND", band)
    source, blocks, blobs = _file_tensors(tmp_path / "blocks.bin", [(5, 2), (3, 4), (7, 1)])
    computed, calls = blocks[1], []  # a block that must be produced: once per write, whatever the band

    def compute():
        calls.append(1)
        return computed.to_torch()

    blocks[1] = ComputedTensor(compute, computed.dtype, computed.shape)
    diagonal = BlockDiagonal(blocks)
    expected = np.zeros((15, 7 * 2), dtype=np.uint8)
    row = col = 0
    for (r, c), blob in zip([(5, 2), (3, 4), (7, 1)], blobs, strict=True):
        expected[row : row + r, col : col + c * 2] = np.frombuffer(blob, np.uint8).reshape(r, c * 2)
        row, col = row + r, col + c * 2
    out = tmp_path / "out.bin"
    with open(out, "wb") as file:
        diagonal.write_to(file.fileno())
    assert out.read_bytes() == diagonal.read_bytes() == expected.tobytes()
    assert len(calls) == 2  # once for write_to, once for read_bytes
    source.close()


def test_block_diagonal_of_a_truncated_source_is_refused(tmp_path):
    import os

    import pytest

    from loraformats.tensors import BlockDiagonal

    source, blocks, _ = _file_tensors(tmp_path / "blocks.bin", [(4, 2), (4, 2)])
    os.truncate(tmp_path / "blocks.bin", 20)
    assert blocks[0].read_into(memoryview(bytearray(64))) == 16
    with open(tmp_path / "out.bin", "wb") as file, pytest.raises(ValueError, match="ended early"):
        BlockDiagonal(blocks).write_to(file.fileno())
    source.close()


def test_same_bytes_compares_file_tensors_piece_by_piece(tmp_path):
    from loraformats.tensors import _COMPARE, FileTensor, SourceFile

    rows = [(300, 128), (300, 128)]
    source, (a, b), blobs = _file_tensors(tmp_path / "x.bin", rows)
    assert a.nbytes > _COMPARE and a.nbytes % _COMPARE  # several pieces, the last one partial
    (tmp_path / "copy.bin").write_bytes(blobs[0])
    (tmp_path / "last.bin").write_bytes(blobs[0][:-1] + bytes([blobs[0][-1] ^ 1]))  # last byte differs
    copy, last = SourceFile(tmp_path / "copy.bin"), SourceFile(tmp_path / "last.bin")
    twin, near = FileTensor(copy, 0, "BF16", (300, 128)), FileTensor(last, 0, "BF16", (300, 128))
    assert a.same_bytes(a) and a.same_bytes(twin) and twin.same_bytes(a)
    assert not a.same_bytes(b) and not a.same_bytes(near) and not a.same_bytes(twin.reshaped((128, 300)))
    for handle in (source, copy, last):
        handle.close()


def test_inputs_that_cannot_be_mapped_are_copied_another_way(tmp_path, monkeypatch):
    """A file system without mmap: each tensor is copied with copy_file_range (or pread + write)."""
    import mmap

    import loraformats

    def refuse(*args, **kwargs):
        raise OSError(19, "No such device")

    monkeypatch.setattr(mmap, "mmap", refuse)
    mapped = loraformats.convert(
        "examples/sd15_tiny_kohya.safetensors", "diffusers", tmp_path / "a.safetensors"
    )
    monkeypatch.undo()
    loraformats.convert("examples/sd15_tiny_kohya.safetensors", "diffusers", tmp_path / "b.safetensors")
    assert mapped.bytes_written > 0
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_the_value_scan_thread_yields_the_cpu_and_only_it():
    import os
    import threading

    from loraformats.conversion import _yield_cpu

    seen = []

    def probe():
        me = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, me)
        _yield_cpu()
        seen.append((before, os.getpriority(os.PRIO_PROCESS, me)))

    main_before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    helper = threading.Thread(target=probe)
    helper.start()
    helper.join()
    assert seen == [(seen[0][0], min(19, seen[0][0] + 2))]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_before


@pytest.mark.parametrize(
    ("target", "flag"), [("diffusers", []), ("diffusers", ["--fsync"]), ("peft", ["--fsync"])]
)
def test_the_output_is_flushed_to_the_device_only_on_request(tmp_path, monkeypatch, target, flag):
    """--fsync: every file written, then the directories they were renamed in."""
    import os

    from loraformats.cli import main

    real_fsync, calls = os.fsync, []
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd))[1])
    output = tmp_path / "out"
    source = "examples/sd15_tiny_kohya.safetensors"
    assert main(["convert", source, "--to", target, "-o", str(output), *flag]) == 0
    if not flag:
        assert calls == []
    elif output.is_dir():  # each file, the directories holding them, the parent of the output
        assert len(calls) > sum(1 for p in output.rglob("*") if p.is_file()) + 1
    else:  # the file, then its directory
        assert len(calls) == 2
