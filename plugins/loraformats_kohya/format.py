"""The Kohya format: names flattened from a family naming, alpha as a per-module scalar tensor."""

from __future__ import annotations

import functools
import re
from math import prod
from typing import Any, ClassVar

from loraformats.adapters import DoRA, Exactness, LoRA
from loraformats.canonical import AdapterSet
from loraformats.errors import UnsupportedError, UsageError
from loraformats.families import Component, ComponentHint, Family, Layer
from loraformats.formats import Encoded, Evidence, Format, ParsedFile, ParsedModule
from loraformats.header import Header
from loraformats.report import Step
from loraformats.schemas import Options, on_demand, option
from loraformats.tensors import MemoryTensor, TensorData

from .describe import BASE_MODEL_KEYS, describe
from .hashes import keeps_source_tensors, lycoris_model_hash, sshs_hashes

ROLES = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_mid.weight": "mid",
    "alpha": "alpha",
    "dora_scale": "magnitude",
}


def stem_grammar(denoiser_prefix: str) -> re.Pattern[str]:
    """A module's key stem (`fullmatch` it): the denoiser prefix or `lora_te[N]`, then the flattened
    module name; the groups are prefix, slot and name."""
    return re.compile(rf"(?P<prefix>{denoiser_prefix}|lora_te(?P<slot>\d?))_(?P<name>[^.]+)")


def key_grammar(denoiser_prefix: str) -> re.Pattern[str]:
    """The key grammar with a denoiser prefix: a stem (`stem_grammar`), a dot, a suffix."""
    return re.compile(rf"^{stem_grammar(denoiser_prefix).pattern}\.(?P<suffix>.+)$")


KEY = key_grammar("lora_unet")
STEM = stem_grammar("lora_unet")

#: Suffixes of algorithms this format recognises but does not convert yet, with the reason.
NOT_YET = {
    "hada_": "LoHa (LyCORIS) modules are not supported yet",
    "lokr_": "LoKr (LyCORIS) modules are not supported yet",
    "diff": "full-weight deltas (LyCORIS 'full') are not supported yet",
    "w_norm": "norm-layer deltas (LyCORIS 'norm') are not supported yet",
    "b_norm": "norm-layer deltas (LyCORIS 'norm') are not supported yet",
    "on_input": "(IA)3 modules are not supported yet",
    "weight": "(IA)3 modules are not supported yet",
    "oft_": "OFT/BOFT modules are not supported yet",
    "a1.weight": "GLoRA modules are not supported yet",
    "a2.weight": "GLoRA modules are not supported yet",
    "b1.weight": "GLoRA modules are not supported yet",
    "b2.weight": "GLoRA modules are not supported yet",
    "bm.weight": "GLoRA modules are not supported yet",
}
OTHER_KEYS = {
    "bundle_emb.": "bundled textual-inversion embeddings (bundle_emb.*) cannot be carried by this conversion",
    "lycoris_": "the standalone LyCORIS prefix (lycoris_) is not supported yet",
    "oft_unet_": "Kohya OFT modules are not supported yet",
}


@functools.cache
def _hint(prefix: str) -> ComponentHint:
    """The component a key prefix names; one object per prefix."""
    if not prefix.startswith("lora_te"):  # lora_unet, or another trainer's denoiser prefix
        return ComponentHint(role="denoiser")
    slot = prefix.removeprefix("lora_te")
    return ComponentHint(role="text_encoder", slot=int(slot) if slot else None)


class KohyaOptions(Options):
    """Options for writing Kohya files."""

    naming: str | None = option(
        None,
        "module naming for every component, e.g. 'canonical' (diffusers) or 'ldm' (SGM/LDM); "
        "default: the source's naming, else the family's (sd-scripts writes SDXL in ldm naming)",
    )


class KohyaFormat(Format):
    name = "kohya"
    label = "Kohya sd-scripts LoRA / LoCon"
    description = (
        "Single safetensors file with `lora_unet_` / `lora_te[N]_` + flattened module names, "
        "`lora_down.weight`, `lora_up.weight`, optional Tucker `lora_mid.weight`, and an `alpha` scalar."
    )
    capabilities = frozenset({"lora", "lora.tucker", "dora", "dora.output", "dora.input"})
    metadata_schema = on_demand("loraformats_kohya.schemas:KohyaMetadata")
    options_schema = KohyaOptions
    owned_metadata: ClassVar[tuple[str, ...]] = ("sshs_model_hash", "sshs_legacy_hash")
    base_model_keys: ClassVar[tuple[str, ...]] = BASE_MODEL_KEYS
    #: The key grammar (`key_grammar`): a denoiser or `lora_te[N]` prefix, the module name, a suffix;
    #: and the stem grammar it starts with (`stem_grammar`), which the parse matches once per module.
    key_pattern: ClassVar[re.Pattern[str]] = KEY
    stem_pattern: ClassVar[re.Pattern[str]] = STEM

    def sniff(self, header: Header) -> Evidence:
        """The share of names with Kohya's prefixes. Other suffixes than LoRA/LoCon/DoRA's under those
        prefixes (LyCORIS's hada_, lokr_, ...) keep the score below 1: such files are the lycoris
        format's when it is installed, and this format names what it cannot read when it is not."""
        names = list(header.tensors)
        if not names:
            return Evidence(0.0, against=["the file has no tensors"])
        if not self.parsed(header).unsupported:  # every name is ours (and detection reuses the parse)
            prefixed, other = names, []
        else:  # one C loop over the names, then the suffixes of those with our prefixes
            prefixed = list(filter(self.key_pattern.match, names))
            other = [name for name in prefixed if name.partition(".")[2] not in ROLES]
        ours = len(prefixed)
        evidence = Evidence(ours / len(names))
        if ours:
            evidence.reasons.append(f"{ours} of {len(names)} tensor names use lora_unet_/lora_te*_ prefixes")
        written_as = header.metadata.get("loraformats.format", self.name)
        if written_as != self.name:  # loraformats wrote these Kohya names as another format's file
            evidence.score = min(evidence.score, 0.99)
            evidence.against.append(f"loraformats wrote it as a {written_as} file (loraformats.format)")
        if other:
            evidence.score = min(evidence.score, 0.99)
            evidence.against.append(
                f"{len(other)} have suffixes other than LoRA/LoCon/DoRA's (LyCORIS?), e.g. {other[0]!r}"
            )
        if ours < len(names):
            example = next(name for name in names if not self.key_pattern.match(name))
            evidence.against.append(f"{len(names) - ours} names do not, e.g. {example!r}")
        if "ss_network_module" in header.metadata:
            evidence.reasons.append(
                f"sd-scripts metadata: ss_network_module={header.metadata['ss_network_module']}"
            )
        return evidence

    def describe(self, header: Header) -> dict[str, str]:
        return describe(header.metadata)

    def parse(self, header: Header) -> ParsedFile:
        grouped: dict[str, ParsedModule] = {}
        unsupported: dict[str, str] = {}
        module_of, role_of, stem_grammar = grouped.get, ROLES.get, self.stem_pattern.fullmatch
        for tensor in header.tensors:
            # Detection parses every key of every file: a module's first key has its stem checked
            # (a stem has no dots, so partition splits exactly where the grammar would), its other
            # keys are only split.
            stem, _, suffix = tensor.partition(".")
            module, role = module_of(stem), role_of(suffix)
            if module is None or role is None:
                match = stem_grammar(stem) if role is not None else self.key_pattern.match(tensor)
                if match is None:
                    unsupported[tensor] = next(
                        (why for prefix, why in OTHER_KEYS.items() if tensor.startswith(prefix)),
                        "not a Kohya LoRA key",
                    )
                    continue
                if role is None:
                    unsupported[tensor] = next(
                        (why for start, why in NOT_YET.items() if suffix.startswith(start)),
                        f"unknown suffix {suffix!r}",
                    )
                    continue
                prefix, _, name = match.groups()
                module = grouped[stem] = ParsedModule(stem, _hint(prefix), (name,), True, {})
            module.tensors[role] = tensor
            if role == "magnitude":
                module.algorithm = "dora"
        return ParsedFile(list(grouped.values()), unsupported)

    def module_extras(
        self, header: Header, component: Component, path: str, roles: dict[str, TensorData]
    ) -> dict[str, Any]:
        """`dora_scale` is (out, 1[, 1, 1]) on the output axis, (1, in[, 1, 1]) on the input axis."""
        magnitude = roles.get("magnitude")
        if magnitude is None:
            return {}
        shape = magnitude.shape
        return {"magnitude_axis": "input" if len(shape) >= 2 and shape[0] == 1 and shape[1] > 1 else "output"}

    def module_stem(self, family: Family, component: Component, path: str, naming: str) -> str:
        """The key stem of a module: prefix + its name in `naming`, flattened."""
        return f"{self.prefix(family, component)}_{component.name_in(path, naming).replace('.', '_')}"

    @staticmethod
    def prefix(family: Family, component: Component) -> str:
        if component.role == "denoiser":
            return "lora_unet"
        # sd-scripts numbers encoders when a family has several, and Chroma's lone T5 as te3
        alone = len(family.text_encoders()) == 1 and component.slots[:1] in ((), (1,))
        return "lora_te" if alone else f"lora_te{component.slots[0]}"

    def encode(self, adapters: AdapterSet, options: Any) -> Encoded:
        options = options or KohyaOptions()
        tensors: list[tuple[str, TensorData]] = []
        namings: dict[str, str] = {}
        rescaled = 0
        for (component_name, path), module in adapters.modules.items():
            adapter = module.inner if isinstance(module, DoRA) else module
            if not isinstance(adapter, LoRA):
                raise UnsupportedError(f"kohya cannot hold {module.algorithm} ({component_name}:{path})")
            component = adapters.component(component_name)
            naming = namings.get(component_name) or self.naming(adapters, component, options)
            namings[component_name] = naming
            stem = self.module_stem(adapters.family, component, path, naming)
            alpha = adapter.alpha
            if adapter.rank_scaling != "rank":  # Kohya's scale is alpha / r: carry the scale, not the rule
                alpha, rescaled = MemoryTensor.f32(adapter.scale * adapter.rank), rescaled + 1
            tensors.append((f"{stem}.lora_down.weight", adapter.down))
            tensors.append((f"{stem}.lora_up.weight", adapter.up))
            if adapter.mid is not None:
                tensors.append((f"{stem}.lora_mid.weight", adapter.mid))
            if alpha is not None:
                tensors.append((f"{stem}.alpha", alpha))
            if isinstance(module, DoRA):
                layer = component.modules[path]
                tensors.append((f"{stem}.dora_scale", dora_scale_tensor(module, layer)))
        detail = ", ".join(f"{c} in {n} naming" for c, n in namings.items())
        steps = [
            Step(
                stage="write",
                name=f"{self.name} names",
                exactness=Exactness.IDENTICAL,
                modules=len(adapters.modules),
                detail=detail,
            )
        ]
        if rescaled:
            steps.append(
                Step(
                    stage="write",
                    name="rsLoRA scale as alpha",
                    exactness=Exactness.ROUNDED,
                    modules=rescaled,
                    detail="alpha = scale * rank (float32)",
                )
            )
        return Encoded(tensors, self._metadata(adapters, tensors), steps)

    def naming(self, adapters: AdapterSet, component: Component, options: Any) -> str:
        """The `naming` option, else the source's, else the family's Kohya naming (LDM for SDXL, BFL
        for Flux)."""
        options = options if isinstance(options, KohyaOptions) else KohyaOptions()
        naming = options.naming or adapters.provenance.namings.get(component.name) or component.flat_naming
        if naming not in component.naming_names():
            if options.naming and component.role == "text_encoder":
                return component.flat_naming  # text encoders have one naming; the option is about the UNet
            raise UsageError(
                f"{component.name} has no {naming!r} naming (has: {', '.join(component.naming_names())})"
            )
        return naming

    @staticmethod
    def _metadata(adapters: AdapterSet, tensors: list[tuple[str, TensorData]]) -> dict[str, str]:
        metadata = dict(adapters.metadata)
        loras = [a.inner if isinstance(a, DoRA) else a for a in adapters.modules.values()]
        loras = [a for a in loras if isinstance(a, LoRA)]
        ranks = {a.rank for a in loras}
        alphas = {a.alpha_value for a in loras}
        # Only a uniform, numerically stated fact that disagrees with the output is updated: sd-scripts'
        # own values describe the linear modules only when conv modules use another rank or alpha.
        if len(ranks) == 1 and _disagrees(metadata.get("ss_network_dim"), *ranks):
            metadata["ss_network_dim"] = _format_number(next(iter(ranks)))
        if len(alphas) == 1 and _disagrees(metadata.get("ss_network_alpha"), *alphas):
            metadata["ss_network_alpha"] = _format_number(next(iter(alphas)))
        if metadata.get("sshs_model_hash", "").startswith("0x"):  # LyCORIS's own hash, not sd-scripts'
            if not keeps_source_tensors(adapters, tensors):
                metadata["sshs_model_hash"] = lycoris_model_hash(tensors)
        elif "sshs_model_hash" in metadata or "sshs_legacy_hash" in metadata:
            model, legacy = sshs_hashes(tensors, metadata)
            metadata["sshs_model_hash"] = model
            if legacy is None:
                metadata.pop("sshs_legacy_hash", None)
            else:
                metadata["sshs_legacy_hash"] = legacy
        return metadata


def dora_scale_tensor(module: DoRA, layer: Layer) -> TensorData:
    """LyCORIS's `dora_scale` layout: explicit singleton dims, so the shape tells the axis."""
    count = prod(module.magnitude.shape)
    trailing = (1, 1) if layer.kind == "conv2d" else ()
    shape = (count, 1, *trailing) if module.axis == "output" else (1, count, *trailing)
    return module.magnitude if module.magnitude.shape == shape else module.magnitude.reshaped(shape)


def _disagrees(text: str | None, value: float) -> bool:
    try:
        return text is not None and float(text) != value
    except ValueError:
        return False


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
