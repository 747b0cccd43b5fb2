"""What a format plugin provides: sniff a header, parse its keys, read, and encode.

A format knows an encoding (prefixes, factor names, alpha handling, container) and nothing
about particular model families: it describes each key's component and module name, and the
core resolves those names against the registered families.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .families import CANONICAL, Component, ComponentHint
from .header import Header

if TYPE_CHECKING:
    from pydantic import BaseModel

    from .canonical import AdapterSet
    from .report import Step
    from .tensors import TensorData


@dataclass
class Evidence:
    """A format's or family's opinion of a file: a score in [0, 1] and why."""

    score: float
    reasons: list[str] = field(default_factory=list)
    against: list[str] = field(default_factory=list)


@dataclass(slots=True)
class ParsedModule:
    """One adapted module as the file names it, before family resolution."""

    key: str  # the module's key stem in the file, for messages
    hint: ComponentHint
    names: tuple[str, ...]  # names to try, in order (legacy spellings may need several)
    flat: bool  # Kohya-style: dots flattened to underscores
    tensors: dict[str, str]  # role -> tensor name in the file
    algorithm: str = "lora"


@dataclass
class ParsedFile:
    modules: list[ParsedModule]
    #: Tensors the format recognises but cannot read yet, with the reason (the read is refused).
    unsupported: dict[str, str] = field(default_factory=dict)

    @classmethod
    def by_stem(
        cls,
        header: Header,
        split: Callable[[str], tuple[str, str] | None],
        hint: ComponentHint,
        refusal: Callable[[str], str],
    ) -> ParsedFile:
        """The parse of a format whose every key is `<dotted module name><factor suffix>` of the
        component `hint` names: `split` gives (module name, role) or None, and a name it cannot split
        is unsupported for `refusal(name)`."""
        grouped: dict[str, ParsedModule] = {}
        unsupported: dict[str, str] = {}
        for tensor in header.tensors:
            split_name = split(tensor)
            if split_name is None:
                unsupported[tensor] = refusal(tensor)
                continue
            stem, role = split_name
            module = grouped.get(stem)
            if module is None:
                module = grouped[stem] = ParsedModule(stem, hint, (stem,), False, {})
            if role in module.tensors:  # two spellings of one factor: neither may win silently
                unsupported[tensor] = f"a second {role} factor for {stem} (after {module.tensors[role]!r})"
                continue
            module.tensors[role] = tensor
        return cls(list(grouped.values()), unsupported)


@dataclass
class Encoded:
    """A format's rendering of an adapter set: tensors in write order, metadata, and its steps.

    Directory formats fill `files` (relative path -> (tensors, metadata) of one safetensors file)
    and `documents` (relative path -> bytes, e.g. a JSON config) instead of `tensors`/`metadata`.
    """

    tensors: list[tuple[str, TensorData]]
    metadata: dict[str, str]
    steps: list[Step] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    files: dict[str, tuple[list[tuple[str, TensorData]], dict[str, str]]] = field(default_factory=dict)
    documents: dict[str, bytes] = field(default_factory=dict)


#: Names a format's sniff samples before reading all of them (`Format.share_of_names`).
SAMPLE_NAMES = 64


class Format:
    """Base class for format plugins. Subclasses set the class attributes and override methods."""

    name: ClassVar[str]
    label: ClassVar[str]
    description: ClassVar[str] = ""
    #: "file" (one .safetensors) or "directory".
    container: ClassVar[str] = "file"
    #: Output file suffix when the user gives no output path.
    suffix: ClassVar[str] = ".safetensors"
    #: Adapter features (see `Adapter.features`) this format holds natively when writing.
    capabilities: ClassVar[frozenset[str]] = frozenset()
    writable: ClassVar[bool] = True
    #: The pydantic model of this format's on-disk metadata or config; name it with
    #: `loraformats.schemas.on_demand` so that pydantic is imported only when it is read.
    metadata_schema: ClassVar[type[BaseModel] | None] = None
    #: Options a user may set for writing (`--set key=value`): a `loraformats.schemas.Options`
    #: dataclass (a pydantic model works too, at the cost of importing pydantic on every conversion).
    options_schema: ClassVar[type | None] = None
    #: Metadata keys this format owns (exact keys, or prefixes ending in `*`). Other formats'
    #: writers move owned keys they cannot honour into the `loraformats.stash` entry.
    owned_metadata: ClassVar[tuple[str, ...]] = ()
    #: The format this one is a dialect of (ai-toolkit of diffusers): when both explain every name,
    #: the dialect wins only if its `sniff` confirmed it (score 1.0, e.g. from its metadata).
    refines: ClassVar[str | None] = None
    #: Keys of `describe` whose value names the base model the file says it is for (e.g. kohya's
    #: `ss_base_model_version`); detection checks them against the families' aliases and the tensors.
    base_model_keys: ClassVar[tuple[str, ...]] = ()

    plugin: str = ""

    def sniff(self, header: Header) -> Evidence:
        """How much the header's names look like this format. Must not read tensor data.

        Detection sniffs a sample of a large file's names first and reads every name only for the
        formats that explain the whole sample, so a score of 1.0 for a file must also be 1.0 for any
        sample of it: lower the score for names seen, not for names missing."""
        raise NotImplementedError

    @staticmethod
    def share_of_names(header: Header, claims: Callable[[str], object], what: str) -> Evidence:
        """Evidence scored as the share of tensor names `claims` accepts ("N of M names are <what>").

        Detection sniffs every file with every format: when none of 64 names spread over the file is
        claimed, the score is 0 without reading the rest."""
        names = list(header.tensors)
        if not names:
            return Evidence(0.0, against=["the file has no tensors"])
        if len(names) > 2 * SAMPLE_NAMES:
            sample = names[:: len(names) // SAMPLE_NAMES]
            if not any(claims(name) for name in sample):
                return Evidence(
                    0.0, against=[f"none of {len(sample)} names sampled across the file is {what}"]
                )
        ours = [name for name in names if claims(name)]
        evidence = Evidence(len(ours) / len(names))
        if ours:
            evidence.reasons.append(f"{len(ours)} of {len(names)} names are {what}")
        if len(ours) < len(names):
            mine = set(ours)
            example = next(name for name in names if name not in mine)
            evidence.against.append(f"{len(names) - len(ours)} names are not, e.g. {example!r}")
        return evidence

    def parsed(self, header: Header) -> ParsedFile:
        """`parse`, once per header: a sniff that confirms a file by parsing it (Kohya's) leaves the
        parse for detection to use."""
        found = header.parses.get(self.name)
        if found is None:
            found = header.parses[self.name] = self.parse(header)
        return found

    def describe(self, header: Header) -> dict[str, str]:
        """What the header's metadata says in this format's vocabulary, summarised for people and apps
        (e.g. training settings, `trigger_words`). Detection asks every format, so entries of other
        tools' files count too. Header only; the default knows nothing."""
        return {}

    def sniff_path(self, path: Path) -> Evidence:
        """For directory formats: how much a directory looks like this format (no tensor data read)."""
        return Evidence(0.0)

    def parts(self, path: Path, context: ReadContext) -> list[tuple[Header, ParsedFile]]:
        """For directory formats: the validated header and parse of each weights file."""
        raise NotImplementedError(f"{self.name} does not read directories")

    def read_path(self, path: Path, context: ReadContext) -> AdapterSet:
        """For directory formats: build the canonical form from all parts of the directory."""
        from .assemble import assemble_parts
        from .pickles import temporaries_removed

        parts = self.parts(path, context)
        with temporaries_removed(header for header, _ in parts):  # unpickled copies, if any
            return assemble_parts(self, parts, context, where=path)

    def read(self, header: Header, context: ReadContext) -> AdapterSet:
        """Build the canonical form. The default resolves `parse` against the families."""
        from .assemble import assemble

        return assemble(self, header, self.parsed(header), context)

    def module_extras(
        self, header: Header, component: Component, path: str, roles: dict[str, TensorData]
    ) -> dict[str, Any]:
        """Adapter fields the format stores outside the tensors (e.g. alpha from a config)."""
        return {}

    def finish_read(self, adapters: AdapterSet, header: Header, context: ReadContext) -> None:
        """Apply format-specific facts after assembly (e.g. undo a documented fold)."""

    def cannot_hold(self, component: Component) -> str | None:
        """Why this format's consumers cannot load adapters of `component` at all (None: they can).
        Conversion refuses such a component unless the user drops it (`--drop-component`)."""
        return None

    def naming(self, adapters: AdapterSet, component: Component, options: Any) -> str:
        """The family naming this format writes `component`'s modules in. The planner splits or
        fuses fused groups and reorders rows so that every module has a name there. Default: the
        canonical (diffusers) naming."""
        return CANONICAL

    def encode(self, adapters: AdapterSet, options: Any) -> Encoded:
        """Render the adapter set as tensors and metadata; report every step taken."""
        raise NotImplementedError

    def owns(self, key: str) -> bool:
        return any(key.startswith(p[:-1]) if p.endswith("*") else key == p for p in self.owned_metadata)

    def default_output(self, source: Path) -> Path:
        stem = source.name.removesuffix(".safetensors") if source.is_file() else source.name
        return source.with_name(f"{stem}.{self.name}{self.suffix if self.container == 'file' else ''}")


@dataclass
class ReadContext:
    """What a reader may consult: the families to resolve against, a forced family, warnings."""

    families: dict[str, Any]
    family: str | None = None
    warnings: list[str] = field(default_factory=list)
    allow_pickle: bool = False
