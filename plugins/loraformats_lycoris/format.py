"""The LyCORIS format: Kohya's name grammar with every LyCORIS algorithm's suffixes.

Names are `lora_unet_…` / `lora_te[N]_…` (LyCORIS's Kohya network, `lycoris.kohya`) or the standalone
wrapper's `lycoris_…` (denoiser), flattened from a family naming exactly as Kohya's, and resolved
by the same family tables. The algorithm of each module comes from its suffixes (`suffixes.py`).
Files holding only LoRA/LoCon/DoRA keys under Kohya prefixes are the kohya format's: this format's
sniff stays below 1 on them, so detection does not find two complete formats.

Metadata: `ss_*` entries are kept; `ss_network_args` is updated where the written file contradicts it
(`network_args.py`); `sshs_model_hash` is kept when the tensors are the source's own, else recomputed
(LyCORIS's "0x…" rule, or sd-scripts' for sd-scripts-style hashes).
"""

from __future__ import annotations

import functools
import re
from typing import Any

from loraformats.adapters import Adapter, DoRA, Exactness, GLoRA, LoKr, LoRA
from loraformats.canonical import AdapterSet
from loraformats.errors import UsageError
from loraformats.families import Component, ComponentHint
from loraformats.formats import Encoded, Evidence, ParsedFile, ParsedModule, ReadContext
from loraformats.header import Header
from loraformats.report import Step
from loraformats.schemas import on_demand, option
from loraformats.tensors import MemoryTensor, TensorData
from loraformats_kohya.format import (
    KohyaFormat,
    KohyaOptions,
    dora_scale_tensor,
)
from loraformats_kohya.hashes import keeps_source_tensors, lycoris_model_hash, sshs_hashes

from .network_args import updated_metadata
from .suffixes import (
    GLORA_SUFFIX,
    LABELS,
    REASONS,
    REFUSED,
    ROLE_SUFFIX,
    SUFFIXES,
    WITH_ALPHA,
    WITH_DORA,
    algorithm_of,
    state_order,
)

KEY = re.compile(r"^(?P<prefix>lora_unet|lora_te(?P<slot>\d?)|lycoris)_(?P<name>[^.]+)\.(?P<suffix>.+)$")
STANDALONE = "lycoris"
PREFIX_NOTE = "lycoris.prefix"
#: Written on files of LoRA/LoCon/DoRA modules only, which would otherwise read as Kohya files.
FORMAT_NOTE = "loraformats.format"
#: Suffixes that only LyCORIS writes (Kohya's own LoRA has lora_down/up/mid, alpha, dora_scale).
KOHYA_SUFFIXES = frozenset({"lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale"})
OTHER_KEYS = {
    "bundle_emb.": "bundled textual-inversion embeddings (bundle_emb.*) cannot be carried by this conversion",
    "oft_unet_": "Kohya OFT modules are not supported yet",
}


@functools.cache
def _hint(prefix: str, slot: str) -> ComponentHint:
    if prefix in ("lora_unet", STANDALONE):
        return ComponentHint(role="denoiser")
    return ComponentHint(role="text_encoder", slot=int(slot) if slot else None)


class LycorisOptions(KohyaOptions):
    """Options for writing LyCORIS files: Kohya's, plus the denoiser prefix."""

    prefix: str | None = option(
        None,
        "denoiser prefix: 'lora_unet' (LyCORIS's Kohya network) or 'lycoris' (its standalone "
        "wrapper, e.g. SimpleTuner); default: the source's, else lora_unet",
    )


class LycorisFormat(KohyaFormat):
    name = "lycoris"
    label = "LyCORIS (LoCon, LoHa, LoKr, (IA)3, full, norm, GLoRA, Diag-OFT, BOFT, DoRA)"
    description = (
        "Single safetensors file with `lora_unet_` / `lora_te[N]_` (or the standalone `lycoris_`) + "
        "flattened module names and LyCORIS suffixes: `hada_*` (LoHa), `lokr_*` (LoKr), "
        "`weight`+`on_input` ((IA)3), `diff`/`diff_b` (full), `w_norm`/`b_norm` (norm), `a1.weight`… "
        "(GLoRA), `oft_blocks` (Diag-OFT, BOFT), `lora_down`/`lora_up`/`lora_mid` (LoCon), "
        "`dora_scale`; per-module `alpha`."
    )
    capabilities = frozenset(
        {
            "lora", "lora.tucker", "dora", "dora.output", "dora.input",
            "loha", "loha.tucker", "loha.dora", "lokr", "lokr.tucker", "lokr.dora",
            "ia3", "full", "full.bias", "norm", "glora", "glora.legacy", "diag-oft", "boft",
        }
    )  # fmt: skip
    metadata_schema = on_demand("loraformats_kohya.schemas:KohyaMetadata")
    options_schema = LycorisOptions

    # ---------------------------------------------------------------- reading

    def sniff(self, header: Header) -> Evidence:
        names = list(header.tensors)
        if not names:
            return Evidence(0.0, against=["the file has no tensors"])
        ours = lycoris_only = standalone = 0
        for name in names:  # every prefixed name counts: the reader names the suffixes it cannot place
            match = KEY.match(name)
            if match is None:
                continue
            ours += 1
            suffix = match["suffix"]
            lycoris_only += suffix not in KOHYA_SUFFIXES and (suffix in SUFFIXES or suffix in REFUSED)
            standalone += match["prefix"] == STANDALONE
        score = ours / len(names)
        evidence = Evidence(score)
        if ours:
            evidence.reasons.append(f"{ours} of {len(names)} tensor names use LyCORIS prefixes")
        if lycoris_only:
            evidence.reasons.append(f"{lycoris_only} use suffixes only LyCORIS writes (hada_, lokr_, ...)")
        if standalone:
            evidence.reasons.append(f"{standalone} use the standalone lycoris_ prefix")
        marked = header.metadata.get(FORMAT_NOTE) == self.name
        if marked:
            evidence.reasons.append(f"written by loraformats as a {self.name} file ({FORMAT_NOTE})")
        elif ours and not lycoris_only and not standalone:
            evidence.score = min(score, 0.98)  # below kohya's 0.99 for its own files with stray keys
            evidence.against.append("no LyCORIS-only suffix under Kohya prefixes: the kohya format's file")
        if ours < len(names):
            example = next(n for n in names if not KEY.match(n))
            evidence.against.append(f"{len(names) - ours} names are not LyCORIS keys, e.g. {example!r}")
        if header.metadata.get("ss_network_module") == "lycoris.kohya":
            evidence.reasons.append("sd-scripts metadata: ss_network_module=lycoris.kohya")
        return evidence

    def parse(self, header: Header) -> ParsedFile:
        grouped: dict[str, tuple[re.Match, dict[str, str]]] = {}
        unsupported: dict[str, str] = {}
        for tensor in header.tensors:
            stem, _, suffix = tensor.partition(".")
            if stem not in grouped:
                match = KEY.match(tensor)
                if match is None:
                    unsupported[tensor] = next(
                        (why for prefix, why in OTHER_KEYS.items() if tensor.startswith(prefix)),
                        "not a LyCORIS key",
                    )
                    continue
                grouped[stem] = (match, {})
            grouped[stem][1][suffix] = tensor
        modules = []
        for stem, (match, suffixes) in grouped.items():
            module, refused = _module(stem, match, suffixes, header)
            unsupported.update(refused)
            if module is not None:
                modules.append(module)
        return ParsedFile(modules, unsupported)

    def module_extras(
        self, header: Header, component: Component, path: str, roles: dict[str, TensorData]
    ) -> dict[str, Any]:
        extras = super().module_extras(header, component, path, roles)  # dora_scale's axis
        if "a1" in roles:
            layer = component.modules[path]
            extras["layout"] = GLoRA.layout_for({r: t.shape for r, t in roles.items()}, layer) or "lycoris"
        return extras

    def finish_read(self, adapters: AdapterSet, header: Header, context: ReadContext) -> None:
        if any(name.startswith(STANDALONE + "_") for name in header.tensors):
            adapters.provenance.notes[PREFIX_NOTE] = STANDALONE

    # ---------------------------------------------------------------- writing

    def encode(self, adapters: AdapterSet, options: Any) -> Encoded:
        options = options or LycorisOptions()
        tensors: list[tuple[str, TensorData]] = []
        namings: dict[str, str] = {}
        rescaled = added_alphas = 0
        for (component_name, path), module in adapters.modules.items():
            component = adapters.component(component_name)
            naming = namings.get(component_name) or self.naming(adapters, component, options)
            namings[component_name] = naming
            flat = component.name_in(path, naming).replace(".", "_")
            stem = f"{self._prefix(adapters, component, options)}_{flat}"
            inner = module.inner if isinstance(module, DoRA) else module
            roles = dict(inner.tensors())
            if isinstance(inner, LoRA) and inner.rank_scaling != "rank":
                roles["alpha"], rescaled = MemoryTensor.f32(inner.scale * inner.rank), rescaled + 1
            elif "alpha" not in roles and inner.algorithm in ("loha", "lokr", "glora"):
                roles["alpha"], added_alphas = MemoryTensor.f32(_stated_alpha(inner)), added_alphas + 1
            suffixes = GLORA_SUFFIX if isinstance(inner, GLoRA) else ROLE_SUFFIX
            tensors += [(f"{stem}.{suffixes.get(role, role)}", tensor) for role, tensor in roles.items()]
            if isinstance(module, DoRA):
                tensors.append((f"{stem}.dora_scale", dora_scale_tensor(module, component.modules[path])))
        steps = [
            Step(
                stage="write",
                name="lycoris names",
                exactness=Exactness.IDENTICAL,
                modules=len(adapters.modules),
                detail=", ".join(f"{c} in {n} naming" for c, n in namings.items()),
            )
        ]
        if rescaled:
            steps.append(
                Step(
                    stage="write",
                    name="rsLoRA scale as alpha",
                    exactness=Exactness.ROUNDED,
                    modules=rescaled,
                    detail="alpha = scale * rank (float32), as LyCORIS stores rs_lora",
                )
            )
        if added_alphas:
            steps.append(
                Step(
                    stage="write",
                    name="alpha tensors added",
                    exactness=Exactness.IDENTICAL,
                    modules=added_alphas,
                    detail="LyCORIS's loader needs an alpha; written as the rank (scale 1, unchanged)",
                )
            )
        metadata = self._lycoris_metadata(adapters, tensors)
        if all(name.partition(".")[2] in KOHYA_SUFFIXES for name, _ in tensors) and not any(
            name.startswith(STANDALONE + "_") for name, _ in tensors
        ):
            metadata[FORMAT_NOTE] = self.name  # else a Kohya file by its names: say which format wrote it
        return Encoded(tensors, metadata, steps)

    def _prefix(self, adapters: AdapterSet, component: Component, options: LycorisOptions) -> str:
        if component.role != "denoiser":
            return self.prefix(adapters.family, component)
        prefix = options.prefix or adapters.provenance.notes.get(PREFIX_NOTE) or "lora_unet"
        if prefix not in ("lora_unet", STANDALONE):
            raise UsageError(f"prefix must be 'lora_unet' or 'lycoris', got {prefix!r}")
        return prefix

    @staticmethod
    def _lycoris_metadata(adapters: AdapterSet, tensors: list[tuple[str, TensorData]]) -> dict[str, str]:
        metadata = updated_metadata(dict(adapters.metadata), adapters.modules.values())
        if metadata.get("sshs_model_hash", "").startswith("0x"):
            if not keeps_source_tensors(adapters, tensors):
                metadata["sshs_model_hash"] = lycoris_model_hash(tensors, state_order)
        elif "sshs_model_hash" in metadata or "sshs_legacy_hash" in metadata:
            model, legacy = sshs_hashes(tensors, metadata)
            metadata["sshs_model_hash"] = model
            if legacy is None:
                metadata.pop("sshs_legacy_hash", None)
            else:
                metadata["sshs_legacy_hash"] = legacy
        return metadata


def _module(
    stem: str, match: re.Match, suffixes: dict[str, str], header: Header
) -> tuple[ParsedModule | None, dict[str, str]]:
    """The parsed module of one key stem, or the refusal of all its tensors (never a partial module)."""
    refused = {suffix for suffix in suffixes if suffix in REFUSED}
    unknown = {suffix for suffix in suffixes if suffix not in SUFFIXES and suffix not in REFUSED}
    if refused:
        reason = REASONS[REFUSED[sorted(refused)[0]]]
        return None, {tensor: reason for tensor in suffixes.values()}
    if unknown:
        reason = f"unknown LyCORIS suffix {sorted(unknown)[0]!r}"
        return None, {suffixes[suffix]: reason for suffix in unknown} | {
            tensor: f"belongs to a module with an unknown suffix ({stem})"
            for suffix, tensor in suffixes.items()
            if suffix not in unknown
        }
    families = {SUFFIXES[suffix][0] for suffix in suffixes}
    blocks = suffixes.get("oft_blocks")
    algorithm = algorithm_of(families, len(header.tensors[blocks].shape) if blocks else None)
    problem = None
    if algorithm is None:
        kinds = [LABELS[family] for family in sorted(families - {""})] or ["only alpha/dora_scale"]
        problem = f"{stem} mixes or lacks algorithm keys ({', '.join(kinds)})"
    elif "alpha" in suffixes and _family(algorithm) not in WITH_ALPHA:
        problem = f"{stem}: alpha has no meaning on a {algorithm} module"
    elif "dora_scale" in suffixes and _family(algorithm) not in WITH_DORA:
        problem = f"{stem}: dora_scale on a {algorithm} module"
    if problem:
        return None, {tensor: problem for tensor in suffixes.values()}
    tensors = {SUFFIXES[suffix][1]: tensor for suffix, tensor in suffixes.items()}
    module = ParsedModule(
        stem,
        _hint(match["prefix"], match["slot"] or ""),
        (match["name"],),
        flat=True,
        tensors=tensors,
        algorithm="dora" if "magnitude" in tensors else algorithm,
    )
    return module, {}


def _family(algorithm: str) -> str:
    return "oft" if algorithm in ("diag-oft", "boft") else algorithm


def _stated_alpha(adapter: Adapter) -> float:
    """The alpha that keeps an adapter's scale when written (its rank, or the scale times the rank)."""
    if isinstance(adapter, LoKr):
        rank = adapter.rank
        return float(rank) * adapter.scale if rank else float(adapter.peft_rank or 1)
    return float(adapter.rank) * adapter.scale
