"""The conversion pipeline: read -> lower -> encode -> write, reported step by step."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import format_choice
from .adapters import Exactness
from .assemble import NAMINGS_KEY, SPELLINGS_KEY, stash_foreign
from .canonical import AdapterSet
from .errors import InvalidFileError, UnsupportedError, UsageError
from .families import CANONICAL
from .formats import Format, ReadContext
from .header import Header
from .pickles import open_header, temporaries_removed
from .planning import plan
from .plugins import registry
from .report import ConversionReport, Step
from .schemas import schema_fields
from .writer import Progress, refuse_overwriting_inputs, write_directory, write_safetensors

if TYPE_CHECKING:
    from .validation import NonfiniteScan


def _format(name: str) -> Format:
    return registry.get(registry.formats, name, "format")


def sniff_format(header: Header) -> Format:
    """The one format that explains every tensor name of the header (see `detect`), else the one that
    explains most of them (its reader then names what it cannot place)."""
    evidence = format_choice.sniff_all(header)  # every name was read unless a format explains them all
    complete = format_choice.complete(header, evidence)[0]
    if len(complete) == 1:
        return complete[0]
    if complete:
        names = ", ".join(f.name for f in complete)
        raise UsageError(f"format is ambiguous ({names}); pass --from", path=header.path)
    mostly = format_choice.mostly(evidence)
    if mostly is not None:
        return mostly
    scored = sorted(((said.score, name) for name, said in evidence.items()), reverse=True)
    best = ", ".join(f"{name} {score:.1%}" for score, name in scored[:3] if score > 0) or "no format matched"
    raise UnsupportedError(f"not a LoRA file in any installed format (best: {best})", path=header.path)


def sniff_directory(path: Path) -> Format:
    """The directory format that claims `path` (e.g. a PEFT adapter directory)."""
    scored = sorted(((f.sniff_path(path).score, f.name) for f in registry.formats().values()), reverse=True)
    if not scored or scored[0][0] < 0.5:
        raise UnsupportedError("directory is not a LoRA in any installed directory format", path=path)
    if len(scored) > 1 and scored[1][0] == scored[0][0]:
        raise UsageError(f"format is ambiguous ({scored[0][1]}, {scored[1][1]}); pass --from", path=path)
    return registry.formats()[scored[0][1]]


def load(
    path: str | os.PathLike,
    *,
    format: str | None = None,
    family: str | None = None,
    warnings: list[str] | None = None,
    allow_pickle: bool = False,
) -> AdapterSet:
    """Read a LoRA file or directory into the canonical form (headers validated, tensors lazy)."""
    path = Path(path)
    context = ReadContext(families=registry.families(), family=family, allow_pickle=allow_pickle)
    if path.is_dir():
        fmt = _format(format) if format else sniff_directory(path)
        adapters = fmt.read_path(path, context)
    else:
        header = open_header(path, allow_pickle=allow_pickle)
        with temporaries_removed([header]):
            fmt = _format(format) if format else sniff_format(header)
            adapters = fmt.read(header, context)
    adapters.provenance.path = str(path)
    if warnings is not None:
        warnings.extend(context.warnings)
    return adapters


def _options(fmt: Format, options: dict[str, Any] | None) -> Any:
    """The target's write options: its defaults when none are set (an `Options` dataclass needs no
    pydantic for that), else the values validated against its schema."""
    schema = fmt.options_schema
    if schema is None:
        if options:
            raise UsageError(f"{fmt.name} takes no options (got {', '.join(options)})")
        return None
    if not options and dataclasses.is_dataclass(schema):
        return schema()
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(schema).validate_python(options or {}, strict=False)
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(p) for p in problem["loc"])
        if problem["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            known = ", ".join(schema_fields(schema)) or "none"
            raise UsageError(f"{fmt.name} has no option {where!r} (options: {known})") from None
        raise UsageError(f"option {where}: {problem['msg']}") from None


def convert(
    source: str | os.PathLike,
    to: str,
    output: str | os.PathLike | None = None,
    *,
    source_format: str | None = None,
    family: str | None = None,
    options: dict[str, Any] | None = None,
    dry_run: bool = False,
    force: bool = False,
    allow_lossy: bool = False,
    allow_pickle: bool = False,
    rank: int | None = None,
    max_error: float | None = None,
    strict: bool = False,
    check_values: bool = True,
    drop: list[str] | tuple[str, ...] = (),
    progress: Progress | None = None,
    fsync: bool = False,
) -> ConversionReport:
    """Convert `source` to format `to`. Returns the report; raises a `LoraFormatsError` on refusal.

    `progress(done, total)` is called as tensor bytes are written (about every 64 MiB), for a
    progress bar. `fsync` flushes the output to the device before it is renamed into place.

    `rank` / `max_error` ask for the one lossy step, SVD compression to a LoRA (the request itself
    allows it); the error of every module is measured and reported.
    """
    source = Path(source)
    target = _format(to)
    if not target.writable:
        raise UsageError(f"{target.name} is read-only")
    write_options = _options(target, options)
    output_path = Path(output) if output is not None else target.default_output(source)
    refuse_overwriting_inputs(output_path, [source])
    if output_path.exists() and not force and not dry_run:
        raise UsageError("output exists; pass --force to replace it", path=output_path)
    warnings: list[str] = []
    adapters = load(source, format=source_format, family=family, warnings=warnings, allow_pickle=allow_pickle)
    try:
        read = Step(
            stage="read",
            name=f"read {adapters.provenance.format}",
            exactness=Exactness.IDENTICAL,
            modules=len(adapters.modules),
            detail=f"family {adapters.family.name}",
        )
        steps = [read, *adapters.provenance.steps]
        dropped = _drop_components(adapters, target, drop, warnings)
        if dropped:
            steps.append(_drop_step(dropped))
        # The NaN/Inf scan reads every tensor. It starts once the copy does, so that its numpy import
        # does not take the GIL from planning; the copy and the scan then overlap (writev, pread and
        # numpy release the GIL). It settles, helped by this thread, before the output is committed.
        scan = _ValueScan(adapters) if check_values else None

        def settle() -> None:
            if scan is not None:
                _check_values(scan.result(), source, strict, warnings)

        planned = plan(
            adapters,
            target,
            registry.transforms(),
            allow_lossy=allow_lossy or rank is not None or max_error is not None,
            rank=rank,
            max_error=max_error,
            options=write_options,
        )
        lowered = planned.adapters
        steps += planned.steps
        encoded = target.encode(lowered, write_options)
        steps += encoded.steps
        warnings += encoded.warnings
        files = encoded.files or {"": (encoded.tensors, encoded.metadata)}
        for name, (tensors, metadata) in files.items():
            metadata = stash_foreign(metadata, target, registry.formats().values())
            metadata.update(_provenance(adapters))
            files[name] = (tensors, metadata)
        exactness = Exactness.IDENTICAL
        for step in steps:
            exactness = exactness.worst(step.exactness)
        report = ConversionReport(
            input=str(source),
            output=None if dry_run else str(output_path),
            source_format=adapters.provenance.format,
            target_format=target.name,
            family=adapters.family.name,
            modules=len(adapters.modules),
            tensors_written=sum(len(tensors) for tensors, _ in files.values()),
            dry_run=dry_run,
            exactness=exactness,
            steps=steps,
            warnings=warnings,
            approximation=planned.approximation,
            dropped=dropped,
        )
        if dry_run:
            settle()
            report.warnings = list(warnings)
            return report
        copying = scan.start if scan is not None else None
        if target.container == "directory":
            report.bytes_written = write_directory(
                output_path,
                files,
                encoded.documents,
                overwrite=force,
                while_copying=copying,
                before_commit=settle,
                progress=progress,
                fsync=fsync,
            )
        else:
            tensors, metadata = files[""]
            report.bytes_written = write_safetensors(
                output_path,
                tensors,
                metadata,
                overwrite=force,
                while_copying=copying,
                before_commit=settle,
                progress=progress,
                fsync=fsync,
            )
        report.warnings = list(warnings)  # settle may have added the scan's
        return report
    except ValueError as error:  # a tensor that fails to decode mid-write is an invalid input
        raise InvalidFileError(str(error), path=source) from None
    finally:
        adapters.close()


def _drop_components(
    adapters: AdapterSet, target: Format, drop: list[str] | tuple[str, ...], warnings: list[str]
) -> list[str]:
    """Remove the modules of components the user drops, returning every tensor left out
    ("component:path role"); refuse components the target cannot hold."""
    unknown = [name for name in drop if name not in adapters.family.components]
    if unknown:
        known = ", ".join(adapters.family.components)
        raise UsageError(
            f"--drop-component {unknown[0]}: {adapters.family.name} has no such component ({known})"
        )
    used = adapters.components_used()
    warnings += [
        f"--drop-component {n}: the file adapts no module of it; nothing dropped"
        for n in drop
        if n not in used
    ]
    for name in used:
        why = target.cannot_hold(adapters.component(name))
        if why and name not in drop:
            raise UnsupportedError(
                f"{target.name} cannot hold {name}: {why}; pass --drop-component {name} to leave it out",
                path=adapters.provenance.path,
            )
    gone = [key for key in adapters.modules if key[0] in drop]
    named = [f"{c}:{p} {role}" for c, p in gone for role in adapters.modules[(c, p)].tensors()]
    for key in gone:
        del adapters.modules[key]
    return named


def _drop_step(dropped: list[str]) -> Step:
    modules = {entry.rpartition(" ")[0] for entry in dropped}
    components = ", ".join(sorted({module.partition(":")[0] for module in modules}))
    return Step(
        stage="drop",
        name="components left out",
        exactness=Exactness.APPROXIMATE,
        modules=len(modules),
        detail=f"on request: every module of {components} ({len(dropped)} tensors, listed in `dropped`)",
    )


class _ValueScan(threading.Thread):
    """The NaN/Inf scan in a background thread of lower priority (`_yield_cpu`). `result` starts it
    if nobody did, then helps it: the caller, which would only wait, drains the tensors left at its
    own priority. The thread's error is re-raised."""

    def __init__(self, adapters: AdapterSet) -> None:
        super().__init__(name="loraformats-value-scan", daemon=True)
        self.adapters = adapters
        self.error: BaseException | None = None
        self._scan: NonfiniteScan | None = None
        self._lock = threading.Lock()

    def _shared(self) -> NonfiniteScan:
        with self._lock:  # built by whichever thread comes first (numpy is imported there)
            if self._scan is None:
                from .validation import NonfiniteScan

                self._scan = NonfiniteScan(self.adapters)
            return self._scan

    def run(self) -> None:
        _yield_cpu()
        try:
            self._shared().drain()
        except BaseException as error:  # handed to the caller at settle time
            self.error = error

    def result(self) -> dict[str, int]:
        if self.ident is None:  # nothing was copied (a dry run): scan now
            self.start()
        scan = self._shared()
        scan.drain()
        self.join()
        if self.error is not None:
            raise self.error
        return scan.counts


def _yield_cpu(by: int = 2) -> None:
    """Give the calling thread a slightly lower priority (Linux threads each have a nice value):
    writing to a disk, the copy and the kernel's writeback then keep the CPU, and a 1.8 GB
    conversion to ext4 runs 0.75 s instead of 1.2 s (`cp`: 0.62 s). Only slightly: a thread at
    +5 got so little CPU in busy spells that most of the scan was left for the end. Elsewhere, or
    if refused, nothing changes."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError):
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + by))


def _check_values(bad: dict[str, int], source: Path, strict: bool, warnings: list[str]) -> None:
    """NaN/Inf weights: a warning naming the modules, or (strict) a refusal."""
    if not bad:
        return
    worst = ", ".join(f"{module} ({count})" for module, count in sorted(bad.items(), key=lambda i: -i[1])[:3])
    message = f"{sum(bad.values())} NaN/Inf values in {len(bad)} modules, e.g. {worst}"
    if strict:
        raise InvalidFileError(message, path=source)
    warnings.append(message + " (--strict refuses such files)")


def _provenance(adapters: AdapterSet) -> dict[str, str]:
    import json

    from . import __version__

    notes = {
        "loraformats.version": __version__,
        "loraformats.source_format": adapters.provenance.format,
    }
    if adapters.provenance.namings:  # even canonical: a Kohya writer's default may differ (SDXL)
        notes[NAMINGS_KEY] = json.dumps(adapters.provenance.namings, sort_keys=True)
    if any(naming != CANONICAL for naming in adapters.provenance.spellings.values()):
        notes[SPELLINGS_KEY] = json.dumps(adapters.provenance.spellings, sort_keys=True)
    return notes
