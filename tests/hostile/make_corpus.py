"""Crafted hostile inputs: every one must be refused in one line, quickly, with nothing left behind.

`build(directory)` writes the corpus and returns its cases; the tests call it in a session fixture
and the fuzzer seeds from it (`python tests/hostile/make_corpus.py DIR`). Files are generated
rather than committed: FIFOs, sockets and symlink loops cannot be committed, and the generator is
the documentation of each case.

Each case gives the exit code `convert` and `detect` must return and a word the error must
contain. A few inputs are valid but no LoRA (emoji names, a plain weight, an empty directory):
`detect` then answers "unknown" with exit 0 by design, and only `convert` refuses.
`build_metadata(directory)` adds valid files whose metadata or PEFT config is hostile, for the
format plugins behind the header.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

INVALID, REFUSED = 3, 4  # exit codes: invalid input file, unsupported or refused
MARKER = "PAYLOAD-RAN"  # a pickle payload creates this file in the corpus directory if it ever runs

#: A Kohya module of SD1's text encoder (rank 1): only SD1 has a 768-wide `lora_te_` encoder.
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
UNET = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    convert: int  # expected exit code of `loraformats convert PATH --to diffusers`
    detect: int  # expected exit code of `loraformats detect PATH`
    needle: str  # a word the one-line error must contain ("" when detect succeeds)
    #: Not a regular file (FIFO, device, socket, loop): run it only in a subprocess with a timeout,
    #: so that a regression hangs one subprocess instead of the test session.
    special: bool = False


def safetensors(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """A file with this header (a dict, or raw bytes for non-JSON) and data; `length` may lie."""
    raw = header if isinstance(header, bytes) else json.dumps(header, ensure_ascii=False).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def entry(dtype: str = "F32", shape: list | tuple = (2,), offsets: list | tuple = (0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def lora_tensors() -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """A valid two-module SD1 Kohya LoRA (rank 1, fp16): name -> (dtype, shape, bytes)."""
    one = struct.pack("<e", 1.0)
    return {
        f"{TE}.alpha": ("F16", (), one),
        f"{TE}.lora_down.weight": ("F16", (1, 768), one * 768),
        f"{TE}.lora_up.weight": ("F16", (768, 1), b"\0\0" * 768),
        f"{UNET}.alpha": ("F16", (), one),
        f"{UNET}.lora_down.weight": ("F16", (1, 768), one * 768),
        f"{UNET}.lora_up.weight": ("F16", (320, 1), b"\0\0" * 320),
    }


def lora_file(tensors: dict[str, tuple[str, tuple[int, ...], bytes]], metadata: dict | None = None) -> bytes:
    """Serialise tensors the way safetensors does (contiguous, in order), with optional metadata."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    data = b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = entry(dtype, shape, (len(data), len(data) + len(raw)))
        data += raw
    raw_header = json.dumps(header, ensure_ascii=False).encode()
    raw_header += b" " * (-len(raw_header) % 8)
    return safetensors(raw_header, data)


def _deep(depth: int = 100_000) -> bytes:
    return b"[" * depth + b"]" * depth


def _duplicate() -> bytes:
    one = json.dumps(entry())
    return safetensors(f'{{"t": {one}, "t": {one}}}'.encode(), b"\0" * 8)


def _torch_zip(payload: object) -> bytes:
    """What torch.save writes: the real format, so a regression to a plain torch.load would run it."""
    from io import BytesIO

    import torch

    buffer = BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


class Payload:
    """Unpickling this creates the marker file. It must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


#: The valid LoRA as a file (about 6 KB): the base of the truncated and mutated cases.
VALID_LORA = lora_file(lora_tensors())

#: Invalid safetensors files: `convert` and `detect` both exit 3. name -> (bytes, needle).
INVALID_FILES: dict[str, tuple[bytes, str]] = {
    "empty": (b"", "too short"),
    "five_bytes": (b"\x10\0\0\0\0", "too short"),
    "eight_bytes": (b"\0" * 8, "not valid JSON"),
    "truncated_header": (safetensors({"t": entry()}, b"\0" * 8)[:30], "file size"),
    "truncated_data": (VALID_LORA[:-100], "data section"),
    "length_beyond_file": (safetensors(b"{}", length=10**6), "file size"),
    "length_2_64": (safetensors(b"{}", length=2**64 - 1), "100 MB cap"),
    "length_just_over_cap": (safetensors(b"{}", length=100_000_001), "100 MB cap"),
    "header_not_json": (safetensors(b"{oops"), "not valid JSON"),
    "header_not_utf8": (safetensors(b'{"\xff\xfe": 1}'), "UTF-8"),
    "header_array": (safetensors(b"[1, 2]  "), "not an object"),
    "header_deep_nesting": (safetensors(_deep()), "nested too deeply"),
    "header_nan_literal": (safetensors(b'{"t": NaN}'), "NaN"),
    "header_5000_digit_number": (
        safetensors(b'{"t": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 0]}}'),
        "not valid JSON",
    ),
    "shape_overflows_int64": (safetensors({"t": entry(shape=[2**32, 2**32], offsets=[0, 2**66])}), "2**63"),
    "zero_dim_hides_huge_shape": (safetensors({"t": entry(shape=[0, 2**62, 2**62], offsets=[0, 0])}), "2**"),
    "dim_beyond_uint64": (safetensors({"t": entry(shape=[2**64], offsets=[0, 0])}), "2**63"),
    "negative_dim": (safetensors({"t": entry(shape=[-2])}, b"\0" * 8), "non-negative"),
    "float_dim": (safetensors({"t": entry(shape=[2.0])}, b"\0" * 8), "non-negative"),
    "bool_dim": (safetensors({"t": entry(shape=[True], offsets=[0, 4])}, b"\0" * 4), "non-negative"),
    "string_shape": (safetensors({"t": entry(shape="2")}, b"\0" * 8), "non-negative"),
    "unknown_dtype": (safetensors({"t": entry(dtype="F13")}, b"\0" * 8), "unknown dtype"),
    "dtype_not_string": (safetensors({"t": entry(dtype=["F32"])}, b"\0" * 8), "unknown dtype"),
    "size_mismatch": (safetensors({"t": entry(shape=[3])}, b"\0" * 8), "needs 12 bytes"),
    "negative_offset": (safetensors({"t": entry(offsets=[-8, 0])}, b"\0" * 8), "data_offsets"),
    "reversed_offsets": (safetensors({"t": entry(offsets=[8, 0])}, b"\0" * 8), "data_offsets"),
    "offsets_beyond_data": (safetensors({"t": entry(offsets=[8, 16])}, b"\0" * 8), "gap"),
    "offsets_beyond_int64": (safetensors({"t": entry(shape=[0], offsets=[2**70, 2**70])}), "data_offsets"),
    "overlapping_offsets": (safetensors({"t": entry(), "u": entry(offsets=[4, 12])}, b"\0" * 12), "overlaps"),
    "same_bytes_twice": (safetensors({"t": entry(), "u": entry()}, b"\0" * 8), "overlaps"),
    "trailing_bytes": (safetensors({"t": entry()}, b"\0" * 12), "trailing"),
    "duplicate_names": (_duplicate(), "twice"),
    "entry_extra_field": (safetensors({"t": {**entry(), "x": 1}}, b"\0" * 8), "exactly"),
    "entry_missing_offsets": (safetensors({"t": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), "exactly"),
    "entry_not_object": (safetensors({"t": [1, 2]}), "exactly"),
    "metadata_not_string": (safetensors({"__metadata__": {"a": 1}}), "strings to strings"),
    "metadata_list": (safetensors({"__metadata__": []}), "strings to strings"),
    "metadata_lone_surrogate": (safetensors(b'{"__metadata__": {"a": "\\udc00"}}'), "Unicode"),
    "name_lone_surrogate": (
        safetensors(b'{"\\ud800": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', b"\0" * 8),
        "Unicode",
    ),
    "name_with_newline": (safetensors({f"{TE}\nlora_up.weight": entry()}, b"\0" * 8), "control characters"),
    "name_with_line_separator": (safetensors({"a\u2028b": entry()}, b"\0" * 8), "control characters"),
}

#: Valid safetensors that are no LoRA: `detect` answers "unknown" (exit 0), `convert` refuses (4).
NOT_LORA_FILES: dict[str, bytes] = {
    "emoji_names": lora_file(
        {"lora_unet_😀.lora_down.weight": ("F32", (1,), b"\0" * 4), "🦙": ("U8", (), b"!")}
    ),
    "not_a_lora": lora_file({"weight": ("F32", (2, 2), b"\0" * 16)}),
}


def diffusers_file(metadata: dict[str, str]) -> bytes:
    """The valid LoRA in diffusers naming (no alpha tensors), with the given metadata."""
    renamed = {}
    for name, value in lora_tensors().items():
        stem, _, role = name.partition(".")
        if role != "alpha":
            path = DIFFUSERS_PATHS[stem]
            renamed[f"{path}.lora_{'A' if role.startswith('lora_down') else 'B'}.weight"] = value
    return lora_file(renamed, metadata)


DIFFUSERS_PATHS = {
    TE: "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
    UNET: "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
}
_ALPHA_NOTE = "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
_DEEP = _deep().decode()
_HUGE = "9" * 5000


def _fold(**folded: object) -> str:
    """A `loraformats.alphas` note saying the unet module's alpha was folded into a factor."""
    note = {
        "dtype": "F16",
        "hex": "003c",
        "shape": [],
        "folded": {"dtype": "F16", "factor": "down", **folded},
    }
    return json.dumps({_ALPHA_NOTE: note})


def _config(**fields: object) -> str:
    return json.dumps({"unet.r": 1, "unet.lora_alpha": 1, **{f"unet.{k}": v for k, v in fields.items()}})


#: Hostile metadata the format plugins parse after the header is valid (a LoraConfig in
#: `lora_adapter_metadata`, loraformats' own notes): name -> (bytes, exit codes `convert` may
#: return). An unreadable loraformats note is ignored with a warning (exit 0); a bad LoraConfig is
#: refused. Never an internal error (exit 1), never a hang.
METADATA_FILES: dict[str, tuple[bytes, tuple[int, ...]]] = {
    "diffusers_config_bad_regex": (
        diffusers_file({"lora_adapter_metadata": _config(rank_pattern={"(": 1})}),
        (INVALID, REFUSED),
    ),
    "diffusers_config_deep_json": (diffusers_file({"lora_adapter_metadata": _DEEP}), (INVALID, REFUSED)),
    "diffusers_config_huge_number": (
        diffusers_file({"lora_adapter_metadata": '{"unet.r": ' + _HUGE + "}"}),
        (INVALID, REFUSED),
    ),
    "kohya_namings_note_deep_json": (lora_file(lora_tensors(), {"loraformats.namings": _DEEP}), (0,)),
    "kohya_stash_note_deep_json": (lora_file(lora_tensors(), {"loraformats.stash": _DEEP}), (0,)),
    "kohya_stash_note_huge_number": (lora_file(lora_tensors(), {"loraformats.stash": _HUGE}), (0,)),
    "alphas_note_not_an_object": (diffusers_file({"loraformats.alphas": json.dumps({_ALPHA_NOTE: 5})}), (0,)),
    "alphas_note_huge_exponent": (diffusers_file({"loraformats.alphas": _fold(log2=-(10**6))}), (0, INVALID)),
    "alphas_note_overflowing_unfold": (diffusers_file({"loraformats.alphas": _fold(log2=-30)}), (0, INVALID)),
    "alphas_note_unknown_dtype": (
        diffusers_file({"loraformats.alphas": _fold(log2=-2, dtype="F15")}),
        (0, INVALID),
    ),
}

#: Catastrophic backtracking in a PEFT pattern: matched naively against a module path, it never ends.
REDOS = diffusers_file({"lora_adapter_metadata": _config(alpha_pattern={"(.*.*.*.*.*.*.*.*.*.*)*z": 2})})


#: Hostile adapter_config.json contents of a PEFT directory; `convert` must refuse them (3 or 4).
PEFT_CONFIGS = {
    "peft_config_bad_regex": json.dumps({"peft_type": "LORA", "r": 1, "rank_pattern": {"(": 1}}),
    "peft_config_deep_json": _DEEP,
    "peft_config_huge_number": '{"r": ' + _HUGE + "}",
}


def peft_directories(directory: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """PEFT adapter directories whose adapter_config.json is hostile: name -> (path, exit codes)."""
    stem = "base_model.model." + DIFFUSERS_PATHS[UNET].removeprefix("unet.")
    weights = lora_file(
        {
            f"{stem}.lora_A.weight": ("F16", (1, 768), struct.pack("<e", 1.0) * 768),
            f"{stem}.lora_B.weight": ("F16", (320, 1), b"\0\0" * 320),
        }
    )
    cases = {}
    for name, config in PEFT_CONFIGS.items():
        adapter = directory / name / "unet"
        adapter.mkdir(parents=True)
        (adapter / "adapter_config.json").write_text(config)
        (adapter / "adapter_model.safetensors").write_bytes(weights)
        cases[name] = (directory / name, (INVALID, REFUSED))
    return cases


def _specials(directory: Path) -> dict[str, tuple[Path, int, int, str]]:
    """Inputs that are not regular files, or not files at all."""
    cases: dict[str, tuple[Path, int, int, str]] = {}
    fifo = directory / "fifo.safetensors"
    os.mkfifo(fifo)
    cases["fifo"] = (fifo, INVALID, INVALID, "not a regular file")
    for device in ("zero", "urandom"):
        link = directory / f"dev_{device}.safetensors"
        link.symlink_to(f"/dev/{device}")
        cases[f"dev_{device}"] = (link, INVALID, INVALID, "not a regular file")
    loop = directory / "loop.safetensors"
    loop.symlink_to(directory / "loop2.safetensors")
    (directory / "loop2.safetensors").symlink_to(loop)
    cases["symlink_loop"] = (loop, INVALID, INVALID, "symbolic links")
    sock = directory / "socket.safetensors"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(sock))
    cases["socket"] = (sock, INVALID, INVALID, "not a regular file")
    directory_input = directory / "a_directory.safetensors"
    directory_input.mkdir()
    cases["directory"] = (directory_input, REFUSED, 0, "directory")  # detect: "unknown"
    cases["missing"] = (directory / "missing.safetensors", INVALID, INVALID, "no such file")
    return cases


#: Checkpoint names a pickle may hide under: a torch.save zip, or a bare pickle stream.
PICKLE_FILES = {
    "pickle_zip.pt": "zip",
    "pickle_zip.bin": "zip",
    "pickle_zip.ckpt": "zip",
    "pickle_zip.pth": "zip",
    "pickle_zip.safetensors": "zip",
    "pickle_raw.pt": "raw",
    "pickle_raw.safetensors": "raw",
    "pickle_raw.bin": "raw",
}
SPECIAL = ("fifo", "dev_zero", "dev_urandom", "symlink_loop", "socket", "directory", "missing")


def case_names() -> tuple[list[str], list[str]]:
    """(regular files, special inputs), without building anything: test ids."""
    regular = [*INVALID_FILES, *NOT_LORA_FILES, *(name.replace(".", "_") for name in PICKLE_FILES)]
    return regular, list(SPECIAL)


def _pickles(directory: Path) -> dict[str, bytes]:
    """Pickles whose unpickling would create the marker file, under every name a checkpoint uses."""
    payload = Payload(directory / MARKER)
    kinds = {
        "zip": _torch_zip({"lora_unet_x.lora_down.weight": payload}),
        "raw": pickle.dumps({"lora_unet_x.lora_down.weight": payload}, protocol=2),
    }
    return {filename: kinds[kind] for filename, kind in PICKLE_FILES.items()}


def build(directory: Path) -> dict[str, Case]:
    """Write the corpus into `directory` (created empty) and return its cases by name."""
    directory.mkdir(parents=True, exist_ok=True)
    cases: dict[str, Case] = {}
    for name, (data, needle) in INVALID_FILES.items():
        path = directory / f"{name}.safetensors"
        path.write_bytes(data)
        cases[name] = Case(name, path, INVALID, INVALID, needle)
    for name, data in NOT_LORA_FILES.items():
        path = directory / f"{name}.safetensors"
        path.write_bytes(data)
        cases[name] = Case(name, path, REFUSED, 0, "not")
    for filename, data in _pickles(directory).items():
        path = directory / filename
        path.write_bytes(data)
        name = filename.replace(".", "_")
        cases[name] = Case(name, path, REFUSED, REFUSED, "--allow-pickle")
    for name, (path, convert, detect, needle) in _specials(directory).items():
        cases[name] = Case(name, path, convert, detect, needle, special=True)
    regular, special = case_names()
    assert sorted(cases) == sorted(regular + special), "case_names() is out of date"
    return cases


def build_metadata(directory: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Write the hostile-metadata files and PEFT directories: name -> (path, allowed exit codes)."""
    directory.mkdir(parents=True, exist_ok=True)
    cases = peft_directories(directory)
    for name, (data, codes) in METADATA_FILES.items():
        path = directory / f"{name}.safetensors"
        path.write_bytes(data)
        cases[name] = (path, codes)
    return cases


def valid_seeds(directory: Path) -> list[Path]:
    """Valid files (a small SD1 Kohya LoRA, with and without metadata) for tests and fuzz seeds."""
    directory.mkdir(parents=True, exist_ok=True)
    plain, rich = directory / "valid_kohya.safetensors", directory / "valid_kohya_metadata.safetensors"
    plain.write_bytes(VALID_LORA)
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": "1", "modelspec.title": "tiny 🦙"}
    rich.write_bytes(lora_file(lora_tensors(), metadata))
    return [plain, rich]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: make_corpus.py DIRECTORY", file=sys.stderr)
        return 2
    directory = Path(argv[0])
    cases = build(directory)
    metadata = build_metadata(directory / "metadata")
    (directory / "metadata" / "redos.safetensors").write_bytes(REDOS)
    valid_seeds(directory)
    print(f"{len(cases)} hostile inputs, {len(metadata) + 1} with hostile metadata, 2 valid, in {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
