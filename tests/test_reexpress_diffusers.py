"""Issue acceptance (2): LoHa and LoKr files re-expressed as plain LoRA load in diffusers and fuse exactly.

diffusers' `load_lora_weights` holds only LoRA, so `convert(..., "diffusers")` re-expresses every LoHa
(face-splitting / Khatri–Rao products) and LoKr (Kronecker products of the factor pairs) module exactly
as a LoRA, in float32. The files are LyCORIS's own (see test_lycoris_files.py); a fresh tiny pipeline
loads the output, `fuse_lora` merges it, and W' - W of every module must equal LyCORIS's forward-pass
change (relative Frobenius error <= 1e-5 in the fp32 pipeline), with the same modules changed.
"""

from __future__ import annotations

import pytest

import loraformats
from lora_factory import changed, relative_errors, worst
from test_consumer_diffusers import apply_in_diffusers, quiet_lora_loading  # noqa: F401 (fixture)
from test_lycoris_files import build, lycoris_changes, lycoris_plugin, module_keys, quiet_lycoris  # noqa: F401

LIMIT = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # the tiny pipelines' scheduler config

CASES = ["loha", "loha-tucker", "lokr-factor", "lokr-decompose-both", "lokr-full-matrix", "lokr-tucker"]


@pytest.mark.parametrize("case", CASES)
def test_loha_and_lokr_fuse_in_diffusers_as_their_forward_pass(tmp_path, case):
    path, network = build(tmp_path, case)
    output = tmp_path / "diffusers.safetensors"
    report = loraformats.convert(path, "diffusers", output, family="tiny-sd1")

    names = {"loha": "loha-to-lora", "lokr": "lokr-to-lora"}
    taken = [step.name for step in report.steps if step.stage == "transform"]
    assert names[case.split("-")[0]] in taken and report.exactness == "rounded", report.steps
    keys = module_keys(path, "tiny-sd1")
    forward = lycoris_changes(network)
    expected = {keys[stem]: change for stem, change in forward.items()}

    changes, counts = apply_in_diffusers("tiny-sd1", output)

    assert changed(changes) == set(expected)
    assert sum(counts.values()) == len(expected)
    assert not worst(relative_errors(expected, changes), LIMIT)
