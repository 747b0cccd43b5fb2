"""Write the fuzzer's seed corpus: the hostile regular files of tests/hostile and valid LoRAs.

Valid seeds: the small Kohya LoRA of the hostile corpus (with and without metadata), the first
modules of examples/sd15_tiny_kohya.safetensors, and their diffusers and PEFT conversions. The
hostile-metadata files are left out: they trigger known bugs (see tests/test_hostile_inputs.py),
and the fuzzer is for finding new ones. FIFOs, sockets and symlinks are never seeds.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import loraformats  # noqa: E402
from hostile import make_corpus  # noqa: E402

EXAMPLE = ROOT / "examples" / "sd15_tiny_kohya.safetensors"


def example_subset(dest: Path, modules: int = 1) -> Path:
    """The first and last Kohya modules of the example (text encoder and UNet), small enough for -max_len."""
    with safe_open(EXAMPLE, framework="pt") as source:
        keys = list(source.keys())
        stems = sorted({key.split(".")[0] for key in keys})
        stems = stems[:modules] + stems[-modules:]
        tensors = {key: source.get_tensor(key) for key in keys if key.split(".")[0] in stems}
        save_file(tensors, dest, metadata=source.metadata())
    return dest


def main(directory: Path) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        for case in make_corpus.build(Path(scratch) / "hostile").values():
            if case.special:  # FIFOs, devices, sockets, loops, directories, missing paths
                continue
            shutil.copyfile(case.path, directory / f"hostile-{case.name}")
        valid = [*make_corpus.valid_seeds(Path(scratch) / "valid"), example_subset(Path(scratch) / "example")]
        for index, path in enumerate(valid):
            shutil.copyfile(path, directory / f"valid-{index}-kohya")
            loraformats.convert(
                path, "diffusers", directory / f"valid-{index}-diffusers", family="sd1", force=True
            )
            peft = Path(scratch) / f"peft-{index}"
            loraformats.convert(path, "peft", peft, family="sd1", force=True)
            for weights in sorted(peft.glob("*/adapter_model.safetensors")):
                shutil.copyfile(weights, directory / f"valid-{index}-peft-{weights.parent.name}")
    config = make_corpus._config(rank_pattern={"down_blocks\\.0.*": 1}, alpha_pattern={"to_k": 2})
    (directory / "valid-diffusers-config").write_bytes(
        make_corpus.diffusers_file({"lora_adapter_metadata": config})
    )
    print(f"{len(list(directory.iterdir()))} seeds in {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "fuzz/seeds")))
