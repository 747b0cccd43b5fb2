"""The diffusers format: what `save_lora_weights` writes and `load_lora_weights` reads.

Alpha policy (diffusers' SD loader rejects `.alpha` tensors and reads the scale only from its
`lora_adapter_metadata` entry, which ComfyUI/A1111/Forge/InvokeAI ignore):
1. an existing `lora_adapter_metadata` that already gives every module its scale is kept as is;
2. scale 1 everywhere needs nothing;
3. a power-of-two scale is folded into a factor when that is exact (an exponent shift; float32 when
   the factor's own dtype would lose bits), and the original alphas are kept under
   `loraformats.alphas` so the round trip restores them bit for bit;
4. otherwise a complete `lora_adapter_metadata` is written, with a warning; `--set fold_alpha=true`
   folds in float32 instead (re-rounded, readable by every app).
"""

from __future__ import annotations

import functools
import json
import math
import re
from typing import TYPE_CHECKING, Any, ClassVar

from loraformats.adapters import DoRA, Exactness, LoRA
from loraformats.canonical import AdapterSet, ModuleKey
from loraformats.errors import InvalidFileError, LoraFormatsError, UnsupportedError
from loraformats.exponent import scale_tensor_f32, shift_tensor
from loraformats.families import CANONICAL, Component, ComponentHint
from loraformats.formats import Encoded, Evidence, Format, ParsedFile, ParsedModule, ReadContext
from loraformats.header import Header
from loraformats.jsontext import parse_json
from loraformats.report import Step
from loraformats.schemas import Options, on_demand, option
from loraformats.tensors import MemoryTensor, TensorData
from loraformats_peft.config import build_config, module_settings, peft_name
from loraformats_peft.keys import (
    ALPHAS_KEY,
    alpha_notes,
    encode_notes,
    module_tensors,
    not_yet,
    parts,
    restore_alphas,
    split_key,
)

if TYPE_CHECKING:
    from loraformats_peft.schemas import LoraConfigFields

METADATA_KEY = "lora_adapter_metadata"

COMPONENT = re.compile(r"^(unet|transformer|prior|decoder|text_encoder(?:_\d)?)\.(.+)$")
LEGACY_SUFFIXES = (
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
)
LEGACY_ENDINGS = tuple(suffix for suffix, _ in LEGACY_SUFFIXES)
LEGACY = re.compile(
    r"^(?P<parent>.+?)(?:\.processor)?\.to_(?P<proj>q|k|v|out)_lora\.(?P<dir>down|up)\.weight$"
)
LEGACY_NAMES = {  # attention-processor spellings: UNet attention, then CLIP self-attention
    "q": ("to_q", "q_proj"),
    "k": ("to_k", "k_proj"),
    "v": ("to_v", "v_proj"),
    "out": ("to_out.0", "out_proj"),
}


@functools.cache
def _hint(component: str | None) -> ComponentHint:
    """One hint object per component name: detection parses every module of every file."""
    return ComponentHint(name=component)


#: Models diffusers' LoRA loader mixins have no path for (`_lora_loadable_modules` of every mixin).
UNLOADABLE = {"T5EncoderModel": "diffusers' LoRA loaders cannot load T5 text-encoder LoRAs"}


class DiffusersOptions(Options):
    """Options for writing diffusers files."""

    fold_alpha: bool = option(
        False,
        "fold every alpha/rank into the weights (float32) even when that is not exact, so apps "
        "that ignore lora_adapter_metadata apply the right strength",
    )


class DiffusersFormat(Format):
    name = "diffusers"
    label = "Diffusers (single file, PEFT keys)"
    description = (
        "The file `save_lora_weights` writes: `unet.` / `text_encoder.` / `text_encoder_2.` + module path + "
        "`.lora_A.weight` / `.lora_B.weight` (+ `.lora_magnitude_vector` for DoRA); scale in "
        "`lora_adapter_metadata` or folded. Older `to_q_lora.down`, `lora.down` and "
        "`lora_linear_layer.down` spellings are read too."
    )
    capabilities = frozenset({"lora", "dora", "dora.output"})
    metadata_schema = on_demand("loraformats_diffusers.schemas:DiffusersMetadata")
    options_schema = DiffusersOptions
    owned_metadata: ClassVar[tuple[str, ...]] = (METADATA_KEY,)
    #: Whether the consumers read `lora_adapter_metadata` (diffusers does; ai-toolkit's files fold).
    reads_adapter_metadata: ClassVar[bool] = True

    def naming(self, adapters: AdapterSet, component: Component, options: Any) -> str:
        """The source's spelling of diffusers-style names (e.g. transformers' runtime names of a text
        encoder), else the canonical one; never an original checkpoint naming (LDM, BFL)."""
        spelling = adapters.provenance.spellings.get(component.name, CANONICAL)
        return (
            spelling if spelling in component.naming_names() and component.is_alias(spelling) else CANONICAL
        )

    def cannot_hold(self, component: Component) -> str | None:
        if component.model_class in UNLOADABLE:
            return UNLOADABLE[component.model_class]
        return None

    # ---------------------------------------------------------------- reading

    @staticmethod
    def _split(tensor: str) -> tuple[str, str] | None:
        # Cheap string tests first: detection splits every name of every file it sees.
        if tensor.startswith(("lora_", "base_model.model.", "diffusion_model.", "text_encoders.")):
            return None  # Kohya's, PEFT's and ComfyUI's own prefixes
        if "_lora." in tensor and LEGACY.match(tensor):
            return tensor, "down" if tensor.endswith(".down.weight") else "up"
        if tensor.endswith(LEGACY_ENDINGS):
            for suffix, role in LEGACY_SUFFIXES:
                if tensor.endswith(suffix):
                    return tensor[: -len(suffix)], role
        return split_key(tensor)

    def sniff(self, header: Header) -> Evidence:
        names = list(header.tensors)
        if not names:
            return Evidence(0.0, against=["the file has no tensors"])
        try:  # a parse without leftovers means every name is ours (and detection reuses the parse)
            parsed = self.parsed(header)
        except LoraFormatsError:
            parsed = None
        if parsed is not None and not parsed.unsupported:
            ours = names
            prefixed = sum(len(m.tensors) for m in parsed.modules if m.hint.name is not None)
        else:
            ours = [n for n in names if self._split(n) or (COMPONENT.match(n) and not_yet(n, ""))]
            prefixed = sum(1 for n in ours if COMPONENT.match(n))
        evidence = Evidence(len(ours) / len(names))
        if ours:
            evidence.reasons.append(
                f"{len(ours)} of {len(names)} tensor names end in lora_A/lora_B-style suffixes"
            )
            if prefixed:
                evidence.reasons.append(
                    f"{prefixed} carry a pipeline component prefix (unet., text_encoder., ...)"
                )
        if len(ours) < len(names):
            mine = set(ours)
            example = next(n for n in names if n not in mine)
            evidence.against.append(f"{len(names) - len(ours)} names do not, e.g. {example!r}")
        if METADATA_KEY in header.metadata:
            evidence.reasons.append("diffusers lora_adapter_metadata present")
        return evidence

    def describe(self, header: Header) -> dict[str, str]:
        """`lora_adapter_metadata` per component: r, lora_alpha, patterns and the flags that change
        the maths (never raises: a broken entry is described, and refused when read)."""
        raw = header.metadata.get(METADATA_KEY)
        if raw is None:
            return {}
        try:
            flat = parse_json(raw)
        except ValueError:
            flat = None
        if not isinstance(flat, dict):
            return {METADATA_KEY: "not a JSON object"}
        summary = {}
        for key, value in flat.items():
            field = key.rpartition(".")[2]
            if field in ("r", "lora_alpha"):
                summary[f"{METADATA_KEY}.{key}"] = str(value)
            elif field in ("use_rslora", "use_dora") and value is True:
                summary[f"{METADATA_KEY}.{key}"] = "true"
            elif field in ("rank_pattern", "alpha_pattern") and isinstance(value, dict) and value:
                summary[f"{METADATA_KEY}.{key}"] = f"{len(value)} patterns"
        return summary

    def parse(self, header: Header) -> ParsedFile:
        grouped: dict[str, ParsedModule] = {}
        unsupported: dict[str, str] = {}
        for tensor in header.tensors:
            split = self._split(tensor)
            if split is None:
                unsupported[tensor] = not_yet(tensor, "not a diffusers LoRA key")
                continue
            stem, role = split
            legacy = LEGACY.match(stem) if "_lora." in stem else None
            base = f"{legacy['parent']}.to_{legacy['proj']}" if legacy else stem
            module = grouped.get(base)
            if module is None:  # once per module, not per tensor: detection parses every key
                found = COMPONENT.match(base)
                hint = _hint(found[1] if found else None)
                path = found[2] if found else base
                if legacy:
                    parent = path[: -len(f".to_{legacy['proj']}")]
                    names = tuple(f"{parent}.{n}" for n in LEGACY_NAMES[legacy["proj"]])
                else:
                    names = (path,)
                module = grouped[base] = ParsedModule(base, hint, names, flat=False, tensors={})
            if role in module.tensors:
                raise InvalidFileError(f"{base}: two tensors give its {role} factor", path=header.path)
            module.tensors[role] = tensor
            if role == "magnitude":
                module.algorithm = "dora"
        return ParsedFile(list(grouped.values()), unsupported)

    def _configs(self, header: Header) -> dict[str, LoraConfigFields]:
        """The per-component LoraConfigs of the header's `lora_adapter_metadata`."""
        text = header.metadata.get(METADATA_KEY)
        try:
            return {} if text is None else configs_of(text)
        except (InvalidFileError, UnsupportedError) as error:  # the same refusal, naming this file
            raise type(error)(error.message, path=header.path) from None

    def module_extras(
        self, header: Header, component: Component, path: str, roles: dict[str, TensorData]
    ) -> dict[str, Any]:
        if "alpha" in roles:
            return {}
        return module_extras_of(self._configs(header), component, path, roles, str(header.path))

    def finish_read(self, adapters: AdapterSet, header: Header, context: ReadContext) -> None:
        restore_alphas(adapters, header, context)

    # ---------------------------------------------------------------- writing

    def encode(self, adapters: AdapterSet, options: Any) -> Encoded:
        options = options or DiffusersOptions()
        loras = {key: parts(module, f"{key[0]}:{key[1]}")[0] for key, module in adapters.modules.items()}
        _check_dora_per_component(adapters)
        metadata = dict(adapters.metadata)
        notes = alpha_notes(loras)
        factors: dict[ModuleKey, tuple[TensorData, TensorData]] = {
            k: (a.down, a.up) for k, a in loras.items()
        }
        scaled = {key: lora for key, lora in loras.items() if lora.scale != 1.0}
        step, warning = None, None
        if not scaled:
            metadata.pop(METADATA_KEY, None)
        elif self.reads_adapter_metadata and self._existing_config_fits(adapters, loras):
            step = Step(
                stage="write",
                name="keep lora_adapter_metadata",
                exactness=Exactness.IDENTICAL,
                modules=len(scaled),
                detail="the source's LoraConfig already gives every scale",
            )
        elif (folds := _exact_folds(scaled)) is not None:
            widened = 0
            for key, (factor, log2, dtype) in folds.items():
                down, up = factors[key]
                original = (down if factor == "down" else up).dtype
                folded = shift_tensor(down if factor == "down" else up, log2, dtype)
                factors[key] = (folded, up) if factor == "down" else (down, folded)
                notes[key]["folded"] = {"factor": factor, "log2": log2, "dtype": original}
                widened += dtype != original
            metadata.pop(METADATA_KEY, None)
            detail = "alpha/rank is a power of two: an exact exponent shift"
            if widened:
                detail += f" ({widened} factors written as float32 to stay exact)"
            step = Step(
                stage="write",
                name="fold alpha (power of two)",
                exactness=Exactness.EXACT,
                modules=len(scaled),
                detail=detail,
            )
        elif options.fold_alpha:
            for key, lora in scaled.items():
                factors[key] = (factors[key][0], scale_tensor_f32(lora.up, lora.scale))
                notes[key] = {"absent": True}  # the scale is in the weights now: read back as alpha = rank
            metadata.pop(METADATA_KEY, None)
            step = Step(
                stage="write",
                name="fold alpha (float32)",
                exactness=Exactness.ROUNDED,
                modules=len(scaled),
                detail="up *= alpha/rank, written as float32",
            )
        else:
            metadata[METADATA_KEY] = self._config_entry(adapters, loras)
            irrational = any(lora.rank_scaling != "rank" for lora in scaled.values())
            step = Step(
                stage="write",
                name="alpha in lora_adapter_metadata",
                exactness=Exactness.ROUNDED if irrational else Exactness.IDENTICAL,
                modules=len(scaled),
                detail="r, lora_alpha, rank_pattern, alpha_pattern",
            )
            warning = (
                f"{len(scaled)} modules have alpha/rank that is not an exact power of two: the scale is in "
                "lora_adapter_metadata, which diffusers reads but ComfyUI/A1111/Forge/InvokeAI ignore; "
                "use --set fold_alpha=true to fold it into the weights (float32) instead"
            )
        tensors: list[tuple[str, TensorData]] = []
        for key, (down, up) in factors.items():
            component = adapters.component(key[0])
            path = component.name_in(key[1], self.naming(adapters, component, options))
            stem = f"{key[0]}.{path}"
            tensors += module_tensors(stem, adapters.modules[key], adapters.layer(key), down, up)
        if notes:
            metadata[ALPHAS_KEY] = encode_notes(notes)
        steps = [
            Step(
                stage="write",
                name="diffusers names",
                exactness=Exactness.IDENTICAL,
                modules=len(loras),
                detail="component prefix + canonical module path + lora_A/lora_B",
            )
        ]
        return Encoded(tensors, metadata, steps + ([step] if step else []), [warning] if warning else [])

    def _existing_config_fits(self, adapters: AdapterSet, loras: dict[ModuleKey, LoRA]) -> bool:
        """True if the metadata we carry already states every module's rank and scale exactly."""
        if METADATA_KEY not in adapters.metadata:
            return False
        try:
            configs = configs_of(adapters.metadata[METADATA_KEY])
            for (component, path), lora in loras.items():
                roles = {"down": lora.down}
                if isinstance(adapters.modules[(component, path)], DoRA):
                    roles["magnitude"] = lora.down
                extras = module_extras_of(configs, adapters.component(component), path, roles, "")
                if not extras or LoRA(lora.down, lora.up, None, **extras).scale != lora.scale:
                    return False
        except (InvalidFileError, UnsupportedError):
            return False
        return True

    @staticmethod
    def _config_entry(adapters: AdapterSet, loras: dict[ModuleKey, LoRA]) -> str:
        flat: dict[str, Any] = {}
        for name in adapters.components_used():
            component = adapters.component(name)
            modules = {
                path: (lora.rank, lora.scale * lora.rank) for (c, path), lora in loras.items() if c == name
            }
            dora = any(isinstance(adapters.modules[(name, p)], DoRA) for p in modules)
            universe = (peft_name(p, component.path_aliases) for p in component.named_paths(CANONICAL))
            config = build_config(modules, component.path_aliases, use_dora=dora, universe=universe)
            for field, value in config.items():
                flat[f"{name}.{field}"] = value
        return json.dumps(flat, indent=2, sort_keys=True)


@functools.lru_cache(maxsize=64)
def configs_of(text: str) -> dict[str, LoraConfigFields]:
    """`lora_adapter_metadata` ("unet.r": 4, ...) as a LoraConfig per component ("" if unprefixed)."""
    try:
        flat = parse_json(text)
        grouped: dict[str, dict] = {}
        for key, value in flat.items():
            component, _, field = key.partition(".")
            grouped.setdefault(component if field else "", {})[field or component] = value
        from loraformats_peft.schemas import LoraConfigFields  # pydantic, imported only for a config

        configs = {c: LoraConfigFields.model_validate(v) for c, v in grouped.items()}
    except (ValueError, AttributeError) as error:  # bad JSON, a non-object, or a ValidationError
        first = str(error).splitlines()[0]
        raise InvalidFileError(f"{METADATA_KEY} is not a valid LoraConfig: {first}") from None
    for component, config in configs.items():
        problem = config.refusal()
        if problem:
            raise UnsupportedError(f"{component or METADATA_KEY}: {problem}")
    return configs


def module_extras_of(
    configs: dict[str, LoraConfigFields], component: Component, path: str, roles: dict, where: str
) -> dict[str, Any]:
    """alpha and rank scaling the configs give one module (nothing if no config covers it)."""
    config = configs.get(component.name) or configs.get("")
    if config is None:
        return {}
    if config.use_dora and "magnitude" not in roles:
        raise UnsupportedError(
            f"{component.name}.{path}: use_dora without lora_magnitude_vector "
            "(PEFT would derive it from the base weights)",
            path=where or None,
        )
    spellings = [path] + [path[len(a) :] for a in component.path_aliases if path.startswith(a)]
    settings = module_settings(config, spellings, roles["down"].shape[0], f"{where}: {component.name}.{path}")
    alpha = MemoryTensor.f32(settings["alpha"])
    return {"alpha": alpha, "rank_scaling": settings["rank_scaling"]}


def _check_dora_per_component(adapters: AdapterSet) -> None:
    """A LoraConfig's `use_dora` covers every module of a component: all or none must be DoRA."""
    for name in adapters.components_used():
        kinds = {isinstance(m, DoRA) for (c, _), m in adapters.modules.items() if c == name}
        if len(kinds) > 1:
            raise UnsupportedError(
                f"{name} mixes DoRA and plain LoRA modules, which one LoraConfig cannot express"
            )


def _exact_folds(scaled: dict[ModuleKey, LoRA]) -> dict[ModuleKey, tuple[str, int, str]] | None:
    """For each module: the factor, exponent and output dtype that fold its scale exactly; None if any cannot.

    A power-of-two scale is an exponent shift. It is exact in the factor's own dtype unless a value
    leaves its exponent range (fp16 subnormals, overflow); then float32, whose range covers every
    fp16/bf16 value shifted by a moderate power of two, holds the folded factor exactly.
    """
    from loraformats import exponent  # numpy, only when there is something to fold

    folds = {}
    for key, lora in scaled.items():
        mantissa, power = math.frexp(lora.scale)
        if mantissa != 0.5:
            return None
        log2 = power - 1
        smaller = min(("up", "down"), key=lambda role: getattr(lora, role).nbytes)
        for role, dtype in (("up", lora.up.dtype), (smaller, "F32")):  # the second try rarely fails
            if exponent.can_shift(getattr(lora, role), log2, dtype):
                folds[key] = (role, log2, dtype)
                break
        else:
            return None
    return folds
