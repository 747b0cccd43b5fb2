"""The diffusers format: what `save_lora_weights` writes and `load_lora_weights` reads.

Alpha policy (diffusers' SD loader rejects `.alpha` tensors and reads the scale only from its
`lora_adapter_metadata` entry, which ComfyUI/A1111/Forge/InvokeAI ignore):
1. an existing `lora_adapter_metadata` that already gives every module its scale is kept as is;
2. scale 1 everywhere needs nothing;
3. a power-of-two scale is folded into a factor when that is exact (an exponent shift), and the
   original alphas are kept under `loraformats.alphas` so the round trip restores them bit for bit;
4. otherwise a complete `lora_adapter_metadata` is written, with a warning; `--set fold_alpha=true`
   folds in float32 instead (re-rounded, readable by every app).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, ClassVar

from pydantic import BaseModel, Field, ValidationError

from loraformats.adapters import Exactness, LoRA
from loraformats.canonical import AdapterSet
from loraformats.errors import InvalidFileError, UnsupportedError
from loraformats.families import Component, ComponentHint, Layer
from loraformats.formats import Encoded, Evidence, Format, ParsedFile, ParsedModule, ReadContext
from loraformats.header import Header
from loraformats.report import Step
from loraformats.tensors import ComputedTensor, MemoryTensor, TensorData, torch_dtype

from .lora_config import LoraConfigFields, build_config, pattern_value

METADATA_KEY = "lora_adapter_metadata"
ALPHAS_KEY = "loraformats.alphas"

COMPONENT = re.compile(r"^(unet|transformer|prior|decoder|text_encoder(?:_\d)?)\.(.+)$")
SUFFIXES = (  # (suffix, role) in matching order; the module path is what precedes the suffix
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".alpha", "alpha"),
)  # fmt: skip
LEGACY = re.compile(
    r"^(?P<parent>.+?)(?:\.processor)?\.to_(?P<proj>q|k|v|out)_lora\.(?P<dir>down|up)\.weight$"
)
LEGACY_NAMES = {  # attention-processor spellings: UNet attention, then CLIP self-attention
    "q": ("to_q", "q_proj"),
    "k": ("to_k", "k_proj"),
    "v": ("to_v", "v_proj"),
    "out": ("to_out.0", "out_proj"),
}
NOT_YET = {
    "lora_magnitude_vector": "DoRA (lora_magnitude_vector) is not supported yet",
    "lora_B.bias": "LoRA bias (lora_B.bias) is not supported yet",
    "lora_embedding_": "embedding LoRA (lora_embedding_A/B) is not supported yet",
    "hada_": "LoHa modules are not supported yet",
    "lokr_": "LoKr modules are not supported yet",
}


class DiffusersOptions(BaseModel):
    """Options for writing diffusers files."""

    fold_alpha: bool = Field(
        False,
        description="fold every alpha/rank into the weights (float32) even when that is not exact, so apps "
        "that ignore lora_adapter_metadata apply the right strength",
    )


class DiffusersMetadata(BaseModel):
    """Header entries of a diffusers LoRA file."""

    format: str | None = Field(None, description="'pt', written by diffusers")
    lora_adapter_metadata: str | None = Field(
        None, description="JSON of LoraConfig fields, each prefixed with its component ('unet.r', ...)"
    )


class DiffusersFormat(Format):
    name = "diffusers"
    label = "Diffusers (single file, PEFT keys)"
    description = (
        "The file `save_lora_weights` writes: `unet.` / `text_encoder.` / `text_encoder_2.` + module path + "
        "`.lora_A.weight` / `.lora_B.weight`; scale in `lora_adapter_metadata` or folded. Older "
        "`to_q_lora.down`, `lora.down` and `lora_linear_layer.down` spellings are read too."
    )
    capabilities = frozenset({"lora"})
    metadata_schema = DiffusersMetadata
    options_schema = DiffusersOptions
    owned_metadata: ClassVar[tuple[str, ...]] = (METADATA_KEY,)

    # ---------------------------------------------------------------- reading

    @staticmethod
    def _split(tensor: str) -> tuple[str, str] | None:
        legacy = LEGACY.match(tensor)
        if legacy:
            return tensor, "down" if legacy["dir"] == "down" else "up"
        for suffix, role in SUFFIXES:
            if tensor.endswith(suffix):
                return tensor[: -len(suffix)], role
        return None

    def sniff(self, header: Header) -> Evidence:
        names = list(header.tensors)
        if not names:
            return Evidence(0.0, against=["the file has no tensors"])
        ours = [n for n in names if self._split(n) and not n.startswith("lora_")]
        prefixed = sum(1 for n in ours if COMPONENT.match(n))
        evidence = Evidence(len(ours) / len(names) * (1.0 if prefixed == len(ours) else 0.9))
        if ours:
            evidence.reasons.append(
                f"{len(ours)} of {len(names)} tensor names end in lora_A/lora_B-style suffixes"
            )
            if prefixed:
                evidence.reasons.append(
                    f"{prefixed} carry a pipeline component prefix (unet., text_encoder., ...)"
                )
        if len(ours) < len(names):
            example = next(n for n in names if n not in set(ours))
            evidence.against.append(f"{len(names) - len(ours)} names do not, e.g. {example!r}")
        if METADATA_KEY in header.metadata:
            evidence.reasons.append("diffusers lora_adapter_metadata present")
        return evidence

    def parse(self, header: Header) -> ParsedFile:
        grouped: dict[str, ParsedModule] = {}
        unsupported: dict[str, str] = {}
        for tensor in header.tensors:
            split = self._split(tensor)
            if split is None or tensor.startswith("lora_"):
                unsupported[tensor] = next(
                    (why for part, why in NOT_YET.items() if part in tensor), "not a diffusers LoRA key"
                )
                continue
            stem, role = split
            legacy = LEGACY.match(stem)
            base = f"{legacy['parent']}.to_{legacy['proj']}" if legacy else stem
            found = COMPONENT.match(base)
            hint = ComponentHint(name=found[1]) if found else ComponentHint()
            path = found[2] if found else base
            if legacy:
                parent = path[: -len(f".to_{legacy['proj']}")]
                names = tuple(f"{parent}.{n}" for n in LEGACY_NAMES[legacy["proj"]])
            else:
                names = (path,)
            module = grouped.setdefault(base, ParsedModule(base, hint, names, flat=False, tensors={}))
            if role in module.tensors:
                raise InvalidFileError(f"{base}: two tensors give its {role} factor", path=header.path)
            module.tensors[role] = tensor
        return ParsedFile(list(grouped.values()), unsupported)

    def _configs(self, header: Header) -> dict[str, LoraConfigFields]:
        cached = getattr(header, "_diffusers_configs", None)
        if cached is not None:
            return cached
        configs: dict[str, LoraConfigFields] = {}
        if METADATA_KEY in header.metadata:
            try:
                flat = json.loads(header.metadata[METADATA_KEY])
                grouped: dict[str, dict] = {}
                for key, value in flat.items():
                    component, _, field = key.partition(".")
                    grouped.setdefault(component if field else "", {})[field or component] = value
                configs = {c: LoraConfigFields.model_validate(v) for c, v in grouped.items()}
            except (json.JSONDecodeError, AttributeError, ValidationError) as error:
                raise InvalidFileError(
                    f"{METADATA_KEY} is not a valid LoraConfig: {error}", path=header.path
                ) from None
        for component, config in configs.items():
            for flag, what in (
                ("use_dora", "DoRA"),
                ("lora_bias", "LoRA bias"),
                ("fan_in_fan_out", "fan_in_fan_out"),
            ):
                if getattr(config, flag):
                    raise UnsupportedError(
                        f"{component}: {what} in {METADATA_KEY} is not supported yet", path=header.path
                    )
        header._diffusers_configs = configs  # type: ignore[attr-defined]
        return configs

    def module_extras(
        self, header: Header, component: Component, path: str, roles: dict[str, TensorData]
    ) -> dict[str, Any]:
        configs = self._configs(header)
        config = configs.get(component.name) or configs.get("")
        if config is None or "alpha" in roles:
            return {}
        spellings = [path] + [path[len(a) :] for a in component.path_aliases if path.startswith(a)]
        rank = roles["down"].shape[0]
        stated = pattern_value(config.rank_pattern, spellings) or config.r
        if stated != rank:
            raise InvalidFileError(
                f"{METADATA_KEY} gives {component.name}.{path} rank {stated}, tensors {rank}",
                path=header.path,
            )
        alpha = pattern_value(config.alpha_pattern, spellings)
        alpha = config.lora_alpha if alpha is None else alpha
        return {
            "alpha": MemoryTensor(_f32(alpha), "F32", ()),
            "rank_scaling": "sqrt_rank" if config.use_rslora else "rank",
        }

    def finish_read(self, adapters: AdapterSet, header: Header, context: ReadContext) -> None:
        """Restore alphas a loraformats write folded or set aside (see the module docstring)."""
        try:
            notes = json.loads(header.metadata.get(ALPHAS_KEY, "{}"))
        except json.JSONDecodeError:
            notes = None
        if not isinstance(notes, dict):
            context.warnings.append(f"ignored an unreadable {ALPHAS_KEY} entry")
            return
        for address, note in notes.items():
            component, _, path = address.partition(":")
            adapter = adapters.modules.get((component, path))
            try:
                alpha = MemoryTensor(bytes.fromhex(note["hex"]), note["dtype"], tuple(note["shape"]))
                folded = note.get("folded")
                if not isinstance(adapter, LoRA) or (folded and folded["factor"] not in ("up", "down")):
                    raise ValueError(address)
                if folded:
                    factor = getattr(adapter, folded["factor"])
                    restored = _scaled(factor, -int(folded["log2"]), folded.get("dtype", factor.dtype))
                    setattr(adapter, folded["factor"], restored)
                adapter.alpha = alpha
            except (KeyError, ValueError, TypeError):
                context.warnings.append(f"ignored a {ALPHAS_KEY} note that does not fit this file: {address}")

    # ---------------------------------------------------------------- writing

    def encode(self, adapters: AdapterSet, options: BaseModel | None) -> Encoded:
        options = options or DiffusersOptions()
        loras: dict[tuple[str, str], LoRA] = {}
        for key, adapter in adapters.modules.items():
            if not isinstance(adapter, LoRA) or adapter.mid is not None:
                raise UnsupportedError(
                    f"diffusers cannot hold {sorted(adapter.features())} ({key[0]}:{key[1]})"
                )
            loras[key] = adapter
        metadata = dict(adapters.metadata)
        steps: list[Step] = []
        warnings: list[str] = []
        notes: dict[str, dict] = {}
        factors: dict[tuple[str, str], tuple[TensorData, TensorData]] = {
            key: (a.down, a.up) for key, a in loras.items()
        }
        for key, adapter in loras.items():
            if adapter.alpha is not None:
                notes[f"{key[0]}:{key[1]}"] = {
                    "dtype": adapter.alpha.dtype,
                    "shape": list(adapter.alpha.shape),
                    "hex": adapter.alpha.read_bytes().hex(),
                }
        scaled = {key: a for key, a in loras.items() if a.scale != 1.0}
        if scaled and self._existing_config_fits(adapters, loras):
            steps.append(
                Step(
                    stage="write",
                    name="keep lora_adapter_metadata",
                    exactness=Exactness.IDENTICAL,
                    modules=len(scaled),
                    detail="the source's LoraConfig already gives every scale",
                )
            )
        elif scaled and options.fold_alpha:
            for key, adapter in scaled.items():
                factors[key] = (factors[key][0], _scaled_f32(adapter.up, adapter.scale))
            metadata.pop(METADATA_KEY, None)
            steps.append(
                Step(
                    stage="write",
                    name="fold alpha (float32)",
                    exactness=Exactness.ROUNDED,
                    modules=len(scaled),
                    detail="up *= alpha/rank, written as float32",
                )
            )
        elif scaled and (folds := _exact_folds(scaled)) is not None:
            widened = 0
            for key, (factor, log2, dtype) in folds.items():
                down, up = factors[key]
                source_dtype = (down if factor == "down" else up).dtype
                if factor == "down":
                    factors[key] = (_scaled(down, log2, dtype), up)
                else:
                    factors[key] = (down, _scaled(up, log2, dtype))
                notes[f"{key[0]}:{key[1]}"]["folded"] = {
                    "factor": factor,
                    "log2": log2,
                    "dtype": source_dtype,
                }
                widened += dtype != source_dtype
            metadata.pop(METADATA_KEY, None)
            detail = "alpha/rank is a power of two: an exact exponent shift"
            if widened:
                detail += f" ({widened} factors written as float32 to stay exact)"
            steps.append(
                Step(
                    stage="write",
                    name="fold alpha (power of two)",
                    exactness=Exactness.EXACT,
                    modules=len(scaled),
                    detail=detail,
                )
            )
        elif scaled:
            metadata[METADATA_KEY] = self._config_entry(adapters, loras)
            steps.append(
                Step(
                    stage="write",
                    name="alpha in lora_adapter_metadata",
                    exactness=Exactness.IDENTICAL,
                    modules=len(scaled),
                    detail="r, lora_alpha, rank_pattern, alpha_pattern",
                )
            )
            warnings.append(
                f"{len(scaled)} modules have alpha/rank that is not an exact power of two: the scale is in "
                "lora_adapter_metadata, which diffusers reads but ComfyUI/A1111/Forge/InvokeAI ignore; "
                "use --set fold_alpha=true to fold it into the weights (float32) instead"
            )
        else:
            metadata.pop(METADATA_KEY, None)
        tensors: list[tuple[str, TensorData]] = []
        for key, (down, up) in factors.items():
            layer = adapters.layer(key)
            stem = f"{key[0]}.{key[1]}"
            tensors.append((f"{stem}.lora_A.weight", _shaped(down, layer)))
            tensors.append((f"{stem}.lora_B.weight", _shaped(up, layer)))
        steps.insert(
            0,
            Step(
                stage="write",
                name="diffusers names",
                exactness=Exactness.IDENTICAL,
                modules=len(loras),
                detail="component prefix + canonical module path + lora_A/lora_B",
            ),
        )
        if notes:
            metadata[ALPHAS_KEY] = json.dumps(notes, sort_keys=True, separators=(",", ":"))
        return Encoded(tensors, metadata, steps, warnings)

    def _existing_config_fits(self, adapters: AdapterSet, loras: dict[tuple[str, str], LoRA]) -> bool:
        """True if the metadata we carry already states every module's rank and scale exactly."""
        if METADATA_KEY not in adapters.metadata:
            return False
        probe = Header(
            path=adapters.provenance.path,
            metadata={METADATA_KEY: adapters.metadata[METADATA_KEY]},  # type: ignore[arg-type]
            tensors={},
            data_start=0,
        )
        try:
            for (component, path), adapter in loras.items():
                extras = self.module_extras(
                    probe, adapters.component(component), path, {"down": adapter.down}
                )
                if not extras:
                    return False
                stated = LoRA(adapter.down, adapter.up, None, extras["alpha"], extras["rank_scaling"])
                if stated.scale != adapter.scale:
                    return False
        except (InvalidFileError, UnsupportedError):
            return False
        return True

    @staticmethod
    def _config_entry(adapters: AdapterSet, loras: dict[tuple[str, str], LoRA]) -> str:
        flat: dict[str, Any] = {}
        for name in adapters.components_used():
            component = adapters.component(name)
            modules = {path: (a.rank, a.scale * a.rank) for (c, path), a in loras.items() if c == name}
            for field, value in build_config(modules, component.path_aliases).items():
                flat[f"{name}.{field}"] = value
        return json.dumps(flat, indent=2, sort_keys=True)


def _f32(value: float) -> bytes:
    import struct

    return struct.pack("<f", value)


def _shaped(factor: TensorData, layer: Layer) -> TensorData:
    """PEFT's factor shapes for the layer kind: 4-D on convs, 2-D on linears (bytes unchanged)."""
    if layer.kind == "conv2d":
        shape = factor.shape if len(factor.shape) == 4 else (*factor.shape, 1, 1)
    else:
        shape = factor.shape[:2]
    return factor if shape == factor.shape else factor.reshaped(shape)


def _scaled(factor: TensorData, log2: int, dtype: str | None = None) -> TensorData:
    """factor * 2**log2 as `dtype` (default: its own); exact when `_exact_folds` chose it."""
    dtype = dtype or factor.dtype

    def compute():
        import torch

        return (factor.to_torch().to(torch.float64) * math.ldexp(1.0, log2)).to(torch_dtype(dtype))

    return ComputedTensor(compute, dtype, factor.shape)


def _scaled_f32(factor: TensorData, scale: float) -> TensorData:
    def compute():
        import torch

        return (factor.to_torch().to(torch.float64) * scale).to(torch.float32)

    return ComputedTensor(compute, "F32", factor.shape)


def _exact_folds(scaled: dict[tuple[str, str], LoRA]) -> dict[tuple[str, str], tuple[str, int, str]] | None:
    """For each module: the factor, exponent and output dtype that fold its scale exactly; None if any cannot.

    A power-of-two scale is an exponent shift. It is exact in the factor's own dtype unless a value
    leaves its exponent range (fp16 subnormals, overflow); then float32, whose range covers every
    fp16/bf16 value shifted by a moderate power of two, holds the folded factor exactly.
    """
    import torch

    folds = {}
    for key, adapter in scaled.items():
        mantissa, exponent = math.frexp(adapter.scale)
        if mantissa != 0.5:
            return None
        log2 = exponent - 1
        candidates = [(role, getattr(adapter, role).dtype) for role in ("up", "down")]
        smaller = min(("up", "down"), key=lambda role: getattr(adapter, role).nbytes)
        candidates.append((smaller, "F32"))
        for role, dtype in candidates:
            values = getattr(adapter, role).to_torch().to(torch.float64)
            folded = (values * math.ldexp(1.0, log2)).to(torch_dtype(dtype)).to(torch.float64)
            if torch.isfinite(folded).all() and torch.equal(folded * math.ldexp(1.0, -log2), values):
                folds[key] = (role, log2, dtype)
                break
        else:
            return None
    return folds
