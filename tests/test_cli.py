"""The command line: documented exit codes, one-line errors, no partial output, inputs untouched."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraformats.cli import main

EXAMPLE = Path(__file__).parents[1] / "examples" / "sd15_tiny_kohya.safetensors"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def example(tmp_path) -> Path:
    path = tmp_path / "lora.safetensors"
    shutil.copyfile(EXAMPLE, path)
    return path


def edited(example: Path, tmp_path: Path, change) -> Path:
    """A copy of the example with its tensors edited by `change(tensors)`."""
    tensors = load_file(example)
    change(tensors)
    path = tmp_path / "edited.safetensors"
    save_file(tensors, path, metadata={"ss_network_module": "networks.lora"})
    return path


def expect_refusal(capsys, args: list[str], code: int, *needles: str) -> str:
    assert main(args) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


FIRST = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"

REFUSALS = {
    "unknown module": (
        lambda t: t.update(
            {
                "lora_unet_not_a_module.lora_down.weight": torch.zeros(4, 8),
                "lora_unet_not_a_module.lora_up.weight": torch.zeros(8, 4),
            }
        ),
        4,
        "lora_unet_not_a_module",
    ),
    "LoHa module": (lambda t: t.update({f"{FIRST}.hada_w1_a": torch.zeros(320, 4)}), 4, "LoHa"),
    "input-axis DoRA": (lambda t: t.update({f"{FIRST}.dora_scale": torch.ones(1, 320)}), 4, "dora.input"),
    "bundled embedding": (
        lambda t: t.update({"bundle_emb.style.string_to_param.*": torch.zeros(1, 768)}),
        4,
        "bundle_emb",
    ),
    "unknown suffix": (lambda t: t.update({f"{FIRST}.lora_side.weight": torch.zeros(4)}), 4, "lora_side"),
    "ranks disagree": (
        lambda t: t.update({f"{FIRST}.lora_up.weight": torch.zeros(320, 3, dtype=torch.float16)}),
        3,
        "ranks disagree",
    ),
    "missing factor": (lambda t: t.pop(f"{FIRST}.lora_up.weight"), 3, "needs both"),
    "alpha not scalar": (lambda t: t.update({f"{FIRST}.alpha": torch.ones(2)}), 3, "alpha must be a scalar"),
    "wrong width": (
        lambda t: t.update({f"{FIRST}.lora_down.weight": torch.zeros(4, 321, dtype=torch.float16)}),
        4,
        "does not fit",
    ),
}


@pytest.mark.parametrize("case", REFUSALS, ids=list(REFUSALS))
def test_unconvertible_inputs_are_refused_by_name(case, example, tmp_path, capsys):
    change, code, needle = REFUSALS[case]
    source = edited(example, tmp_path, change)
    before = digest(source)
    output = tmp_path / "out.safetensors"
    expect_refusal(capsys, ["convert", str(source), "--to", "diffusers", "-o", str(output)], code, needle)
    assert not output.exists() and digest(source) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "no temporary file is left"


def test_malformed_header_exit_code(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 5) + b"{oops")
    expect_refusal(capsys, ["convert", str(bad), "--to", "diffusers"], 3, "not valid JSON")
    expect_refusal(capsys, ["detect", str(bad)], 3, "not valid JSON")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_output_equal_to_input_is_refused_even_with_force(example, capsys):
    before = digest(example)
    expect_refusal(
        capsys,
        ["convert", str(example), "--to", "kohya", "-o", str(example), "--force"],
        2,
        "overwrite the input",
    )
    link = example.with_name("link.safetensors")
    link.symlink_to(example)
    expect_refusal(
        capsys, ["convert", str(example), "--to", "kohya", "-o", str(link), "--force"], 2, "overwrite"
    )
    assert digest(example) == before


def test_existing_output_needs_force(example, tmp_path, capsys):
    output = tmp_path / "exists.safetensors"
    output.write_bytes(b"keep me")
    expect_refusal(capsys, ["convert", str(example), "--to", "diffusers", "-o", str(output)], 2, "--force")
    assert output.read_bytes() == b"keep me"
    assert main(["convert", str(example), "--to", "diffusers", "-o", str(output), "--force"]) == 0
    assert load_file(output)


def test_missing_and_directory_inputs(tmp_path, capsys):
    expect_refusal(
        capsys, ["convert", str(tmp_path / "nope.safetensors"), "--to", "kohya"], 3, "no such file"
    )
    expect_refusal(capsys, ["convert", str(tmp_path), "--to", "kohya"], 4, "directory")
    assert main(["detect", str(tmp_path), "--json"]) == 0  # "unknown" is an answer, not an error
    assert json.loads(capsys.readouterr().out)["format"] == "unknown"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_directory(example, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    expect_refusal(
        capsys, ["convert", str(example), "--to", "diffusers", "-o", str(locked / "o.safetensors")], 5
    )


def test_unwritable_output_path_is_an_io_error(example, capsys):
    expect_refusal(
        capsys, ["convert", str(example), "--to", "diffusers", "-o", "/proc/version/x.safetensors"], 5
    )


def test_unknown_format_and_bad_option(example, capsys):
    expect_refusal(capsys, ["convert", str(example), "--to", "nope"], 2, "unknown format 'nope'")
    expect_refusal(
        capsys, ["convert", str(example), "--to", "diffusers", "--set", "fold_alpha=maybe"], 2, "fold_alpha"
    )
    expect_refusal(
        capsys, ["convert", str(example), "--to", "kohya", "--set", "naming=klingon"], 2, "klingon"
    )


def test_dry_run_plans_without_writing(example, tmp_path, capsys):
    output = tmp_path / "planned.safetensors"
    assert (
        main(
            ["convert", str(example), "--to", "diffusers", "-o", str(output), "--dry-run", "--report", "json"]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["dry_run"] and report["output"] is None and not output.exists()
    assert [s["stage"] for s in report["steps"]] == ["read", "write", "write"]
    assert report["exactness"] == "exact"


def test_detect_json_names_format_and_family(example, capsys):
    assert main(["detect", str(example), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["schema_version"], result["format"], result["family"]) == (1, "kohya", "sd1")
    assert {c["name"] for c in result["components"]} == {"unet", "text_encoder"}
    assert result["algorithms"] == ["lora"]


def test_help_and_python_dash_m():
    done = subprocess.run([sys.executable, "-m", "loraformats", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "exit codes" in done.stdout
    assert main([]) == 2


class Payload:
    """Unpickling this would create a marker file: it must never happen."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickles_are_refused_and_opt_in_never_runs_code(tmp_path, capsys):
    plain = tmp_path / "lora.pt"
    torch.save(load_file(EXAMPLE), plain)
    expect_refusal(capsys, ["convert", str(plain), "--to", "diffusers"], 4, "--allow-pickle")
    expect_refusal(capsys, ["detect", str(plain)], 4, "--allow-pickle")
    marker = tmp_path / "payload-ran"
    for name in ("evil.pt", "evil.safetensors", "evil.bin"):
        evil = tmp_path / name
        torch.save({"x": Payload(marker)}, evil)
        expect_refusal(capsys, ["convert", str(evil), "--to", "diffusers"], 4, "pickle")
        expect_refusal(
            capsys, ["convert", str(evil), "--to", "diffusers", "--allow-pickle"], 3, "weights_only"
        )
    assert not marker.exists()
    output = tmp_path / "from_pickle.safetensors"
    assert main(["convert", str(plain), "--to", "diffusers", "-o", str(output), "--allow-pickle"]) == 0
    assert main(["verify", str(EXAMPLE), str(output)]) == 0
