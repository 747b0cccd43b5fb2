"""The `loraformats` command line. Errors print one line on stderr and exit with a documented code."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from .errors import EXIT_CODES, LoraFormatsError, UsageError

PICKLE_HELP = "read a pickled .pt/.ckpt/.bin input with torch.load(weights_only=True) (refused by default)"


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line like every other error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(UsageError.exit_code, f"loraformats: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    codes = "\n".join(f"  {code}  {meaning}" for code, meaning in EXIT_CODES.items())
    parser = _Parser(
        prog="loraformats",
        description="Convert LoRA weights between formats (Kohya, Diffusers, ...), exactly and with proof.",
        epilog=f"exit codes:\n{codes}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    convert = commands.add_parser("convert", help="convert a LoRA to another format")
    convert.add_argument("input", help="input LoRA file")
    convert.add_argument(
        "--to", required=True, metavar="FORMAT", help="target format (see `loraformats formats`)"
    )
    convert.add_argument(
        "-o", "--output", help="output path (default: INPUT.<format>.safetensors beside the input)"
    )
    convert.add_argument(
        "--from", dest="source_format", metavar="FORMAT", help="input format (default: detected)"
    )
    convert.add_argument("--family", help="base-model family (default: detected)")
    convert.add_argument(
        "--set",
        dest="options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a target-format option, e.g. naming=ldm or fold_alpha=true (repeatable)",
    )
    convert.add_argument(
        "--rank",
        type=int,
        metavar="N",
        help="lossy: compress every module to a LoRA of rank <= N (truncated SVD; error reported)",
    )
    convert.add_argument(
        "--max-error",
        type=float,
        metavar="E",
        help="lossy: compress every module to the least rank with relative error <= E (e.g. 0.01)",
    )
    convert.add_argument(
        "--drop-component",
        dest="drop",
        action="append",
        default=[],
        metavar="NAME",
        help="lossy: leave out every module of a component, e.g. text_encoder_2 (repeatable; reported)",
    )
    convert.add_argument("--dry-run", action="store_true", help="plan and report, write nothing")
    convert.add_argument("--force", action="store_true", help="replace an existing output (never the input)")
    convert.add_argument("--report", choices=["text", "json"], default="text", help="report format on stdout")
    convert.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)
    convert.add_argument("--strict", action="store_true", help="refuse NaN/Inf weights instead of warning")
    convert.add_argument(
        "--no-value-check",
        dest="check_values",
        action="store_false",
        help="skip the NaN/Inf scan (it reads every tensor once)",
    )
    convert.add_argument(
        "--fsync",
        action="store_true",
        help="flush the output to the device before renaming it into place (survives a power cut)",
    )

    detect = commands.add_parser("detect", help="identify a LoRA file from its header alone")
    detect.add_argument("input")
    detect.add_argument("--json", action="store_true", help="print the versioned JSON result")
    detect.add_argument("--alphas", action="store_true", help="also read the (scalar) alpha tensors")
    detect.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)

    inspect = commands.add_parser("inspect", help="a readable report of a LoRA file, from its header alone")
    inspect.add_argument("input")
    inspect.add_argument("--json", action="store_true", help="print the versioned JSON result")
    inspect.add_argument("--alphas", action="store_true", help="also read the (scalar) alpha tensors")
    inspect.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)

    formats = commands.add_parser("formats", help="list installed formats, families and plugins")
    formats.add_argument("--json", action="store_true")

    verify = commands.add_parser("verify", help="check two LoRA files make the same change to a random base")
    verify.add_argument("a")
    verify.add_argument("b")
    verify.add_argument("--family", help="base-model family (default: detected)")
    verify.add_argument("--seed", type=int, default=0)
    verify.add_argument(
        "--tolerance", type=float, help="relative error allowed per module (default: per dtype)"
    )
    verify.add_argument("--json", action="store_true")
    verify.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)
    return parser


def _parse_options(pairs: Sequence[str]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--set expects KEY=VALUE, got {pair!r}")
        options[key.strip()] = value.strip()
    return options


def _convert(args: argparse.Namespace) -> int:
    from .conversion import convert
    from .terminal import WriteProgress

    progress = WriteProgress() if sys.stderr.isatty() else None  # none when piped
    try:
        report = convert(
            args.input,
            args.to,
            args.output,
            source_format=args.source_format,
            family=args.family,
            options=_parse_options(args.options),
            dry_run=args.dry_run,
            force=args.force,
            allow_pickle=args.allow_pickle,
            rank=args.rank,
            max_error=args.max_error,
            strict=args.strict,
            check_values=args.check_values,
            drop=args.drop,
            progress=progress,
            fsync=args.fsync,
        )
    finally:
        if progress is not None:
            progress.close()  # before any other output
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.report == "json":
        print(report.model_dump_json(indent=2))
        return 0
    verb = "would write" if report.dry_run else "wrote"
    target = report.output or "(nothing)"
    print(
        f"{report.source_format} -> {report.target_format} ({report.family}, {report.modules} modules): "
        f"{verb} {target}"
    )
    for step in report.steps:
        print(
            f"  {step.stage:<9} {step.name:<32} {step.exactness.value:<11} {step.modules:>5} modules"
            f"  {step.detail}"
        )
    print(f"  overall: {report.exactness.value}")
    return 0


def _detect(args: argparse.Namespace) -> int:
    from .detection import detect

    result = detect(args.input, read_alphas=args.alphas, allow_pickle=args.allow_pickle)
    if args.json:
        print(result.model_dump_json(indent=2))
        return 0
    print(f"{result.path}\n  format: {result.format}\n  family: {result.family}")
    if len(result.releases) > 1:
        print(f"  release: ambiguous ({', '.join(result.releases)})")
    elif result.releases:
        print(f"  release: {result.releases[0]}")
    if result.variant:
        print(f"  naming: {result.variant}")
    print(f"  confidence: {result.confidence:.2f}")
    if result.algorithms:
        print(f"  algorithms: {', '.join(result.algorithms)}")
    for component in result.components:
        ranks = ", ".join(f"r{rank}×{n}" for rank, n in component.ranks.items())
        print(f"  {component.name}: {component.modules} modules ({ranks}; {'/'.join(component.dtypes)})")
    if result.alphas:
        print("  alphas: " + ", ".join(f"{a}×{n}" for a, n in result.alphas.items()))
    for reason in result.reasons:
        print(f"  - {reason}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .inspection import inspect, render

    report = inspect(args.input, allow_pickle=args.allow_pickle, read_alphas=args.alphas)
    print(report.model_dump_json(indent=2) if args.json else render(report))
    return 0


def _formats(args: argparse.Namespace) -> int:
    from .plugins import registry

    formats, families = registry.formats(), registry.families()
    if args.json:
        print(
            json.dumps(
                {
                    "formats": {
                        n: {"label": f.label, "plugin": f.plugin, "writable": f.writable}
                        for n, f in formats.items()
                    },
                    "families": {n: {"label": f.label, "plugin": f.plugin} for n, f in families.items()},
                    "plugins": {
                        n: {"module": p.module, "distribution": p.distribution, "version": p.version}
                        for n, p in registry.plugins.items()
                    },
                },
                indent=2,
            )
        )
        return 0
    print("formats:")
    for name, fmt in formats.items():
        mode = "read/write" if fmt.writable else "read-only"
        print(f"  {name:<14} {fmt.label} [{mode}; plugin {fmt.plugin}]")
    print("families:")
    for name, family in families.items():
        print(f"  {name:<14} {family.label} [plugin {family.plugin}]")
    print("plugins:")
    for name, info in registry.plugins.items():
        origin = (
            f"{info.distribution} {info.version or ''}".strip()
            if info.distribution
            else "registered in-process"
        )
        print(f"  {name:<14} {info.module} ({origin})")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .errors import VerificationError
    from .verification import verify

    report = verify(
        args.a,
        args.b,
        family=args.family,
        seed=args.seed,
        tolerance=args.tolerance,
        allow_pickle=args.allow_pickle,
    )
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        status = "same" if report.ok else "DIFFERENT"
        print(
            f"{status}: {report.modules} modules compared ({report.family}), "
            f"max relative error {report.max_relative_error:.3g}"
        )
        for failure in report.failures[:20]:
            print(f"  {failure.module}: {failure.relative_error:.3g} > {failure.tolerance:.3g}")
        for name in report.only_in_a[:10]:
            print(f"  only in A: {name}")
        for name in report.only_in_b[:10]:
            print(f"  only in B: {name}")
    if not report.ok:
        raise VerificationError(
            f"{len(report.failures)} modules differ, "
            f"{len(report.only_in_a) + len(report.only_in_b)} present in one file only"
        )
    return 0


def _printable(text: str) -> str:
    """One line whatever a path contains: control characters are shown escaped."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    handlers = {
        "convert": _convert,
        "detect": _detect,
        "inspect": _inspect,
        "formats": _formats,
        "verify": _verify,
    }
    if args.command is None:
        parser.print_help()
        return UsageError.exit_code
    try:
        return handlers[args.command](args)
    except LoraFormatsError as error:
        print(f"loraformats: error: {_printable(str(error))}", file=sys.stderr)
        return error.exit_code
    except BrokenPipeError:  # the reader went away (e.g. `| head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("loraformats: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("loraformats: error: out of memory", file=sys.stderr)
        return 1
    except Exception as error:  # a bug: say so in one line, keep the traceback out of the user's way
        print(
            f"loraformats: internal error: {type(error).__name__}: {error} (please report this)",
            file=sys.stderr,
        )
        return 1
