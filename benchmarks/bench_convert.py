"""Conversion speed and memory, side by side with the alternatives, in one run.

    python benchmarks/bench_convert.py [--repeats 5] [--workdir /dev/shm/lf-bench] [--only sdxl|flux]

Generates realistic-size LoRAs with the real module names and shapes -- Kohya SDXL (UNet attention
blocks and both text encoders, fp16) and FLUX.1 (every transformer Linear, rank 128, bf16, in the
diffusers layout ai-toolkit writes and the fused BFL layout sd-scripts writes) -- and times,
alternating the methods within each round, then reports medians:

- `cp` of the file (the physical floor); for Flux, whose fusing or splitting changes the size, also
  `cp` of a file of the output's size (the floor the conversion is measured against),
- a naive `safetensors` `load_file` + `save_file` (every tool that "just re-saves"),
- diffusers' own conversion (`lora_state_dict` + `save_file`), what a user would otherwise run,
- `loraformats convert`,
- and `loraformats detect` on the largest file and `loraformats --help` (start-up).

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
    "from diffusers import {pipeline} as P;"
    "out = P.lora_state_dict(sys.argv[1]); sd = out[0] if isinstance(out, tuple) else out;"
    "save_file({{k: v.contiguous().clone() for k, v in sd.items()}}, sys.argv[2])"
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


def make_flux(path: Path, rank: int, layout: str) -> None:
    """A FLUX.1 LoRA over every Linear of the production transformer, random bf16 factors, no alpha:
    `layout` "diffusers" (ai-toolkit's split q/k/v, independent downs) or "kohya" (sd-scripts' fused
    BFL modules)."""
    import torch
    from safetensors.torch import save_file

    from loraformats.plugins import registry

    component = registry.families()["flux1"].components["transformer"]
    generator = torch.Generator().manual_seed(0)
    naming = "canonical" if layout == "diffusers" else "bfl"
    tensors = {}
    for module in component.named_paths(naming):
        layer = component.modules[module]
        down = (
            torch.randn((rank, layer.in_features), generator=generator) / layer.in_features**0.5
        ).bfloat16()
        up = (torch.randn((layer.out_features, rank), generator=generator) / 8).bfloat16()
        if layout == "diffusers":
            tensors[f"transformer.{module}.lora_A.weight"] = down
            tensors[f"transformer.{module}.lora_B.weight"] = up
        else:
            stem = "lora_unet_" + component.name_in(module, naming).replace(".", "_")
            tensors[f"{stem}.lora_down.weight"] = down
            tensors[f"{stem}.lora_up.weight"] = up
            tensors[f"{stem}.alpha"] = torch.tensor(float(rank)).bfloat16()
        del down, up
    save_file(tensors, path)


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


SDXL_CASES = {
    "SDXL r32 fp16, alpha = r/2 (fold)": (32, 16.0),
    "SDXL r32 fp16, alpha = r (rename only)": (32, 32.0),
    "SDXL r256 fp16, alpha = r (rename only)": (256, 256.0),
}
#: label -> (source layout, target format)
FLUX_CASES = {
    "Flux r128 bf16 diffusers -> kohya (fuse)": ("diffusers", "kohya"),
    "Flux r128 bf16 kohya -> diffusers (split)": ("kohya", "diffusers"),
}


def measure(methods: dict[str, list[str]], out: Path | None, repeats: int) -> dict[str, tuple[float, int]]:
    """Median wall time and peak RssAnon of each method, alternating methods within each round.

    Each round starts one method later than the last, so every method takes every place in the
    order and follows every other: an effect of what ran just before falls on all methods alike."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    peaks: dict[str, int] = dict.fromkeys(methods, 0)
    names = list(methods)
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:  # alternate, so drift hits every method alike
            elapsed, peak = run(methods[name])
            times[name].append(elapsed)
            peaks[name] = max(peaks[name], peak)
            if out is not None:
                out.unlink(missing_ok=True)
    return {name: (statistics.median(times[name]), peaks[name]) for name in methods}


def report(label: str, source: Path, results: dict[str, tuple[float, int]], floor: str | None) -> None:
    base = results[floor][0] if floor else None
    size = source.stat().st_size / 1e6
    for name, (median, peak) in results.items():
        ratio = f"{median / base:6.2f}" if base else "      "
        print(f"{label + f' ({size:.0f} MB)':46} {name:22} {median:9.3f} {ratio} {peak / 1e6:11.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", default="/dev/shm/loraformats-bench")
    parser.add_argument("--skip-diffusers", action="store_true")
    parser.add_argument("--only", choices=["sdxl", "flux"], help="run one model's cases")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    cli = [python, "-m", "loraformats", "convert"]
    print(f"{'case':46} {'method':22} {'median s':>9} {'x cp':>6} {'RssAnon MB':>11}")
    if args.only != "flux":
        for label, (rank, alpha) in SDXL_CASES.items():
            source = work / f"sdxl_r{rank}_a{int(alpha)}.safetensors"
            if not source.exists():
                make_sdxl(source, rank, alpha)
            out = work / "out.safetensors"
            methods = {
                "cp": ["cp", str(source), str(out)],
                "load_file+save_file": [python, "-c", NAIVE, str(source), str(out)],
                "diffusers": [
                    python,
                    "-c",
                    DIFFUSERS.format(pipeline="StableDiffusionXLPipeline"),
                    str(source),
                    str(out),
                ],
                "loraformats": [*cli, str(source), "--to", "diffusers", "-o", str(out), "--force"],
                "loraformats, no NaN scan": [
                    *cli,
                    str(source),
                    "--to",
                    "diffusers",
                    "-o",
                    str(out),
                    "--force",
                    "--no-value-check",
                ],
            }
            if args.skip_diffusers or rank > 64:
                methods.pop("diffusers")
            report(label, source, measure(methods, out, args.repeats), floor="cp")
    if args.only != "sdxl":
        for label, (layout, target) in FLUX_CASES.items():
            source = work / f"flux_r128_{layout}.safetensors"
            if not source.exists():
                make_flux(source, 128, layout)
            out = work / "out.safetensors"
            sized = work / f"flux_r128_{layout}.as_{target}.safetensors"  # a file of the output's size
            if not sized.exists():
                subprocess.run([*cli, str(source), "--to", target, "-o", str(sized)], check=True)
            methods = {
                "cp": ["cp", str(source), str(out)],
                "cp (output size)": ["cp", str(sized), str(out)],
                "load_file+save_file": [python, "-c", NAIVE, str(source), str(out)],
                "loraformats": [*cli, str(source), "--to", target, "-o", str(out), "--force"],
                "loraformats, no NaN scan": [
                    *cli,
                    str(source),
                    "--to",
                    target,
                    "-o",
                    str(out),
                    "--force",
                    "--no-value-check",
                ],
            }
            if layout == "kohya" and not args.skip_diffusers:
                methods["diffusers"] = [
                    python,
                    "-c",
                    DIFFUSERS.format(pipeline="FluxPipeline"),
                    str(source),
                    str(out),
                ]
            report(label, source, measure(methods, out, args.repeats), floor="cp (output size)")
        largest = work / "flux_r128_diffusers.safetensors"
        startup = {
            "python -c pass": [python, "-c", "pass"],
            "loraformats detect": [python, "-m", "loraformats", "detect", str(largest)],
            "loraformats --help": [python, "-m", "loraformats", "--help"],
        }
        report("start-up and detection (1 file)", largest, measure(startup, None, args.repeats), floor=None)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
