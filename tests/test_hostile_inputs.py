"""Hostile inputs are refused in one line, with nothing written, the input untouched and no code run.

The corpus comes from tests/hostile/make_corpus.py. Regular files run in-process through the CLI
(fast); FIFOs, devices, sockets, loops and a sample of the rest run as `python -m loraformats`
subprocesses with a timeout, so that a hang fails one test instead of freezing the session.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import loraformats
from hostile import make_corpus
from hostile.make_corpus import MARKER, Case
from loraformats.cli import main
from loraformats.errors import InvalidFileError
from loraformats.header import read_header
from loraformats.tensors import FileTensor, SourceFile
from loraformats.validation import _NONFINITE_BITS, NonfiniteScan, count_nonfinite, scan_nonfinite
from loraformats.writer import write_safetensors

EXAMPLE = Path(__file__).parents[1] / "examples" / "sd15_tiny_kohya.safetensors"
HANG = 60  # seconds: far above any real run, only there to turn a hang into a failure
TE = "text_encoder:text_model.encoder.layers.0.self_attn.q_proj"
UNET = "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"

REGULAR, SPECIAL = make_corpus.case_names()
PICKLES = [name for name in REGULAR if name.startswith("pickle_")]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Case]:
    return make_corpus.build(tmp_path_factory.mktemp("hostile"))


@pytest.fixture
def valid(tmp_path) -> Path:
    """A small valid SD1 Kohya LoRA in a directory of its own."""
    path = tmp_path / "in.safetensors"
    path.write_bytes(make_corpus.VALID_LORA)
    return path


def snapshot(directory: Path) -> dict[str, str]:
    """Every entry under `directory`, links not followed: a digest for files, the type otherwise."""
    entries = {}
    for root, directories, files in os.walk(directory):
        for name in directories + files:
            path = Path(root, name)
            mode = path.lstat().st_mode
            kind = (
                hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(mode) else stat.filemode(mode)
            )
            entries[str(path.relative_to(directory))] = kind
    return entries


def temporary_copies() -> set[str]:
    """Safetensors copies of unpickled inputs (they must always be deleted)."""
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "loraformats-*.safetensors")))


def command(name: str, path: Path, *extra: str) -> list[str]:
    return ["convert", str(path), "--to", "diffusers", *extra] if name == "convert" else ["detect", str(path)]


def expect_one_line(code: int, expected: int, err: str, needle: str = "") -> None:
    assert code == expected, err
    assert "Traceback" not in err and "internal error" not in err, err
    if expected:
        assert len(err.strip().splitlines()) == 1, err
        assert needle in err, err


def run(args: list[str], timeout: float = HANG) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "loraformats", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return done.returncode, done.stderr


# ------------------------------------------------------------------------------------ the corpus


def test_corpus_has_enough_cases(corpus):
    assert len(corpus) >= 25 and SPECIAL and PICKLES


@pytest.mark.parametrize("name", REGULAR)
@pytest.mark.parametrize("which", ["convert", "detect"])
def test_crafted_file_is_refused_in_one_line(corpus, name, which, capsys):
    case = corpus[name]
    before = snapshot(case.path.parent)
    code = main(command(which, case.path))
    expect_one_line(code, getattr(case, which), capsys.readouterr().err, case.needle)
    assert snapshot(case.path.parent) == before, "no output, no temporary file, input unchanged"


@pytest.mark.parametrize("name", SPECIAL)
@pytest.mark.parametrize("which", ["convert", "detect"])
def test_special_input_is_refused_without_hanging(corpus, name, which):
    case = corpus[name]
    before = snapshot(case.path.parent)
    code, err = run(command(which, case.path))
    expect_one_line(code, getattr(case, which), err, case.needle)
    assert snapshot(case.path.parent) == before


END_TO_END = [
    "empty",
    "length_2_64",
    "header_deep_nesting",
    "truncated_data",
    "name_with_newline",
    "emoji_names",
]


@pytest.mark.parametrize("name", END_TO_END)
def test_crafted_file_is_refused_by_the_installed_command(corpus, name, tmp_path):
    case = corpus[name]
    before = snapshot(case.path.parent)
    code, err = run(command("convert", case.path, "-o", str(tmp_path / "out.safetensors")))
    expect_one_line(code, case.convert, err, case.needle)
    assert snapshot(case.path.parent) == before and not list(tmp_path.iterdir())


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom", "/dev/null"])
def test_device_inputs_are_refused_without_reading_them(device, tmp_path):
    for which in ("convert", "detect"):
        code, err = run(command(which, Path(device), "-o", str(tmp_path / "out.safetensors")))
        expect_one_line(code, 3, err, "not a regular file")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", PICKLES)
def test_pickle_payload_never_runs_even_when_pickles_are_allowed(corpus, name, capsys):
    case = corpus[name]
    before, copies = snapshot(case.path.parent), temporary_copies()
    for which in ("convert", "detect"):
        code = main([*command(which, case.path), "--allow-pickle"])
        expect_one_line(code, 3, capsys.readouterr().err, "weights_only")
    assert not (case.path.parent / MARKER).exists()
    assert snapshot(case.path.parent) == before and temporary_copies() == copies


def test_pickle_payload_never_runs_in_the_installed_command(corpus):
    case = corpus["pickle_zip_pt"]
    for extra in ([], ["--allow-pickle"]):
        code, err = run(command("convert", case.path, *extra))
        expect_one_line(code, 4 if not extra else 3, err)
    assert not (case.path.parent / MARKER).exists()


# --------------------------------------------------------------- metadata the format plugins parse


@pytest.fixture(scope="session")
def metadata_corpus(tmp_path_factory) -> dict[str, tuple[Path, tuple[int, ...]]]:
    return make_corpus.build_metadata(tmp_path_factory.mktemp("hostile-metadata"))


@pytest.mark.parametrize("name", [*make_corpus.METADATA_FILES, *make_corpus.PEFT_CONFIGS])
def test_hostile_metadata_is_refused_or_ignored_never_a_crash(metadata_corpus, name, tmp_path):
    """A subprocess: warnings printed by libraries count against the one-line rule too."""
    path, codes = metadata_corpus[name]
    before = snapshot(path.parent)
    output = tmp_path / "out.safetensors"
    code, err = run(["convert", str(path), "--to", "kohya", "-o", str(output)])
    assert code in codes and "internal error" not in err and "Traceback" not in err, err
    if code:
        assert len(err.strip().splitlines()) == 1, err
    assert output.exists() == (code == 0) and snapshot(path.parent) == before


@pytest.mark.parametrize("name", [*make_corpus.METADATA_FILES, *make_corpus.PEFT_CONFIGS])
def test_hostile_metadata_fails_reads_only_with_loraformats_errors(metadata_corpus, name):
    """`load` and reading every tensor: the API promises `LoraFormatsError` and no warnings."""
    path, _ = metadata_corpus[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            with loraformats.load(path) as adapters:
                for adapter in adapters.modules.values():
                    for tensor in adapter.tensors().values():
                        assert len(tensor.read_bytes()) == tensor.nbytes
        except loraformats.LoraFormatsError as error:
            assert "\n" not in str(error)


def test_pathological_pattern_in_a_config_does_not_hang(tmp_path):
    path = tmp_path / "redos.safetensors"
    path.write_bytes(make_corpus.REDOS)
    try:
        code, err = run(command("convert", path, "-o", str(tmp_path / "o.safetensors")), timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("conversion hung on a regular expression from the file")
    assert code in (0, 3, 4) and "internal error" not in err, err


# ----------------------------------------------------------------------------------- the output


def unwritable_directory(tmp_path: Path) -> Iterator[Path]:
    """A directory nobody can create files in: mode 0o500, or immutable for root (chattr +i)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() != 0:
        locked.chmod(0o500)
        yield locked
        locked.chmod(0o700)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(locked)]).returncode:
        pytest.skip("root ignores permissions and chattr +i is not available here")
    try:
        yield locked
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)


def _link(valid: Path) -> Path:
    link = valid.with_name("link.safetensors")
    link.symlink_to(valid)
    return link


def _hard_link(valid: Path) -> Path:
    link = valid.with_name("hard.safetensors")
    os.link(valid, link)
    return link


def _fifo(valid: Path) -> Path:
    fifo = valid.with_name("fifo.safetensors")
    os.mkfifo(fifo)
    return fifo


def _regular(valid: Path) -> Path:
    file = valid.with_name("file")
    file.write_bytes(b"")
    return file / "out.safetensors"


def _occupied(valid: Path) -> Path:
    directory = valid.with_name("outdir")
    directory.mkdir()
    return directory


#: name -> (output path from the input, exit code, needle); all run with --force.
OUTPUTS: dict[str, tuple[Callable[[Path], Path], int, str]] = {
    "the input itself": (lambda valid: valid, 2, "overwrite the input"),
    "a symlink to the input": (_link, 2, "overwrite the input"),
    "a hard link to the input": (_hard_link, 2, "overwrite the input"),
    "a missing directory": (lambda valid: valid.with_name("missing") / "out.safetensors", 5, "cannot create"),
    "a path under a regular file": (_regular, 5, "Not a directory"),
    "a directory": (_occupied, 2, "directory"),
    "a FIFO": (_fifo, 2, "not a regular file"),
    "a 300-character name": (lambda valid: valid.with_name("x" * 288 + ".safetensors"), 5, "too long"),
}


@pytest.mark.parametrize("name", OUTPUTS)
def test_bad_output_is_refused_and_leaves_nothing(name, valid, capsys):
    make_output, expected, needle = OUTPUTS[name]
    output = make_output(valid)
    before = snapshot(valid.parent)
    code = main(["convert", str(valid), "--to", "diffusers", "-o", str(output), "--force"])
    expect_one_line(code, expected, capsys.readouterr().err, needle)
    assert snapshot(valid.parent) == before


def test_output_through_the_input_symlink_is_refused(valid, capsys):
    link = _link(valid)
    code = main(["convert", str(link), "--to", "diffusers", "-o", str(valid), "--force"])
    expect_one_line(code, 2, capsys.readouterr().err, "overwrite the input")


def test_device_output_is_never_replaced(valid, capsys):
    device = valid.with_name("null")
    try:
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device node needs root")
    code = main(["convert", str(valid), "--to", "diffusers", "-o", str(device), "--force"])
    expect_one_line(code, 2, capsys.readouterr().err, "not a regular file")
    assert stat.S_ISCHR(device.lstat().st_mode)


def test_unwritable_output_directory_is_an_io_error(valid, tmp_path, capsys):
    for locked in unwritable_directory(tmp_path):
        code = main(["convert", str(valid), "--to", "diffusers", "-o", str(locked / "o.safetensors")])
        expect_one_line(code, 5, capsys.readouterr().err)
        assert not list(locked.iterdir())


def test_directory_output_never_deletes_the_input_it_holds(valid, capsys):
    holder = valid.with_name("holder")
    holder.mkdir()
    source = holder / "in.safetensors"
    shutil.copyfile(valid, source)
    before = snapshot(valid.parent)
    code = main(["convert", str(source), "--to", "peft", "-o", str(holder), "--force"])
    expect_one_line(code, 2, capsys.readouterr().err, "holds the input")
    assert snapshot(valid.parent) == before


def test_directory_output_never_deletes_foreign_files_even_with_force(valid, capsys):
    home = _occupied(valid)
    (home / "notes.txt").write_text("precious")
    code = main(["convert", str(valid), "--to", "peft", "-o", str(home), "--force"])
    expect_one_line(code, 2, capsys.readouterr().err, "notes.txt")
    assert (home / "notes.txt").read_text() == "precious"
    output = valid.with_name("adapter")
    assert main(["convert", str(valid), "--to", "peft", "-o", str(output)]) == 0
    assert main(["convert", str(valid), "--to", "peft", "-o", str(output), "--force"]) == 0, "replaces itself"


# ------------------------------------------------------------------------- failures while writing


def fail_writes_after(monkeypatch, budget: int, error: BaseException) -> None:
    """Make every write (os.write, os.writev, os.copy_file_range) raise `error` once `budget` bytes
    are written."""
    written = 0
    real_write, real_writev, real_copy = os.write, os.writev, os.copy_file_range

    def spend(n: int) -> None:
        nonlocal written
        written += n
        if written > budget:
            raise error

    def write(fd: int, data) -> int:
        spend(len(data))
        return real_write(fd, data)

    def writev(fd: int, buffers) -> int:
        spend(sum(len(buffer) for buffer in buffers))
        return real_writev(fd, buffers)

    def copy_file_range(src: int, dst: int, count: int, offset_src=None, offset_dst=None) -> int:
        spend(count)
        return real_copy(src, dst, count, offset_src, offset_dst)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "writev", writev)
    monkeypatch.setattr(os, "copy_file_range", copy_file_range)


DISK_FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("target", ["diffusers", "peft"])
def test_disk_full_mid_write_leaves_nothing(valid, target, monkeypatch, capsys):
    before = snapshot(valid.parent)
    fail_writes_after(monkeypatch, 4096, DISK_FULL)
    code = main(["convert", str(valid), "--to", target, "-o", str(valid.with_name("out"))])
    monkeypatch.undo()
    expect_one_line(code, 5, capsys.readouterr().err, "No space left on device")
    assert snapshot(valid.parent) == before


@pytest.mark.parametrize("target", ["diffusers", "peft"])
def test_interrupt_inside_tensor_writing_leaves_nothing(valid, target, monkeypatch, capsys):
    before = snapshot(valid.parent)
    fail_writes_after(monkeypatch, 4096, KeyboardInterrupt())
    code = main(["convert", str(valid), "--to", target, "-o", str(valid.with_name("out"))])
    monkeypatch.undo()
    assert code == 130 and capsys.readouterr().err.strip() == "loraformats: interrupted"
    assert snapshot(valid.parent) == before


def test_interrupt_propagates_from_the_api_and_leaves_nothing(valid, monkeypatch):
    before = snapshot(valid.parent)
    fail_writes_after(monkeypatch, 0, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        loraformats.convert(valid, "diffusers", valid.with_name("out.safetensors"))
    monkeypatch.undo()
    assert snapshot(valid.parent) == before


def test_permission_denied_at_rename_leaves_nothing(valid, monkeypatch, capsys):
    before = snapshot(valid.parent)

    def replace(*_):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(os, "replace", replace)
    code = main(["convert", str(valid), "--to", "diffusers", "-o", str(valid.with_name("out.safetensors"))])
    monkeypatch.undo()
    expect_one_line(code, 5, capsys.readouterr().err, "Permission denied")
    assert snapshot(valid.parent) == before


@pytest.mark.parametrize("mapped_first", [False, True])
def test_input_shrinking_during_the_write_is_detected(valid, tmp_path, mapped_first):
    """Truncated before the writer maps it, the input is copied short; truncated after, the kernel
    meets mapped pages past the new end (a short write or EFAULT, never SIGBUS). Either way the
    writer calls it a changed input and leaves nothing behind."""
    header = read_header(valid)
    source = SourceFile(valid)
    tensors = [(name, FileTensor.named(source, header, name)) for name in header.tensors]
    source.open()
    if mapped_first:
        assert source.mapped(header.data_start, 8) is not None  # mapped at its full size
    os.truncate(valid, header.data_start + 100)
    output = tmp_path / "out.safetensors"
    with pytest.raises(InvalidFileError, match="changed while it was being read"):
        write_safetensors(output, tensors, {})
    source.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_short_gathered_writes_are_resumed(valid, tmp_path, monkeypatch):
    """writev may write less than asked, even mid-tensor: the rest follows, byte for byte."""
    real_writev, calls = os.writev, []

    def writev(fd, buffers):
        calls.append(len(buffers))
        first = bytes(buffers[0])
        return real_writev(fd, [first[: max(1, len(first) // 3)]])

    monkeypatch.setattr(os, "writev", writev)
    header = read_header(valid)
    source = SourceFile(valid)
    tensors = [(name, FileTensor.named(source, header, name)) for name in header.tensors]
    output = tmp_path / "out.safetensors"
    write_safetensors(output, tensors, {})
    monkeypatch.undo()
    source.close()
    assert len(calls) > len(tensors)
    written = output.read_bytes()[read_header(output).data_start :]
    assert written == valid.read_bytes()[header.data_start :]


@pytest.fixture
def tiny_tmpfs(tmp_path) -> Iterator[Path]:
    """A real 1 MB filesystem (needs root and mount permission; skipped otherwise)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_real_disk_full_leaves_nothing(tiny_tmpfs, capsys):
    code = main(["convert", str(EXAMPLE), "--to", "diffusers", "-o", str(tiny_tmpfs / "out.safetensors")])
    expect_one_line(code, 5, capsys.readouterr().err, "No space left on device")
    assert not list(tiny_tmpfs.iterdir())


# ------------------------------------------------------------------------------ non-finite weights


def poisoned(directory: Path, dtype: torch.dtype, poison: dict[str, list[float]]) -> Path:
    """The valid LoRA in `dtype`, with values written at the start of the named tensors."""
    source = directory / "clean.safetensors"
    source.write_bytes(make_corpus.VALID_LORA)
    tensors = {name: tensor.to(dtype) for name, tensor in load_file(source).items()}
    for name, values in poison.items():
        tensors[name].view(-1)[: len(values)] = torch.tensor(values, dtype=dtype)
    path = directory / f"poisoned-{str(dtype).split('.')[-1]}.safetensors"
    save_file(tensors, path, metadata={"ss_network_module": "networks.lora"})
    return path


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_nonfinite_values_are_counted_per_module(dtype, tmp_path):
    path = poisoned(
        tmp_path,
        dtype,
        {
            f"{make_corpus.TE}.lora_down.weight": [NAN, INF, -INF, 1.0],
            f"{make_corpus.TE}.lora_up.weight": [NAN],
            f"{make_corpus.UNET}.alpha": [INF],
        },
    )
    with loraformats.load(path) as adapters:
        assert scan_nonfinite(adapters) == {TE: 4, UNET: 1}
        shared = NonfiniteScan(adapters)  # drained by four threads at once, as convert's helps its thread
        helpers = [threading.Thread(target=shared.drain) for _ in range(4)]
        for helper in helpers:
            helper.start()
        shared.drain()
        for helper in helpers:
            helper.join()
        assert shared.counts == {TE: 4, UNET: 1}


def test_finite_weights_report_nothing(valid):
    with loraformats.load(EXAMPLE) as adapters:
        assert scan_nonfinite(adapters) == {}
    with loraformats.load(valid) as adapters:
        assert scan_nonfinite(adapters) == {}


@pytest.mark.parametrize(
    ("dtype", "torch_dtype"),
    [
        ("F16", torch.float16),
        ("BF16", torch.bfloat16),
        ("F8_E5M2", torch.float8_e5m2),
        ("F8_E4M3", torch.float8_e4m3fn),
    ],
)
def test_bit_test_agrees_with_torch_on_every_value(dtype, torch_dtype):
    width = torch.finfo(torch_dtype).bits
    every = np.arange(2**width, dtype=np.uint16 if width == 16 else np.uint8)
    values = torch.from_numpy(every.view(np.int16 if width == 16 else np.int8)).view(torch_dtype)
    expected = int((~torch.isfinite(values.float())).sum())
    assert count_nonfinite(every.astype(f"<u{width // 8}").tobytes(), dtype) == expected > 0


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F8_E5M2", "F8_E4M3", "F8_E8M0"])
def test_one_nonfinite_value_among_finite_ones_is_always_found(dtype):
    """The max-reduction shortcut must never skip a piece that holds a single NaN/Inf, whatever its
    sign and payload, nor count anything in a piece of every finite value."""
    view, mask, _ = _NONFINITE_BITS[dtype]
    every = np.arange(256 ** np.dtype(view).itemsize).astype(view)
    bad = every[every & mask == mask]
    finite = every[every & mask != mask]
    assert count_nonfinite(finite.tobytes(), dtype) == 0
    for value in bad:
        piece = finite.copy()
        piece[len(piece) // 3] = value
        assert count_nonfinite(piece.tobytes(), dtype) == 1, hex(int(value))


@pytest.mark.parametrize(("dtype", "width"), [("F32", 32), ("F64", 64)])
def test_wide_nonfinite_extremes_are_found_alone(dtype, width):
    view, mask, sign = _NONFINITE_BITS[dtype]
    top = (1 << width) - 1
    finite = np.array([0, sign, mask - 1, (sign | mask) - 1, 1], dtype=view)
    assert count_nonfinite(finite.tobytes(), dtype) == 0
    for value in (mask, mask | 1, top ^ sign, sign | mask, top):
        assert count_nonfinite(np.append(finite, np.array(value, dtype=view)).tobytes(), dtype) == 1


def test_wide_floats_and_integers():
    special = [0.0, -0.0, 1e-45, 3.4e38, NAN, INF, -INF, -NAN]
    assert count_nonfinite(np.array(special, "<f4").tobytes(), "F32") == 4
    assert count_nonfinite(np.array([*special, 1e308], "<f8").tobytes(), "F64") == 4
    assert count_nonfinite(b"\xff" * 16, "I32") == count_nonfinite(b"\xff" * 16, "U8") == 0


def test_scanning_never_imports_torch(tmp_path):
    path = poisoned(tmp_path, torch.bfloat16, {f"{make_corpus.UNET}.lora_up.weight": [NAN, NAN]})
    script = (
        "import sys, loraformats\n"
        "from loraformats.validation import scan_nonfinite\n"
        f"counts = scan_nonfinite(loraformats.load({str(path)!r}))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(counts)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=HANG)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == repr({UNET: 2})


def test_truncated_tensor_bytes_are_an_invalid_file(valid):
    with loraformats.load(valid) as adapters:
        os.truncate(valid, valid.stat().st_size - 64)
        with pytest.raises(InvalidFileError, match="read"):
            scan_nonfinite(adapters)


@pytest.mark.parametrize(("target", "output_name"), [("diffusers", "out.safetensors"), ("peft", "out_peft")])
def test_strict_refuses_nonfinite_weights(tmp_path, capsys, target, output_name):
    """The scan runs beside the copy (file or directory output) and settles before the commit."""
    path = poisoned(tmp_path, torch.float16, {f"{make_corpus.TE}.lora_up.weight": [NAN]})
    before = snapshot(tmp_path)
    output = tmp_path / output_name
    code = main(["convert", str(path), "--to", target, "-o", str(output), "--strict"])
    err = capsys.readouterr().err
    assert code != 0 and len(err.strip().splitlines()) == 1 and TE in err, err
    assert snapshot(tmp_path) == before  # no output, no temporary left behind
    assert main(["convert", str(path), "--to", target, "-o", str(output)]) == 0
    assert "warning" in capsys.readouterr().err and output.exists()
