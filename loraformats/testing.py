"""The conformance suite for format and family plugins, shipped as a pytest plugin.

A plugin author runs every check with one subclass (pytest collects it like any test class):

    from loraformats.testing import FormatConformance

    class TestMyFormat(FormatConformance):
        format_name = "my-format"

The built-in plugins pass the same suite in loraformats' own tests. The module is registered as a
pytest plugin (entry point `pytest11`), so its fixtures (`synthetic_lora`) are available anywhere.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import ClassVar
from unittest import mock

import pytest

from .adapters import DoRA, LoRA
from .canonical import AdapterSet, Provenance
from .conversion import load
from .errors import UnsupportedError
from .families import Family
from .formats import Format, ReadContext
from .header import read_header
from .plugins import registry
from .tensors import MemoryTensor
from .verification import compare

#: Adapter features the suite knows how to synthesise (the built-in LoRA-family ones).
SYNTHESISABLE = ("lora", "lora.tucker", "dora.output", "dora.input")


def _random(shape: tuple[int, ...], seed: int, dtype: str = "F16") -> MemoryTensor:
    import torch

    from .tensors import torch_dtype

    generator = torch.Generator().manual_seed(seed)
    return MemoryTensor.from_torch(torch.randn(shape, generator=generator).to(torch_dtype(dtype)))


def synthetic_adapters(
    family: Family,
    features: frozenset[str] = frozenset({"lora"}),
    *,
    rank: int = 2,
    per_component: int = 6,
    seed: int = 0,
    components: tuple[str, ...] | None = None,
) -> AdapterSet:
    """A small random LoRA in canonical form over real module tables: random, never the identity."""
    modules = {}
    for component in family.components.values():
        if components is not None and component.name not in components:
            continue
        chosen = [
            (path, layer)
            for path, layer in component.modules.items()
            if layer.kind in ("linear", "conv2d") and path not in component.groups
        ]
        kxk = [(p, layer) for p, layer in chosen if layer.kind == "conv2d" and layer.kernel != (1, 1)]
        picked = chosen[:: max(1, len(chosen) // per_component)][:per_component]
        if "lora.tucker" in features and kxk:
            picked.append(kxk[0])
        for path, layer in dict(picked).items():
            salt = zlib.crc32(f"{component.name}:{path}".encode()) + seed
            kernel = tuple(layer.kernel) if layer.kind == "conv2d" else ()
            tucker = "lora.tucker" in features and kernel not in ((), (1, 1))
            down_shape = (rank, layer.in_features, *((1, 1) if tucker else kernel))
            up_shape = (layer.out_features, rank, *((1, 1) if kernel else ()))
            lora = LoRA(
                down=_random(down_shape, salt),
                up=_random(up_shape, salt + 1),
                mid=_random((rank, rank, *kernel), salt + 2) if tucker else None,
                alpha=_random((), salt + 3),
            )
            module = lora
            for axis in ("output", "input"):
                if f"dora.{axis}" in features:
                    count = layer.out_features if axis == "output" else layer.in_features
                    magnitude = MemoryTensor.from_torch(
                        _random((count,), salt + 4, "F32").to_torch().abs() + 0.5
                    )
                    module = DoRA(lora, magnitude, axis)
            modules[(component.name, path)] = module
    provenance = Provenance("synthetic", f"<synthetic {family.name} {sorted(features)}>")
    return AdapterSet(family, modules, {"ss_network_module": "synthetic"}, provenance)


def write(fmt: Format, adapters: AdapterSet, destination: Path) -> Path:
    """Encode with `fmt` and write, as `convert` does (atomic, directory formats included)."""
    from .writer import write_directory, write_safetensors

    encoded = fmt.encode(adapters, None)
    if fmt.container == "directory":
        write_directory(destination, encoded.files, encoded.documents, overwrite=True)
    else:
        write_safetensors(destination, encoded.tensors, encoded.metadata, overwrite=True)
    return destination


def check_no_data_read(format_name: str, path: str | os.PathLike) -> None:
    """`sniff` and `parse` must work from the header alone: reading tensor data fails the check."""
    fmt = registry.formats()[format_name]
    path = Path(path)

    def refuse(*args, **kwargs):
        raise AssertionError(f"{format_name} read tensor data while sniffing or parsing")

    with mock.patch("os.pread", refuse):
        if fmt.container == "directory":
            assert fmt.sniff_path(path).score >= 1.0, f"{format_name} does not recognise its own output"
            parts = fmt.parts(path, ReadContext(families=registry.families()))
        else:
            header = read_header(path)
            evidence = fmt.sniff(header)
            assert evidence.score >= 1.0, f"{format_name} does not recognise its own output: {evidence}"
            parts = [(header, fmt.parse(header))]
    for header, parsed in parts:
        claimed = {name for module in parsed.modules for name in module.tensors.values()}
        missing = set(header.tensors) - claimed - set(parsed.unsupported)
        assert not missing, f"{format_name} left tensors unclaimed: {missing}"


def check_round_trip(format_name: str, adapters: AdapterSet, workdir: str | os.PathLike) -> None:
    """Write with the format, read back, and require the same modules making the same changes."""
    fmt = registry.formats()[format_name]
    suffix = fmt.suffix if fmt.container == "file" else ""
    written = write(fmt, adapters, Path(workdir) / f"conformance.{format_name}{suffix}")
    check_no_data_read(format_name, written)
    with load(written, format=format_name, family=adapters.family.name) as back:
        missing = set(adapters.modules) - set(back.modules)
        extra = set(back.modules) - set(adapters.modules)
        assert not missing and not extra, f"modules differ after the round trip: {missing or extra}"
        result = compare(adapters, back)
        assert result.ok, f"changes differ after the round trip: {result.failures[:3]}"


class FormatConformance:
    """Every check a format plugin must pass. Subclass and set `format_name` (and `families`)."""

    format_name: ClassVar[str]
    #: Families to synthesise samples from (any registered family works).
    families: ClassVar[tuple[str, ...]] = ("sd1", "sdxl")
    #: Components the format holds (None: all of a family's components).
    components: ClassVar[tuple[str, ...] | None] = None

    @pytest.fixture
    def fmt(self) -> Format:
        return registry.formats()[self.format_name]

    @pytest.fixture(params=SYNTHESISABLE)
    def feature(self, request) -> str:
        return request.param

    def test_declares_a_name_and_valid_schemas(self, fmt):
        assert fmt.name == self.format_name and fmt.label
        assert fmt.container in ("file", "directory")
        for schema in (fmt.metadata_schema, fmt.options_schema):
            if schema is not None:
                assert schema.model_json_schema()["type"] == "object"

    def test_round_trip_through_the_canonical_form(self, fmt, tmp_path):
        if not fmt.writable:
            pytest.skip("read-only format")
        for family in self.families:
            adapters = synthetic_adapters(registry.families()[family], components=self.components)
            check_round_trip(self.format_name, adapters, tmp_path)

    def test_capabilities_match_behaviour(self, fmt, feature, tmp_path):
        """A declared feature round-trips; an undeclared one is refused, never dropped."""
        if not fmt.writable:
            pytest.skip("read-only format")
        features = frozenset({"lora", feature})
        adapters = synthetic_adapters(
            registry.families()[self.families[0]], features, components=self.components
        )
        needed = set().union(*(module.features() for module in adapters.modules.values()))
        if needed <= fmt.capabilities:
            check_round_trip(self.format_name, adapters, tmp_path)
        else:
            with pytest.raises(UnsupportedError):
                fmt.encode(adapters, None)


class FamilyConformance:
    """Every check a family plugin must pass. Subclass and set `family_name`."""

    family_name: ClassVar[str]

    @pytest.fixture
    def family(self) -> Family:
        return registry.families()[self.family_name]

    def test_has_components_with_valid_layers(self, family):
        assert family.components, "a family needs at least one component"
        for component in family.components.values():
            assert component.role in ("denoiser", "text_encoder"), component.role
            for path, layer in component.modules.items():
                assert layer.kind in ("linear", "conv2d", "norm"), (path, layer)
                assert layer.in_features > 0 and layer.out_features > 0, (path, layer)

    def test_every_naming_resolves_back(self, family):
        for component in family.components.values():
            for naming in component.naming_names():
                for path in component.named_paths(naming):
                    name = component.name_in(path, naming)
                    assert component.resolve_dotted(name)[0] == path, (naming, name)
                    assert component.resolve_flat(name.replace(".", "_"))[0] == path, (naming, name)


@pytest.fixture
def synthetic_lora():
    """Factory fixture: `synthetic_lora("sd1", {"lora", "lora.tucker"})` -> an AdapterSet."""

    def make(family: str, features: set[str] | frozenset[str] = frozenset({"lora"}), **kw) -> AdapterSet:
        return synthetic_adapters(registry.families()[family], frozenset(features), **kw)

    return make


def check_format(format_name: str, sample: str | os.PathLike, workdir: str | os.PathLike) -> None:
    """The round-trip checks of `FormatConformance`, on a real LoRA file instead of a synthetic one."""
    with load(sample) as adapters:
        check_round_trip(format_name, adapters, workdir)
