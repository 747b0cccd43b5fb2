"""Rename-only conversions copy byte ranges and never import torch; conversions that set no option
and print no JSON never import pydantic either (it costs more start-up than the rest)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

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
