"""Documentation that cannot drift: every hook, command and format is documented and tested."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from loraformats import hookspecs
from loraformats.cli import _parser
from loraformats.plugins import registry

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
HOOKS = [name for name, value in vars(hookspecs).items() if name.startswith("register_") and callable(value)]


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_with_its_signature(hook):
    signature = f"{hook}{inspect.signature(getattr(hookspecs, hook))}".replace("'", "")
    assert signature in (DOCS / "plugins.md").read_text(), f"docs/plugins.md lacks {signature}"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test_of_its_own(hook):
    tests = "\n".join(path.read_text() for path in (ROOT / "tests").glob("test_*.py"))
    assert re.search(rf"def test_hook_{hook}\b", tests), f"no test_hook_{hook} in tests/"


def test_every_command_has_a_section_in_the_cli_page():
    commands = next(a for a in _parser()._actions if a.dest == "command").choices
    page = (DOCS / "cli.md").read_text()
    missing = [name for name in commands if f"## {name}\n" not in page]
    assert not missing, f"docs/cli.md lacks sections for {missing}"


def test_every_builtin_format_has_a_page():
    builtin = [name for name, fmt in registry.formats().items() if fmt.plugin in registry.plugins
               and (registry.plugins[fmt.plugin].distribution == "loraformats")]  # fmt: skip
    missing = [name for name in builtin if not (DOCS / "formats" / f"{name}.md").is_file()]
    assert not missing, f"no docs/formats/<name>.md for {missing}"


def test_every_page_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = [p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")]
    assert not [page for page in pages if page not in nav]
