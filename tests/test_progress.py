"""Progress of large writes: the writer's callbacks, and the bar the CLI draws only on a terminal."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys

import pytest
from rich.console import Console

import loraformats
from loraformats import terminal
from loraformats.cli import main
from loraformats.header import read_header
from loraformats.tensors import FileTensor, MemoryTensor, SourceFile
from loraformats.writer import write_directory, write_safetensors

EXAMPLE = "examples/sd15_tiny_kohya.safetensors"


def _tensors():
    header = read_header(EXAMPLE)
    source = SourceFile(EXAMPLE)
    tensors = [(name, FileTensor.named(source, header, name)) for name in header.tensors]
    return source, [*tensors, ("extra.alpha", MemoryTensor.f32(4.0))]


def test_writer_reports_every_byte_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr("loraformats.writer._GATHER_BYTES", 4096)  # many reports from a small file
    source, tensors = _tensors()
    seen: list[tuple[int, int]] = []
    write_safetensors(tmp_path / "out.safetensors", tensors, {}, progress=lambda *a: seen.append(a))
    source.close()
    total = sum(t.nbytes for _, t in tensors)
    assert len(seen) > 3 and {t for _, t in seen} == {total}
    assert [d for d, _ in seen] == sorted({d for d, _ in seen}) and seen[-1][0] == total


def test_directory_writer_reports_all_files_as_one_total(tmp_path):
    source, tensors = _tensors()
    half = len(tensors) // 2
    files = {"a.safetensors": (tensors[:half], {}), "b/b.safetensors": (tensors[half:], {})}
    seen: list[tuple[int, int]] = []
    write_directory(tmp_path / "out", files, {"note.txt": b"x"}, progress=lambda *a: seen.append(a))
    source.close()
    total = sum(t.nbytes for _, t in tensors)
    assert {t for _, t in seen} == {total} and seen[-1][0] == total
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_bar_is_drawn_only_for_large_outputs():
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=100)
    small = terminal.WriteProgress(threshold=1000, console=console)
    small(10, 999)
    small.close()
    assert screen.getvalue() == ""
    large = terminal.WriteProgress(threshold=1000, console=console)
    large(500, 2000)
    large(2000, 2000)
    large.close()
    assert "writing" in screen.getvalue() and "2.0/2.0 kB" in screen.getvalue()


def test_convert_reports_progress_to_the_python_caller(tmp_path):
    seen: list[tuple[int, int]] = []
    loraformats.convert(
        EXAMPLE, "diffusers", tmp_path / "out.safetensors", progress=lambda *a: seen.append(a)
    )
    assert seen and seen[-1][0] == seen[-1][1] > 0


def _stderr_on_a_terminal(args: list[str], env: dict[str, str]) -> tuple[int, bytes]:
    controller, terminal_end = pty.openpty()
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=terminal_end, env=env)
    os.close(terminal_end)
    drawn = b""
    while True:
        ready, _, _ = select.select([controller], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the process closed its end
                break
            if not chunk:
                break
            drawn += chunk
        elif process.poll() is not None:
            break
    os.close(controller)
    return process.wait(timeout=60), drawn


@pytest.mark.parametrize("attached", [True, False])
def test_cli_draws_the_bar_on_a_terminal_and_never_when_piped(tmp_path, attached):
    """A sitecustomize lowers the size at which the bar appears, so the tiny example counts as large."""
    (tmp_path / "sitecustomize.py").write_text("import loraformats.terminal as t\nt.LARGE_OUTPUT = 0\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd()])}
    args = [sys.executable, "-m", "loraformats", "convert", EXAMPLE, "--to", "diffusers", "-o"]
    if attached:
        code, drawn = _stderr_on_a_terminal([*args, str(tmp_path / "out.safetensors")], env)
        assert code == 0 and b"writing" in drawn
    else:
        done = subprocess.run([*args, str(tmp_path / "out.safetensors")], capture_output=True, env=env)
        assert done.returncode == 0 and done.stderr == b""


def test_cli_progress_does_not_outlive_a_refusal(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(terminal, "LARGE_OUTPUT", 0)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    closed: list[bool] = []
    real_close = terminal.WriteProgress.close
    monkeypatch.setattr(terminal.WriteProgress, "close", lambda self: (closed.append(True), real_close(self)))
    code = main(["convert", EXAMPLE, "--to", "nonexistent", "-o", str(tmp_path / "out")])
    assert code != 0 and closed == [True]
    assert "unknown format" in capsys.readouterr().err
