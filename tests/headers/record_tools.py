"""Record the headers real tools write: run diffusers, PEFT and LyCORIS on the tiny test models, save,
and keep only what detection may look at (tensor names, dtypes, shapes, metadata; configs beside).

    python tests/headers/record_tools.py      # rewrites tests/headers/tools/*.json

Each fixture says how it was made (`made_by`, library versions) and what detection must answer
(`expect`, written here by hand from the recipe, not from running detection). Factors are left as
the tools initialise them: values do not matter for headers. Needs torch, diffusers, peft and
lycoris-lora (the test extras); tests only read the JSON.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata as dist
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: tiny.py

OUT = HERE / "tools"
UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
CLIP_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
SD_SCRIPTS_UNET = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]


def safetensors_header(path: Path) -> dict[str, Any]:
    """Names, dtypes, shapes and metadata of a safetensors file, as the header states them."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    doc = json.loads(raw[8 : 8 + n])
    meta = doc.pop("__metadata__", {}) or {}
    return {"metadata": meta, "tensors": {k: [v["dtype"], v["shape"]] for k, v in doc.items()}}


def render(value: Any, indent: str = "") -> str:
    """JSON with objects one entry per line and lists on one line: one tensor per line of a diff."""
    if isinstance(value, dict) and value:
        inner = indent + " "
        items = (f"{inner}{json.dumps(key)}: {render(item, inner)}" for key, item in value.items())
        return "{\n" + ",\n".join(items) + "\n" + indent + "}" + ("\n" if not indent else "")
    return json.dumps(value, ensure_ascii=False)


def versions(*names: str) -> dict[str, str]:
    return {name: dist.version(name) for name in ("torch", *names)}


# ------------------------------------------------------------------------------------------ recipes


def diffusers_save_lora_weights(family: str) -> dict[str, Any]:
    """PEFT adapters added to the UNet and text encoder(s), saved by the pipeline's save_lora_weights."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from tiny import build_pipeline, tiny_family

    pipe = build_pipeline(family)
    kwargs = {}
    for component in tiny_family(family).components:
        model = getattr(pipe, component)
        targets = [*UNET_ATTENTION, "ff.net.0.proj", "ff.net.2"] if component == "unet" else CLIP_ATTENTION
        config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        model.add_adapter(config)
        kwargs[f"{component}_lora_layers"] = get_peft_model_state_dict(model)
        kwargs[f"{component}_lora_adapter_metadata"] = config.to_dict()
    with tempfile.TemporaryDirectory() as directory:
        type(pipe).save_lora_weights(directory, **kwargs)
        file = Path(directory) / "pytorch_lora_weights.safetensors"
        return {"files": {file.name: safetensors_header(file)}}


def peft_save_pretrained(family: str, *, use_dora: bool = False) -> dict[str, Any]:
    """get_peft_model on the tiny UNet (attention projections and convs), saved with save_pretrained
    into a `unet/` sub-directory, as a per-component PEFT directory."""
    from peft import LoraConfig, get_peft_model

    from tiny import build_pipeline

    unet = build_pipeline(family).unet
    config = LoraConfig(
        r=4, lora_alpha=4, target_modules=[*UNET_ATTENTION, "conv1", "conv2"], use_dora=use_dora
    )
    model = get_peft_model(unet, config)
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        weights = Path(directory) / "adapter_model.safetensors"
        return {
            "files": {
                "unet/adapter_model.safetensors": safetensors_header(weights),
                "unet/adapter_config.json": json.loads((Path(directory) / "adapter_config.json").read_text()),
            }
        }


def lycoris_kohya(family: str, algo: str, **kwargs: Any) -> dict[str, Any]:
    """LyCORIS' sd-scripts network (`lycoris.kohya.create_network`) over the tiny UNet and text
    encoder(s), sd-scripts' UNet targets, saved with `save_weights` and sd-scripts-like metadata."""
    import torch
    from lycoris.kohya import PRESET, create_network

    from tiny import build_pipeline, tiny_family

    pipe = build_pipeline(family)
    encoders = [getattr(pipe, c.name) for c in tiny_family(family).text_encoders()]
    encoders = [m if hasattr(m, "text_model") else _CheckpointNames(m) for m in encoders]
    PRESET["sd-scripts"] = {  # sd-scripts' LoCon targets (LyCORIS' "full" also adds embeddings)
        "enable_conv": True,
        "unet_target_module": SD_SCRIPTS_UNET,
        "unet_target_name": [],
        "text_encoder_target_module": ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"],
        "text_encoder_target_name": [],
    }
    text_encoder = encoders if len(encoders) > 1 else encoders[0]
    network = create_network(
        1.0, 4, 2, pipe.vae, text_encoder, pipe.unet, algo=algo, preset="sd-scripts", **kwargs
    )
    network.apply_to(text_encoder, pipe.unet, True, True)
    arguments = json.dumps({"algo": algo, **{k: str(v) for k, v in kwargs.items()}})
    meta = {
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": "4",
        "ss_network_alpha": "2",
        "ss_network_args": arguments,
    }
    with tempfile.TemporaryDirectory() as directory:
        file = Path(directory) / "lycoris.safetensors"
        network.save_weights(str(file), torch.float16, meta)
        return {"files": {file.name: safetensors_header(file)}}


class _CheckpointNames:
    """Puts a transformers-5 CLIPTextModel under `text_model.`, as sd-scripts' models are (see
    tests/test_consumer_kohya.py); LyCORIS names modules by walking the model."""

    def __new__(cls, model):
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.text_model = model

        return Wrapper()


@dataclass(frozen=True)
class Recipe:
    make: Callable[[], dict[str, Any]]
    made_by: str
    expect: dict[str, Any]  # format, family, algorithms, components; `unsupported` names a refusal
    libraries: tuple[str, ...]


SD = ["unet", "text_encoder"]
SDXL = ["unet", "text_encoder", "text_encoder_2"]
RECIPES = {
    "diffusers_sd1": Recipe(
        lambda: diffusers_save_lora_weights("tiny-sd1"),
        "tiny-sd1 pipeline; unet/text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=8, attention + ff "
        "/ CLIP attention)); StableDiffusionPipeline.save_lora_weights(..., *_lora_adapter_metadata=config)",
        {"format": "diffusers", "family": "tiny-sd1", "algorithms": ["lora"], "components": SD},
        ("diffusers", "peft"),
    ),
    "diffusers_sdxl": Recipe(
        lambda: diffusers_save_lora_weights("tiny-sdxl"),
        "tiny-sdxl pipeline; the same adapters on unet, text_encoder and text_encoder_2; "
        "StableDiffusionXLPipeline.save_lora_weights",
        {"format": "diffusers", "family": "tiny-sdxl", "algorithms": ["lora"], "components": SDXL},
        ("diffusers", "peft"),
    ),
    "peft_unet_sd1": Recipe(
        lambda: peft_save_pretrained("tiny-sd1"),
        "get_peft_model(tiny-sd1 unet, LoraConfig(r=4, lora_alpha=4, attention + conv1/conv2))"
        ".save_pretrained into unet/",
        {"format": "peft", "family": "tiny-sd1", "algorithms": ["lora"], "components": ["unet"]},
        ("peft",),
    ),
    "peft_dora_unet_sd2": Recipe(
        lambda: peft_save_pretrained("tiny-sd2", use_dora=True),
        "get_peft_model(tiny-sd2 unet, LoraConfig(..., use_dora=True)).save_pretrained into unet/",
        {"format": "peft", "family": "tiny-sd2", "algorithms": ["dora"], "components": ["unet"]},
        ("peft",),
    ),
    "lycoris_locon_sd1": Recipe(
        lambda: lycoris_kohya("tiny-sd1", "locon", conv_dim=2, conv_alpha=1),
        "lycoris.kohya.create_network(1.0, 4, 2, vae, text_encoder, unet, algo='locon', conv_dim=2, "
        "conv_alpha=1), sd-scripts' targets; save_weights(fp16)",
        {"format": "kohya", "family": "tiny-sd1", "algorithms": ["lora"], "components": SD},
        ("lycoris-lora",),
    ),
    "lycoris_tucker_sdxl": Recipe(
        lambda: lycoris_kohya("tiny-sdxl", "locon", conv_dim=2, conv_alpha=1, use_tucker=True),
        "lycoris.kohya.create_network(..., algo='locon', conv_dim=2, use_tucker=True) on tiny-sdxl; "
        "save_weights(fp16)",
        {"format": "kohya", "family": "tiny-sdxl", "algorithms": ["lora"], "components": SDXL},
        ("lycoris-lora",),
    ),
    "lycoris_dora_sd2": Recipe(
        lambda: lycoris_kohya("tiny-sd2", "lora", dora_wd=True),
        "lycoris.kohya.create_network(..., algo='lora', dora_wd=True) on tiny-sd2; save_weights(fp16)",
        {"format": "kohya", "family": "tiny-sd2", "algorithms": ["dora"], "components": SD},
        ("lycoris-lora",),
    ),
    "lycoris_loha_sd1": Recipe(
        lambda: lycoris_kohya("tiny-sd1", "loha"),
        "lycoris.kohya.create_network(..., algo='loha') on tiny-sd1; save_weights(fp16)",
        {
            "format": "lycoris",
            "family": "tiny-sd1",
            "algorithms": ["loha"],
            "components": ["unet", "text_encoder"],
        },
        ("lycoris-lora",),
    ),
}


def main() -> int:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("diffusers", "transformers", "peft", "lycoris"):
        logging.getLogger(name).setLevel(logging.ERROR)
    OUT.mkdir(exist_ok=True)
    for name, recipe in RECIPES.items():
        fixture = {
            "made_by": recipe.made_by,
            "versions": versions(*recipe.libraries),
            "expect": recipe.expect,
            **recipe.make(),
        }
        (OUT / f"{name}.json").write_text(render(fixture))
        print(f"wrote tests/headers/tools/{name}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
