"""PEFT adapter directories, as `PeftModel.save_pretrained` writes and `from_pretrained` reads.

A directory holds `adapter_config.json` and `adapter_model.safetensors` (keys
`base_model.model.<module path>.lora_A.weight` / `lora_B.weight` [/ `lora_magnitude_vector`]).
A LoRA over several components is written as one such directory per component (`unet/`,
`text_encoder/`, ...); both layouts are read, as is a lone `adapter_model.safetensors`.
The scale lives in the config (r, lora_alpha, patterns, use_rslora), never in the tensors.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraformats.adapters import DoRA, Exactness
from loraformats.canonical import AdapterSet
from loraformats.errors import InvalidFileError, UnsupportedError
from loraformats.families import CANONICAL, Component, ComponentHint
from loraformats.formats import Encoded, Evidence, Format, ParsedFile, ParsedModule, ReadContext
from loraformats.header import Header
from loraformats.jsontext import parse_json
from loraformats.report import Step
from loraformats.schemas import on_demand
from loraformats.tensors import MemoryTensor, TensorData

from .config import build_config, checked, lycoris_settings, module_settings
from .keys import (
    ALPHAS_KEY,
    alpha_notes,
    encode_notes,
    module_tensors,
    not_yet,
    parts,
    restore_alphas,
    split_key,
    split_lycoris_key,
)
from .lycoris import encode_component

if TYPE_CHECKING:
    from .schemas import LoraConfigFields, LycorisConfigFields

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
MAX_CONFIG_BYTES = 16 << 20
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

#: LoraConfig fields written besides the maths, with PEFT's defaults, so the config is complete.
CONFIG_DEFAULTS = {
    "peft_type": "LORA",
    "task_type": None,
    "base_model_name_or_path": None,
    "revision": None,
    "inference_mode": True,
    "lora_dropout": 0.0,
    "bias": "none",
    "fan_in_fan_out": False,
    "init_lora_weights": True,
    "modules_to_save": None,
}


class PeftFormat(Format):
    name = "peft"
    label = "PEFT adapter directory"
    description = (
        "adapter_config.json + adapter_model.safetensors, keys `base_model.model.<path>.lora_A.weight`; "
        "one sub-directory per component (unet/, text_encoder/, ...); scale in the config."
    )
    container = "directory"
    capabilities = frozenset(
        {"lora", "dora", "dora.output", "loha", "loha.tucker", "lokr", "lokr.tucker", "lokr.scaled_full"}
    )
    metadata_schema = on_demand("loraformats_peft.schemas:LoraConfigFields")

    # ---------------------------------------------------------------- finding the parts

    @staticmethod
    def _adapters(path: Path) -> list[tuple[str | None, Path]]:
        """(component name or None, adapter directory) for a single adapter or per-component layout."""
        if (path / CONFIG).is_file() or any((path / w).is_file() for w in WEIGHTS):
            return [(None, path)]
        return sorted((child.name, child) for child in path.iterdir() if (child / CONFIG).is_file())

    def sniff_path(self, path: Path) -> Evidence:
        found = self._adapters(path) if path.is_dir() else []
        if not found:
            return Evidence(0.0, against=[f"no {CONFIG} in the directory or its sub-directories"])
        names = ", ".join(name or "." for name, _ in found)
        return Evidence(1.0, [f"PEFT adapter directories: {names}"])

    def sniff(self, header: Header) -> Evidence:
        names = list(header.tensors)
        ours = sum(1 for n in names if n.startswith(PREFIX) and (split_key(n) or not_yet(n, "")))
        evidence = Evidence(ours / len(names) if names else 0.0)
        if ours:
            evidence.reasons.append(f"{ours} of {len(names)} tensor names are PEFT keys (base_model.model.)")
        if ours < len(names):
            evidence.against.append(f"{len(names) - ours} names are not")
        return evidence

    def describe(self, header: Header) -> dict[str, str]:
        """The adapter_config.json beside the weights (rank, alpha, flags, base model), keyed by its
        path, e.g. `unet/adapter_config.json:r`. Never raises: a refused config is refused on read."""
        weights = header.origin or header.path
        if weights.name not in WEIGHTS or not weights.is_file():
            return {}  # only PEFT's own weights file has its config beside it
        where = f"{weights.parent.name}/{CONFIG}"
        try:
            config = self._config(header)
        except (InvalidFileError, UnsupportedError) as error:
            return {where: error.message}
        except (ValueError, RecursionError):  # absurd numbers or nesting: refused when read
            return {where: "not a readable LoraConfig"}
        if config is None:
            return {}
        alpha_field = "alpha" if config.lycoris else "lora_alpha"
        summary = {f"{where}:r": str(config.r), f"{where}:{alpha_field}": f"{getattr(config, alpha_field):g}"}
        if config.lycoris:
            summary[f"{where}:peft_type"] = config.peft_type
        for flag in ("use_rslora", "use_dora"):
            if getattr(config, flag, False):
                summary[f"{where}:{flag}"] = "true"
        for patterns in ("rank_pattern", "alpha_pattern"):
            if getattr(config, patterns):
                summary[f"{where}:{patterns}"] = f"{len(getattr(config, patterns))} patterns"
        base = getattr(config, "base_model_name_or_path", None)
        if isinstance(base, str) and base:
            summary[f"{where}:base_model_name_or_path"] = base
        return summary

    def parse(self, header: Header, component: str | None = None) -> ParsedFile:
        grouped: dict[str, ParsedModule] = {}
        unsupported: dict[str, str] = {}
        hint = ComponentHint(name=component)
        for tensor in header.tensors:
            split = (split_key(tensor) or split_lycoris_key(tensor)) if tensor.startswith(PREFIX) else None
            if split is None or split[1] == "alpha":
                unsupported[tensor] = not_yet(tensor, "not a PEFT LoRA key")
                continue
            stem, role = split
            path = stem[len(PREFIX) :]
            module = grouped.get(stem)
            if module is None:
                module = grouped[stem] = ParsedModule(stem, hint, (path,), flat=False, tensors={})
            if role in module.tensors:
                raise InvalidFileError(f"{stem}: two tensors give its {role} factor", path=header.path)
            module.tensors[role] = tensor
            if role == "magnitude":
                module.algorithm = "dora"
            elif role.startswith(("hada_", "lokr_")):
                module.algorithm = "loha" if role.startswith("hada_") else "lokr"
        return ParsedFile(list(grouped.values()), unsupported)

    def parts(self, path: Path, context: ReadContext) -> list[tuple[Header, ParsedFile]]:
        from loraformats.pickles import open_header

        known = {name for family in context.families.values() for name in family.components}
        found = []
        for component, directory in self._adapters(path):
            weights = next((directory / w for w in WEIGHTS if (directory / w).is_file()), None)
            if weights is None:
                raise InvalidFileError(f"no {' or '.join(WEIGHTS)} beside the config", path=directory)
            header = open_header(weights, allow_pickle=context.allow_pickle)
            self._config(header)  # a config's refusal (e.g. modules_to_save) names its real reason first
            if component is None and directory.name in known:  # a lone `text_encoder_2/` says which
                component = directory.name
            found.append((header, self.parse(header, component)))
        if not found:
            raise InvalidFileError(f"no PEFT adapter ({CONFIG}) found", path=path)
        return found

    # ---------------------------------------------------------------- config

    def _config(self, header: Header) -> LoraConfigFields | LycorisConfigFields | None:
        return _load_config((header.origin or header.path).parent / CONFIG)

    def module_extras(
        self, header: Header, component: Component, path: str, roles: dict[str, TensorData]
    ) -> dict[str, Any]:
        config = self._config(header)
        if config is None:
            return {}  # a bare state dict: no alpha known, so alpha = rank (reported by finish_read)
        lycoris = next((role[:4] for role in roles if role.startswith(("hada_", "lokr_"))), None)
        if config.lycoris or lycoris:
            return _lycoris_extras(config, component, path, roles, header, lycoris)
        if config.use_dora and "magnitude" not in roles:
            raise UnsupportedError(f"{path}: use_dora without lora_magnitude_vector", path=header.path)
        settings = module_settings(
            config, [spelled(header, component, path)], roles["down"].shape[0], f"{header.path}: {path}"
        )
        extras = {
            "alpha": MemoryTensor.f32(settings["alpha"]),
            "rank_scaling": settings["rank_scaling"],
        }
        if "magnitude" in roles:
            extras["magnitude_axis"] = "output"  # PEFT's DoRA normalises output rows only
        return extras

    def finish_read(self, adapters: AdapterSet, header: Header, context: ReadContext) -> None:
        if self._config(header) is None:
            context.warnings.append(f"{header.path}: no {CONFIG}: assuming alpha = rank (scale 1)")
        restore_alphas(adapters, header, context)

    # ---------------------------------------------------------------- writing

    def encode(self, adapters: AdapterSet, options: Any) -> Encoded:
        files: dict[str, tuple[list[tuple[str, TensorData]], dict[str, str]]] = {}
        documents: dict[str, bytes] = {}
        rounded = 0
        for name in adapters.components_used():
            component = adapters.component(name)
            keys = [key for key in adapters.modules if key[0] == name]
            if any(adapters.modules[key].algorithm in ("loha", "lokr") for key in keys):
                config, by_module, notes = encode_component(adapters, component, keys, runtime_name)
                tensors = [
                    (f"{PREFIX}{runtime_name(component, key[1])}.{role}", tensor)
                    for key, pairs in by_module.items()
                    for role, tensor in pairs
                ]
                metadata = {**adapters.metadata, ALPHAS_KEY: encode_notes(notes)}
                files[f"{name}/{WEIGHTS[0]}"] = (tensors, metadata)
                text = json.dumps(config, indent=2, sort_keys=True) + "\n"
                documents[f"{name}/{CONFIG}"] = text.encode()
                continue
            loras = {key: parts(adapters.modules[key], f"{key[0]}:{key[1]}")[0] for key in keys}
            doras = {isinstance(adapters.modules[key], DoRA) for key in keys}
            if len(doras) > 1:
                raise UnsupportedError(
                    f"{name} mixes DoRA and plain LoRA modules, which one LoraConfig cannot express"
                )
            rslora = {lora.rank_scaling for lora in loras.values()} == {"sqrt_rank"}
            settings: dict[str, tuple[int, float]] = {}
            for (_, path), lora in loras.items():
                alpha = lora.alpha_value if rslora or lora.rank_scaling == "rank" else lora.scale * lora.rank
                rounded += not rslora and lora.rank_scaling != "rank"
                settings[runtime_name(component, path)] = (lora.rank, alpha)
            config = {
                **CONFIG_DEFAULTS,
                **build_config(
                    settings,
                    (),
                    use_rslora=rslora,
                    use_dora=doras == {True},
                    universe=(runtime_name(component, p) for p in component.named_paths(CANONICAL)),
                ),
            }
            tensors: list[tuple[str, TensorData]] = []
            for key, lora in loras.items():
                stem = PREFIX + runtime_name(component, key[1])
                tensors += module_tensors(
                    stem, adapters.modules[key], adapters.layer(key), lora.down, lora.up
                )
            metadata = dict(adapters.metadata)
            notes = alpha_notes(loras, config_gives_alpha=True)
            if notes:
                metadata[ALPHAS_KEY] = encode_notes(notes)
            files[f"{name}/{WEIGHTS[0]}"] = (tensors, metadata)
            documents[f"{name}/{CONFIG}"] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
        steps = [
            Step(
                stage="write",
                name="PEFT directories",
                exactness=Exactness.IDENTICAL,
                modules=len(adapters.modules),
                detail="one adapter directory per component: " + ", ".join(adapters.components_used()),
            ),
            Step(
                stage="write",
                name="alpha in adapter_config.json",
                exactness=Exactness.IDENTICAL,
                modules=len(adapters.modules),
                detail="r, lora_alpha, rank_pattern, alpha_pattern",
            ),
        ]
        if rounded:
            steps.append(
                Step(
                    stage="write",
                    name="rsLoRA scale as alpha",
                    exactness=Exactness.ROUNDED,
                    modules=rounded,
                    detail="alpha = scale * rank where a component mixes rules",
                )
            )
        return Encoded([], {}, steps, files=files, documents=documents)


def _lycoris_extras(
    config: LoraConfigFields | LycorisConfigFields,
    component: Component,
    path: str,
    roles: dict[str, TensorData],
    header: Header,
    kind: str | None,
) -> dict[str, Any]:
    """alpha (and LoKr's scale rule) of a LoHa/LoKr module from a LoHaConfig/LoKrConfig."""
    expected = {"hada": "LOHA", "lokr": "LOKR"}.get(kind or "")
    stated = getattr(config, "peft_type", None)
    if not config.lycoris or stated != expected:
        found = {"hada": "LoHa", "lokr": "LoKr"}.get(kind or "", "LoRA")
        message = f"{path}: adapter_config.json says {stated}, the tensors are {found}"
        raise InvalidFileError(message, path=header.path)
    names = [path] + [component.name_in(path, n) for n in component.namings if n == "module"]
    names += [path[len(a) :] for a in component.path_aliases if path.startswith(a)]
    where = f"{header.path}: {path}"
    if kind == "hada":
        _, alpha = lycoris_settings(config, names, roles["hada_w1_b"].shape[0], where)
        return {"alpha": MemoryTensor.f32(alpha)}
    decomposed = roles.get("lokr_w2_b") or roles.get("lokr_w1_b")
    rank, alpha = lycoris_settings(config, names, decomposed.shape[0] if decomposed else None, where)
    return {"alpha": MemoryTensor.f32(alpha), "convention": "peft", "peft_rank": rank}


def spelled(header: Header, component: Component, path: str) -> str:
    """The module name as this file spells it: PEFT matches its patterns against that name only."""
    candidates = [path, *(component.name_in(path, n) for n in component.namings if n == "module")]
    candidates += [path[len(a) :] for a in component.path_aliases if path.startswith(a)]
    return next((name for name in candidates if f"{PREFIX}{name}.lora_A.weight" in header.tensors), path)


def runtime_name(component: Component, path: str) -> str:
    """The module name PEFT sees at run time (e.g. no `text_model.` in transformers >= 5 CLIPTextModel)."""
    return component.name_in(path, "module") if "module" in component.namings else path


@cache
def _config_cached(path: str, mtime: float) -> LoraConfigFields | None:
    file = Path(path)
    try:
        if file.stat().st_size > MAX_CONFIG_BYTES:
            raise InvalidFileError(f"config larger than {MAX_CONFIG_BYTES} bytes", path=file)
        raw = parse_json(file.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:  # unreadable, not UTF-8, not JSON, a bomb
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InvalidFileError(f"not a readable JSON config: {first}", path=file) from None
    if not isinstance(raw, dict):
        raise InvalidFileError("config is not a JSON object", path=file)
    from pydantic import ValidationError

    from .schemas import LoraConfigFields, LycorisConfigFields

    model = LycorisConfigFields if raw.get("peft_type") in ("LOHA", "LOKR") else LoraConfigFields
    try:
        config = model.model_validate(raw)
    except ValidationError as error:
        raise InvalidFileError(f"invalid LoraConfig: {str(error).splitlines()[0]}", path=file) from None
    return checked(config, str(file))


def _load_config(path: Path) -> LoraConfigFields | None:
    if not path.is_file():
        return None
    return _config_cached(str(path), path.stat().st_mtime)
