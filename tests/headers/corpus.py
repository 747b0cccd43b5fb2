"""The header corpus: LoRA layouts built from the real module tables, as headers only (no tensor data).

A `Layout` names a family, a format and its spelling, which modules are adapted, ranks, dtype,
algorithm and metadata; `build` turns it into a fixture `{"metadata": ..., "tensors": {name: [dtype,
shape]}}` with names written the way each tool writes them (Kohya's flattened `lora_unet_...` in
diffusers or LDM naming, diffusers' `unet.`/`text_encoder.` keys in all four spellings it has used,
PEFT's `base_model.model.`), and `header_bytes` into a safetensors header for `parse_header`.
Names and shapes come from `registry.families()` tables, never from hand-written lists.

Run it to list or write the corpus:

    python tests/headers/corpus.py                 # one line per layout
    python tests/headers/corpus.py --write DIR     # one JSON fixture per layout
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loraformats.families import Component, Family, Layer
from loraformats.plugins import registry

PRODUCTION = ("sd1", "sd2", "sdxl")
#: format -> spellings it has (the first is what the tool writes today).
SPELLINGS = {
    "kohya": ("canonical", "ldm"),
    "diffusers": ("peft", "lora.down", "lora_linear_layer", "attn_procs"),
    "peft": ("peft",),
}
#: Which modules a layout adapts: (component role or name, predicate on the canonical path).
SELECTIONS = (
    "all",  # every linear and conv: LoCon over the whole pipeline
    "attention",  # kohya's default networks.lora targets: UNet transformers + text encoder
    "unet",
    "unet_attention",
    "attn1",  # UNet self-attention only: the SD1/SD2 tie
    "attn2",  # cross-attention only: the context width decides
    "conv",  # ResNet and sampler convs only
    "te",  # text encoders only
    "te2",  # the second text encoder only (SDXL)
)
DTYPES = ("F16", "BF16", "F32")
SIZES = {"F16": 2, "BF16": 2, "F32": 4}
MIXED_RANKS = (4, 8, 16, 2)
ATTENTION_PROJECTIONS = (".to_q", ".to_k", ".to_v", ".to_out.0")


@dataclass(frozen=True)
class Layout:
    """One way a LoRA file can look. Defaults are the plainest file of that family and format."""

    family: str
    format: str
    spelling: str = ""  # "" = the format's first spelling (kohya: the family's own naming)
    selection: str = "all"
    ranks: str = "uniform"  # uniform | mixed (cycles 4, 8, 16, 2; convs get their own rank)
    dtype: str = "F16"
    algorithm: str = "lora"  # lora | tucker (Kohya lora_mid on 3x3 convs) | dora
    metadata: str = "none"  # none | sd-scripts | contradicting | diffusers-config
    no_alpha: int = 0  # Kohya: leave out the alpha tensor of this many modules (alpha = rank)

    @property
    def id(self) -> str:
        parts = [self.family, self.format, self.spelling or "default", self.selection, self.ranks, self.dtype]
        parts += [self.algorithm, self.metadata] + ([f"noalpha{self.no_alpha}"] if self.no_alpha else [])
        return "-".join(parts)


def selected(layout: Layout, component: Component, path: str, layer: Layer) -> bool:
    """Whether a layout adapts this module (the tool-independent part of a LoRA's layout)."""
    if layer.kind not in ("linear", "conv2d"):
        return False
    unet = component.role == "denoiser"
    attention = ".attentions." in path
    rules = {
        "all": True,
        "attention": attention or not unet,
        "unet": unet,
        "unet_attention": unet and attention,
        "attn1": unet and ".attn1." in path,
        "attn2": unet and ".attn2." in path,
        "conv": unet and layer.kind == "conv2d" and not attention,
        "te": not unet,
        "te2": component.slot == 2,
    }
    if layout.spelling == "attn_procs" and not path.endswith(ATTENTION_PROJECTIONS + _CLIP_PROJECTIONS):
        return False  # the attention-processor format held attention projections only
    return rules[layout.selection]


_CLIP_PROJECTIONS = (".q_proj", ".k_proj", ".v_proj", ".out_proj")


def modules(layout: Layout) -> Iterator[tuple[Component, str, Layer]]:
    family = registry.families()[layout.family]
    for component, path, layer in family.iter_modules():
        if selected(layout, component, path, layer):
            yield component, path, layer


def applicable(layout: Layout) -> bool:
    """Layouts a tool could write: PEFT files hold one component, Tucker is Kohya's, te2 needs two TEs."""
    family = registry.families()[layout.family]
    if not any(True for _ in modules(layout)):
        return False
    if layout.format == "peft" and layout.selection not in (
        "unet",
        "unet_attention",
        "attn1",
        "attn2",
        "conv",
    ):
        return False
    if layout.algorithm == "tucker" and (layout.format != "kohya" or layout.selection not in ("all", "conv")):
        return False
    return layout.selection != "te2" or len(family.text_encoders()) > 1


# ------------------------------------------------------------------------------------------ names


def kohya_stem(family: Family, component: Component, path: str, naming: str) -> str:
    if component.role == "denoiser":
        prefix = "lora_unet"
        chosen = naming or component.flat_naming
    else:
        prefix = "lora_te" if len(family.text_encoders()) == 1 else f"lora_te{component.slot}"
        chosen = component.flat_naming
    return f"{prefix}_{component.name_in(path, chosen).replace('.', '_')}"


def diffusers_names(component: Component, path: str, spelling: str) -> dict[str, str]:
    """role -> tensor name in one of diffusers' four spellings."""
    stem = f"{component.name}.{path}"
    if spelling == "attn_procs":
        parent, _, projection = path.rpartition(".")
        if projection == "0":  # to_out.0
            parent, projection = parent.rpartition(".")[0], "to_out"
        short = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "out_proj": "out"}.get(
            projection, projection.removeprefix("to_")
        )
        base = f"{component.name}.{parent}.processor.to_{short}_lora"
        return {"down": f"{base}.down.weight", "up": f"{base}.up.weight"}
    if spelling == "lora.down":
        return {"down": f"{stem}.lora.down.weight", "up": f"{stem}.lora.up.weight"}
    if spelling == "lora_linear_layer":
        return {"down": f"{stem}.lora_linear_layer.down.weight", "up": f"{stem}.lora_linear_layer.up.weight"}
    return {
        "down": f"{stem}.lora_A.weight",
        "up": f"{stem}.lora_B.weight",
        "magnitude": f"{stem}.lora_magnitude_vector",
    }


# ------------------------------------------------------------------------------------------ shapes


def rank_of(layout: Layout, index: int, layer: Layer) -> int:
    if layout.ranks == "mixed":
        return MIXED_RANKS[index % len(MIXED_RANKS)] if layer.kind == "linear" else 2
    return 4


def factor_shapes(layout: Layout, layer: Layer, rank: int) -> dict[str, list[int]]:
    """Shapes as each tool stores them: Kohya 4-D conv factors (Tucker: 1x1 down/up and a kxk core),
    PEFT 4-D factors on convs, DoRA magnitudes per output."""
    conv = layer.kind == "conv2d"
    kernel = list(layer.kernel) if conv else []
    tucker = layout.algorithm == "tucker" and conv and layer.kernel != (1, 1)
    down = [rank, layer.in_features, *([1, 1] if tucker else kernel)]
    up = [layer.out_features, rank, *([1, 1] if conv else [])]
    shapes = {"down": down, "up": up}
    if tucker:
        shapes["mid"] = [rank, rank, *kernel]
    if layout.algorithm == "dora":
        if layout.format == "kohya":
            shapes["magnitude"] = [layer.out_features, 1, *([1, 1] if conv else [])]
        else:
            shapes["magnitude"] = [1, layer.out_features, 1, 1] if conv else [layer.out_features]
    return shapes


KOHYA_SUFFIX = {"down": "lora_down.weight", "up": "lora_up.weight", "mid": "lora_mid.weight",
                "magnitude": "dora_scale"}  # fmt: skip


def build(layout: Layout) -> dict[str, Any]:
    """The fixture of a layout: metadata and {tensor name: [dtype, shape]} in file order."""
    family = registry.families()[layout.family]
    spelling = layout.spelling or SPELLINGS[layout.format][0]
    tensors: dict[str, list] = {}
    ranks: list[int] = []
    for index, (component, path, layer) in enumerate(modules(layout)):
        rank = rank_of(layout, index, layer)
        ranks.append(rank)
        shapes = factor_shapes(layout, layer, rank)
        if layout.format == "kohya":
            naming = layout.spelling if layout.spelling else ""
            stem = kohya_stem(family, component, path, naming)
            for role, shape in shapes.items():
                tensors[f"{stem}.{KOHYA_SUFFIX[role]}"] = [layout.dtype, shape]
            if index >= layout.no_alpha:
                tensors[f"{stem}.alpha"] = [layout.dtype, []]
        elif layout.format == "diffusers":
            names = diffusers_names(component, path, spelling)
            for role, shape in shapes.items():
                tensors[names[role]] = [layout.dtype, shape]
        else:
            stem = f"base_model.model.{path}"
            names = {"down": f"{stem}.lora_A.weight", "up": f"{stem}.lora_B.weight",
                     "magnitude": f"{stem}.lora_magnitude_vector"}  # fmt: skip
            for role, shape in shapes.items():
                tensors[names[role]] = [layout.dtype, shape]
    return {"layout": asdict(layout), "metadata": metadata(layout, family, ranks), "tensors": tensors}


# ------------------------------------------------------------------------------------------ metadata


#: What sd-scripts and SAI ModelSpec call each production family (kohya version, ModelSpec architecture).
NAMES = {
    "sd1": ("sd_v1", "stable-diffusion-v1"),
    "sd2": ("sd_v2", "stable-diffusion-v2-512"),
    "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base"),
}
#: For `contradicting`: which family's names the metadata claims instead.
OTHER = {"sd1": "sdxl", "sd2": "sd1", "sdxl": "sd1"}


def metadata(layout: Layout, family: Family, ranks: list[int]) -> dict[str, str]:
    if layout.metadata == "none":
        return {}
    if layout.metadata == "diffusers-config":
        rank = max(set(ranks), key=ranks.count)
        config = {f"{c}.{k}": v for c in family.components for k, v in (("r", rank), ("lora_alpha", rank))}
        return {"format": "pt", "lora_adapter_metadata": json.dumps(config)}
    claimed = OTHER[layout.family] if layout.metadata == "contradicting" else layout.family
    version, architecture = NAMES[claimed]
    return sd_scripts_metadata(version, architecture, rank=max(ranks), sdxl=claimed == "sdxl")


def sd_scripts_metadata(version: str, architecture: str, *, rank: int, sdxl: bool) -> dict[str, str]:
    """The entries sd-scripts' train_network.py writes (values abridged but shaped like the real ones)."""
    tags = {"10_mychar": {"mychar": 40, "1girl": 38, "solo": 35, "smile": 12, "outdoors": 9, "hat": 3}}
    return {
        "ss_session_id": "1234567890",
        "ss_training_started_at": "1700000000.0",
        "ss_output_name": "mychar",
        "ss_learning_rate": "0.0001",
        "ss_text_encoder_lr": "5e-05",
        "ss_unet_lr": "0.0001",
        "ss_num_train_images": "40",
        "ss_num_reg_images": "0",
        "ss_num_batches_per_epoch": "20",
        "ss_num_epochs": "10",
        "ss_epoch": "10",
        "ss_batch_size_per_device": "2",
        "ss_total_batch_size": "2",
        "ss_gradient_accumulation_steps": "1",
        "ss_max_train_steps": "200",
        "ss_lr_warmup_steps": "0",
        "ss_lr_scheduler": "cosine",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank / 2),
        "ss_network_args": json.dumps({"conv_dim": "2", "conv_alpha": "1"}),
        "ss_mixed_precision": "fp16",
        "ss_full_fp16": "False",
        "ss_v2": str(version.startswith("sd_v2")),
        "ss_base_model_version": version,
        "ss_clip_skip": "2" if not sdxl else "None",
        "ss_max_token_length": "None",
        "ss_cache_latents": "True",
        "ss_seed": "42",
        "ss_noise_offset": "None",
        "ss_optimizer": "bitsandbytes.optim.adamw.AdamW8bit",
        "ss_resolution": "(1024, 1024)" if sdxl else "(512, 512)",
        "ss_sd_model_name": "sd_xl_base_1.0.safetensors" if sdxl else "v1-5-pruned-emaonly.safetensors",
        "ss_tag_frequency": json.dumps(tags),
        "ss_dataset_dirs": json.dumps({"10_mychar": {"n_repeats": 10, "img_count": 40}}),
        "ss_training_comment": "None",
        "sshs_model_hash": "0" * 64,
        "sshs_legacy_hash": "0" * 8,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
        if sdxl
        else "diffusers",
        "modelspec.title": "mychar",
        "modelspec.resolution": "1024x1024" if sdxl else "512x512",
        "modelspec.date": "2023-11-14T22:13:20",
        "modelspec.prediction_type": "epsilon",
    }


# ------------------------------------------------------------------------------------------ headers


def header_bytes(fixture: dict[str, Any]) -> bytes:
    """A safetensors header (JSON only) for a fixture: offsets tile an imaginary data section."""
    doc: dict[str, Any] = {"__metadata__": fixture["metadata"]} if fixture["metadata"] else {}
    offset = 0
    for name, (dtype, shape) in fixture["tensors"].items():
        size = math.prod(shape) * SIZES.get(dtype, 2)
        doc[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return json.dumps(doc, separators=(",", ":")).encode()


def write(fixture: dict[str, Any], path: Path) -> Path:
    """A real safetensors file of a fixture: its header, then a sparse (all-zero) data section."""
    raw = header_bytes(fixture)
    data = sum(math.prod(shape) * SIZES.get(dtype, 2) for dtype, shape in fixture["tensors"].values())
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(len(raw).to_bytes(8, "little") + raw)
        handle.truncate(8 + len(raw) + data)
    return path


def write_files(files: dict[str, Any], directory: Path) -> Path:
    """The files of a recorded fixture (`tools/*.json`): headers become sparse safetensors files,
    anything else (a PEFT adapter_config.json) is written as JSON."""
    for name, content in files.items():
        if name.endswith(".safetensors"):
            write(content, directory / name)
        else:
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            (directory / name).write_text(json.dumps(content))
    return directory


def corpus() -> list[Layout]:
    """Every production family x format spelling x selection x rank scheme (dtypes rotate), plus
    Tucker, DoRA and metadata variants: the layouts the tests detect."""
    layouts = []
    for family in PRODUCTION:
        for fmt, spellings in SPELLINGS.items():
            for spelling in spellings:
                for selection in SELECTIONS:
                    for ranks in ("uniform", "mixed"):
                        dtype = DTYPES[len(layouts) % len(DTYPES)]
                        layouts.append(Layout(family, fmt, spelling, selection, ranks, dtype))
        for selection in ("all", "conv"):
            layouts.append(Layout(family, "kohya", "", selection, algorithm="tucker"))
        for fmt in ("kohya", "diffusers", "peft"):
            for selection in ("attention", "unet_attention"):
                layouts.append(Layout(family, fmt, "", selection, algorithm="dora"))
        for meta in ("sd-scripts", "contradicting"):
            for selection in ("all", "attn1", "te"):
                layouts.append(Layout(family, "kohya", "", selection, metadata=meta))
        layouts.append(Layout(family, "diffusers", "", "attention", metadata="diffusers-config"))
    return [layout for layout in layouts if applicable(layout)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="List or write the header corpus.")
    parser.add_argument("--write", type=Path, metavar="DIR", help="write one JSON fixture per layout")
    args = parser.parse_args(argv)
    layouts = corpus()
    for layout in layouts:
        if args.write:
            args.write.mkdir(parents=True, exist_ok=True)
            (args.write / f"{layout.id}.json").write_text(json.dumps(build(layout), indent=1) + "\n")
        else:
            print(layout.id)
    print(f"{len(layouts)} layouts", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
