#!/usr/bin/env python
"""Fuzz the safetensors header parser and every reader behind it (atheris, i.e. libFuzzer).

Each input is written to a file and goes through `read_header`, `loraformats.detect`,
`loraformats.load` (every tensor's bytes read, NaN/Inf scanned) and `loraformats.convert`. The only
acceptable failure is a `LoraFormatsError` with a one-line message; anything else is a finding, as
is a modified input or a file left behind. See fuzz/README.md for the command.

The custom mutator keeps the 8-byte length prefix consistent most of the time, and sometimes
swaps one JSON value of the header for a hostile one, so that mutations reach the format
plugins instead of stopping at "header length exceeds the file size".
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import traceback
import warnings
from importlib.metadata import entry_points
from pathlib import Path

import atheris

PLUGINS = entry_points(group="loraformats")
with atheris.instrument_imports(include=["loraformats", *(plugin.value for plugin in PLUGINS)]):
    import loraformats
    from loraformats.errors import LoraFormatsError
    from loraformats.header import read_header
    from loraformats.validation import scan_nonfinite

    for plugin in PLUGINS:  # the plugins parse metadata and configs: instrument them too
        plugin.load()

ROOT = str(Path(__file__).resolve().parents[1])
TARGETS = ("diffusers", "kohya", "peft")
WORK = Path(
    tempfile.mkdtemp(prefix="loraformats-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
)
INPUT = WORK / "input.safetensors"
atexit.register(shutil.rmtree, WORK, ignore_errors=True)  # libFuzzer leaves through exit()

#: Values a hostile header might hold, for the JSON-aware mutation.
HOSTILE_VALUES: list[object] = [
    -1, 0, 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30, 1e308, 0.5, True, None, "", "F16",
    "BF16", "F8_E8M0", "C64", [], [0], [2**62, 2**62], [0, 2**64], {}, {"a": "b"}, "[" * 64, "(", "(a*)*b",
    '{"unet.r": 1, "unet.rank_pattern": {"(": 1}}', '{"text_encoder.r": 4, "text_encoder.lora_alpha": 1e400}',
    '{"unet:down_blocks.0": 5}', '{"unet": "nonsense"}', "\u2028", "😀", "text_encoder.", "lora_te_",
    ".alpha",
]  # fmt: skip


#: With FUZZ_KEEP_GOING=DIR, each distinct crash site (exception type, file, function) is written
#: to DIR once and fuzzing goes on, so a long run is not stopped by the first known bug.
KEEP_GOING = os.environ.get("FUZZ_KEEP_GOING")
SEEN: set[tuple[str, str, str]] = set()


def run_one(data: bytes) -> None:
    try:
        check(data)
    except Exception as error:
        if not KEEP_GOING:
            raise
        site = crash_site(error)
        if site not in SEEN:
            SEEN.add(site)
            name = "-".join(site).replace("/", "_").replace(".py", "")
            Path(KEEP_GOING, f"crash-{name}").write_bytes(data)
            trace = "".join(traceback.format_exception(error))
            Path(KEEP_GOING, f"crash-{name}.txt").write_text(trace)
            print(f"\n=== new crash site {site} ===\n{trace}", file=sys.stderr, flush=True)


def crash_site(error: BaseException) -> tuple[str, str, str]:
    """The innermost frame in the project's own code: where the bug is, stable across line edits."""
    site = ("?", "?")
    for frame in traceback.extract_tb(error.__traceback__):
        if ROOT in frame.filename and "/fuzz/" not in frame.filename:
            site = (os.path.relpath(frame.filename, ROOT), frame.name)
    return (type(error).__name__, *site)


def check(data: bytes) -> None:
    """Run one input through every entry point; raise on anything but a one-line LoraFormatsError.

    Warnings are errors: the command line would print them, breaking the one-line promise.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_steps(data)


def run_steps(data: bytes) -> None:
    INPUT.write_bytes(data)
    digest = hashlib.sha256(data).digest()
    target = TARGETS[len(data) % len(TARGETS)]
    for step in (
        lambda: read_header(INPUT),
        lambda: loraformats.detect(INPUT),
        touch_every_tensor,
        lambda: loraformats.convert(INPUT, target, WORK / "output", force=True),
    ):
        try:
            step()
        except LoraFormatsError as error:
            if "\n" in str(error):
                raise AssertionError(f"multi-line error message: {error!r}") from None
    if hashlib.sha256(INPUT.read_bytes()).digest() != digest:
        raise AssertionError("the input was modified")
    leftovers = sorted(p.name for p in WORK.iterdir() if p.name not in ("input.safetensors", "output"))
    if leftovers:
        raise AssertionError(f"files left behind: {leftovers}")
    output = WORK / "output"
    if output.is_dir():
        shutil.rmtree(output)
    else:
        output.unlink(missing_ok=True)


def touch_every_tensor() -> None:
    with loraformats.load(INPUT) as adapters:
        for adapter in adapters.modules.values():
            for tensor in adapter.tensors().values():
                if len(tensor.read_bytes()) != tensor.nbytes:
                    raise AssertionError("a validated tensor read short")
        scan_nonfinite(adapters)


def mutate(data: bytes, max_size: int, seed: int) -> bytes:
    """Mutate the header or the data section of a well-framed file and re-frame it; else raw bytes."""
    rng = random.Random(seed)
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if 0 <= n <= len(data) - 8 and rng.random() < 0.8:
        header, body = data[8 : 8 + n], data[8 + n :]
        choice = rng.random()
        if choice < 0.3:
            header = replace_json_value(header, rng)
        elif choice < 0.85:
            header = atheris.Mutate(header, max(2 * len(header), 64))
        else:
            body = atheris.Mutate(body, max(len(body), 16))
        return (len(header).to_bytes(8, "little") + header + body)[:max_size]
    return atheris.Mutate(data, max_size)


def replace_json_value(header: bytes, rng: random.Random) -> bytes:
    """Set one value somewhere in the header JSON (an entry field, a metadata string) to a hostile one."""
    try:
        doc = json.loads(header)
    except ValueError:
        return header
    node: object = doc
    while isinstance(node, dict) and node:
        key = rng.choice(sorted(node))
        child = node[key]
        if not isinstance(child, dict) or not child or rng.random() < 0.3:
            value = rng.choice(HOSTILE_VALUES)
            node[key] = value if not isinstance(child, str) or rng.random() < 0.5 else json.dumps(value)
            break
        node = child
    return json.dumps(doc, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")


def main() -> None:
    if KEEP_GOING:
        os.makedirs(KEEP_GOING, exist_ok=True)
    atheris.Setup(sys.argv, run_one, custom_mutator=mutate)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
