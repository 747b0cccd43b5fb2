"""Issue acceptance (4): `--rank N` / `--max-error E` compress to a valid LoRA and report the error they made.

The stated errors (per module and overall, relative Frobenius) must equal the ones measured here
independently: the source's and the output's changes, each computed in float64 from the files.
Without either flag no lossy step is ever taken.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

import loraformats
from lora_factory import make_kohya
from loraformats.cli import main
from loraformats.planning import plan
from loraformats.plugins import registry
from test_lycoris_files import build, lycoris_plugin, quiet_lycoris  # noqa: F401 (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def measured(source, output, family: str) -> tuple[dict[str, float], float]:
    """Per-module relative error of `output` against `source` and the overall one (float64, dense)."""
    with loraformats.load(source, family=family) as a, loraformats.load(output, family=family) as b:
        errors, total_error, total_norm = {}, 0.0, 0.0
        for key, adapter in a.modules.items():
            layer = a.layer(key)
            change = adapter.delta(layer)
            other = b.modules[key].delta(layer)
            error, norm = float((change - other).norm()), float(change.norm())
            errors[f"{key[0]}:{key[1]}"] = error / norm
            total_error += error**2
            total_norm += norm**2
        return errors, (total_error / total_norm) ** 0.5


def stated_overall(report) -> float:
    step = next(step for step in report.steps if step.name == "svd-compress")
    return float(re.search(r"relative error ([0-9.e+-]+) overall", step.detail)[1])


@pytest.mark.parametrize("case", ["loha", "lokr-factor", "loha-tucker"])
def test_rank_compresses_lycoris_files_and_states_the_error_it_made(tmp_path, case):
    path, _ = build(tmp_path, case)
    output = tmp_path / "diffusers.safetensors"
    report = loraformats.convert(path, "diffusers", output, family="tiny-sd1", rank=2)

    assert report.exactness == "approximate"
    with loraformats.load(output, family="tiny-sd1") as written:
        assert {m.algorithm for m in written.modules.values()} == {"lora"}
        assert max(m.rank for m in written.modules.values()) <= 2
    errors, overall = measured(path, output, "tiny-sd1")
    assert stated_overall(report) == pytest.approx(overall, rel=1e-5)
    approximation = getattr(report, "approximation", None)  # a ConversionReport field once declared
    if approximation is not None:
        for module, error in errors.items():
            assert approximation.modules[module].relative_error == pytest.approx(error, rel=1e-9, abs=1e-12)


def test_plan_reports_every_module_and_the_overall_error(tmp_path):
    path, _ = build(tmp_path, "lokr-decompose-both")
    with loraformats.load(path, family="tiny-sd1") as adapters:
        result = plan(adapters, registry.formats()["kohya"], registry.transforms(), rank=3)
        output = tmp_path / "out.safetensors"
        from loraformats.writer import write_safetensors

        encoded = registry.formats()["kohya"].encode(result.adapters, None)
        write_safetensors(output, encoded.tensors, encoded.metadata)
    errors, overall = measured(path, output, "tiny-sd1")
    assert result.approximation.relative_error == pytest.approx(overall, rel=1e-9)
    assert set(result.approximation.modules) == set(errors)
    for module, error in errors.items():
        stated = result.approximation.modules[module]
        assert stated.relative_error == pytest.approx(error, rel=1e-9, abs=1e-12) and stated.rank <= 3


def test_max_error_picks_the_least_rank_within_the_bound(tmp_path):
    path, _ = build(tmp_path, "loha")
    output = tmp_path / "out.safetensors"
    report = loraformats.convert(path, "kohya", output, family="tiny-sd1", max_error=0.2)
    errors, _ = measured(path, output, "tiny-sd1")
    assert max(errors.values()) <= 0.2
    with loraformats.load(output, family="tiny-sd1") as written, loraformats.load(path) as a:
        for key, lora in written.modules.items():
            if lora.rank > 1:  # one rank less would break the bound: the rank is the least
                from loraformats.adapters.svd import truncate

                cut = truncate(a.modules[key], a.layer(key), lora.rank - 1, None)
                assert cut.relative_error > 0.2
    assert report.exactness == "approximate"


def test_rank_on_a_lora_keeps_modules_already_small_enough(tmp_path):
    source = tmp_path / "kohya.safetensors"
    make_kohya(source, "tiny-sd1", rank=(4, 8), dtype=torch.float32, tucker=False, seed=3)
    output = tmp_path / "out.safetensors"
    report = loraformats.convert(source, "kohya", output, family="tiny-sd1", rank=4)
    errors, _ = measured(source, output, "tiny-sd1")
    with loraformats.load(source, family="tiny-sd1") as a:
        small = [f"{c}:{p}" for (c, p), m in a.modules.items() if m.rank <= 4]
    assert small and all(errors[name] < 1e-7 for name in small)  # kept (or re-rounded): no loss
    step = next(step for step in report.steps if step.name == "svd-compress")
    assert step.modules == len(errors) - len(small)


def test_cli_rank_and_json_report(tmp_path, capsys):
    path, _ = build(tmp_path, "lokr-factor")
    output = tmp_path / "out.safetensors"
    arguments = ["convert", str(path), "--to", "kohya", "-o", str(output), "--family", "tiny-sd1"]
    assert main([*arguments, "--rank", "2", "--report", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["exactness"] == "approximate"
    steps = {step["name"]: step["exactness"] for step in report["steps"]}
    assert steps["svd-compress"] == "approximate"


def test_without_a_rank_no_lossy_step_is_taken(tmp_path):
    path, _ = build(tmp_path, "loha")
    report = loraformats.convert(path, "diffusers", tmp_path / "out.safetensors", family="tiny-sd1")
    assert all(step.exactness != "approximate" for step in report.steps)


def test_a_real_size_lora_compresses_with_the_randomised_svd(tmp_path):
    """A rank-64 LoRA on every attention and feed-forward module of the real SDXL UNet table (700 modules)."""
    from safetensors.torch import save_file

    family = registry.families()["sdxl"]
    component = family.components["unet"]
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    targets = re.compile(r"(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2))$")
    for path, layer in component.modules.items():
        if layer.kind != "linear" or not targets.search(path):
            continue
        stem = "lora_unet_" + component.name_in(path, component.flat_naming).replace(".", "_")
        tensors[f"{stem}.lora_down.weight"] = torch.randn(64, layer.in_features, generator=generator).half()
        tensors[f"{stem}.lora_up.weight"] = torch.randn(layer.out_features, 64, generator=generator).half()
    source = tmp_path / "big.safetensors"
    save_file(tensors, str(source))
    # Timing is for the benchmarks, not the tests: this checks the randomised SVD path on real sizes.
    report = loraformats.convert(source, "kohya", tmp_path / "small.safetensors", family="sdxl", rank=8)
    assert report.modules == len(tensors) // 2 and report.exactness == "approximate"
