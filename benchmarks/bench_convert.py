"""Conversion speed and memory, side by side with the alternatives, in one run.

    python benchmarks/bench_convert.py [--repeats 5] [--workdir /dev/shm/lf-bench]

Generates realistic-size Kohya SDXL LoRAs (real module names and shapes: UNet attention blocks and
both text encoders, fp16) and times, alternating the methods within each round, then reports medians:

- `cp` of the file (the physical floor),
- a naive `safetensors` `load_file` + `save_file` (every tool that "just re-saves"),
- diffusers' own conversion (`lora_state_dict` + `save_file`), what a user would otherwise run,
- `loraformats convert --to diffusers`.

Wall time includes interpreter start-up for every Python method. Peak anonymous memory (RssAnon,
which excludes the file-backed pages of a memory map) is sampled from /proc while each runs.
Outputs go to tmpfs by default, as in the reference measurements.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

NAIVE = (
    "import sys; from safetensors.torch import load_file, save_file;"
    "save_file(load_file(sys.argv[1]), sys.argv[2])"
)
DIFFUSERS = (
    "import sys; from safetensors.torch import save_file;"
    "from diffusers import StableDiffusionXLPipeline as P;"
    "sd, alphas = P.lora_state_dict(sys.argv[1]);"
    "save_file({k: v.contiguous() for k, v in sd.items()}, sys.argv[2])"
)


def make_sdxl(path: Path, rank: int, alpha: float) -> None:
    """A Kohya SDXL LoRA over the production module table, random fp16 factors."""
    import torch
    from safetensors.torch import save_file

    from loraformats.plugins import registry

    family = registry.families()["sdxl"]
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for component, module, layer in family.iter_modules():
        if layer.kind not in ("linear", "conv2d"):
            continue
        if component.role == "denoiser" and ".attentions." not in module:
            continue
        if component.role == "text_encoder" and ".self_attn." not in module and ".mlp." not in module:
            continue
        prefix = "lora_unet" if component.role == "denoiser" else f"lora_te{component.slot}"
        name = f"{prefix}_{component.name_in(module, component.flat_naming).replace('.', '_')}"
        kernel = tuple(layer.kernel) if layer.kind == "conv2d" else ()
        down = torch.randn((rank, layer.in_features, *kernel), generator=generator) / layer.in_features**0.5
        up = torch.randn((layer.out_features, rank, *((1, 1) if kernel else ())), generator=generator) / 8
        tensors[f"{name}.lora_down.weight"] = down.half()
        tensors[f"{name}.lora_up.weight"] = up.half()
        tensors[f"{name}.alpha"] = torch.tensor(alpha).half()
    save_file(tensors, path, metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank)})


def run(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RssAnon (bytes) of one command."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0

    def sample() -> None:
        nonlocal peak
        status = Path(f"/proc/{process.pid}/status")
        while process.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
            except OSError:
                break
            time.sleep(0.005)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    _, err = process.communicate()
    elapsed = time.perf_counter() - start
    watcher.join()
    if process.returncode:
        raise SystemExit(f"{command[0]} failed: {err.decode()[-500:]}")
    return elapsed, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", default="/dev/shm/loraformats-bench")
    parser.add_argument("--skip-diffusers", action="store_true")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    cli = [python, "-m", "loraformats", "convert"]
    cases = {
        "SDXL r32 fp16, alpha = r/2 (fold)": (32, 16.0),
        "SDXL r32 fp16, alpha = r (rename only)": (32, 32.0),
        "SDXL r256 fp16, alpha = r (rename only)": (256, 256.0),
    }
    print(f"{'case':42} {'method':22} {'median s':>9} {'x cp':>6} {'RssAnon MB':>11}")
    for label, (rank, alpha) in cases.items():
        source = work / f"sdxl_r{rank}_a{int(alpha)}.safetensors"
        if not source.exists():
            make_sdxl(source, rank, alpha)
        out = work / "out.safetensors"
        methods = {
            "cp": ["cp", str(source), str(out)],
            "load_file+save_file": [python, "-c", NAIVE, str(source), str(out)],
            "diffusers": [python, "-c", DIFFUSERS, str(source), str(out)],
            "loraformats": [*cli, str(source), "--to", "diffusers", "-o", str(out), "--force"],
        }
        if args.skip_diffusers or rank > 64:
            methods.pop("diffusers")
        times: dict[str, list[float]] = {name: [] for name in methods}
        peaks: dict[str, int] = dict.fromkeys(methods, 0)
        for _ in range(args.repeats):
            for name, command in methods.items():  # alternate, so drift hits every method alike
                elapsed, peak = run(command)
                times[name].append(elapsed)
                peaks[name] = max(peaks[name], peak)
                out.unlink(missing_ok=True)
        floor = statistics.median(times["cp"])
        size = source.stat().st_size / 1e6
        for name in methods:
            median = statistics.median(times[name])
            print(
                f"{label + f' ({size:.0f} MB)':42} {name:22} {median:9.3f} {median / floor:6.1f} "
                f"{peaks[name] / 1e6:11.0f}"
            )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
