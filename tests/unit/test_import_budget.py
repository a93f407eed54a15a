"""What a ``corral`` process imports, counted in modules (never milliseconds): the common calls
stay small as the code grows. Each case runs in a fresh interpreter and counts the modules it
loaded beyond a bare ``python -c pass`` (the site's own start-up differs between machines).

A budget is the count measured when it was set plus some room; a change that needs more
imports than that raises the budget here, on purpose, and says why in its commit."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import pytest

REPO = Path(__file__).resolve().parents[2]

HEAVY = ("httpx", "httpcore", "h11", "anyio", "pydantic", "pydantic_core", "rich", "yaml",
         "asyncio", "fastapi", "starlette", "uvicorn", "jinja2", "ssl", "email")  # fmt: skip
"""Packages a read call (``show``, ``list``, ``--help``) must not load."""

_PROBE = """
import sys
sys.argv = ["corral", *{argv!r}]
try:
    {body}
except SystemExit:
    pass
with open({out!r}, "w") as out:
    out.write("\\n".join(sorted(sys.modules)))
"""


def _loaded(body: str, argv: tuple[str, ...] = ()) -> set[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CORRAL_", "PYTHON"))}
    env["PYTHONPATH"] = str(REPO / "src")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "modules"
        subprocess.run(
            [sys.executable, "-c", _PROBE.format(argv=list(argv), body=body, out=str(out))],
            capture_output=True, timeout=120, check=True, env=env,
        )  # fmt: skip
        return set(out.read_text().split())


def _baseline() -> set[str]:
    return _loaded("pass")


def _cli(*argv: str) -> set[str]:
    return _loaded("from corral.cli.main import main; main()", argv) - _baseline()


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


@pytest.mark.parametrize(
    ("argv", "budget"),
    [
        (("--help",), 90),
        (("--version",), 80),
        (("--socket", "/nonexistent/corral.sock", "show", "web1"), 115),
        (("--socket", "/nonexistent/corral.sock", "list", "-o", "json"), 115),
        (("--socket", "/nonexistent/corral.sock", "start", "web1", "--wait"), 115),
    ],
)
def test_a_read_call_imports_little(argv: tuple[str, ...], budget: int) -> None:
    """The command's own module, click, and a stdlib HTTP request on the unix socket (a GET,
    or ``start --wait``'s POST): no httpx, no pydantic models, no rich, no other command's
    module."""
    modules = _cli(*argv)
    assert not _heavy(modules), f"corral {' '.join(argv)} imports {_heavy(modules)}"
    others = sorted(
        m
        for m in modules
        if m.startswith(("corral.cli.serve", "corral.cli.run", "corral.cli.vms", "corral.manager"))
    )
    assert not others, f"corral {' '.join(argv)} imports other commands' modules: {others}"
    assert len(modules) <= budget, (
        f"corral {' '.join(argv)} imports {len(modules)} modules (budget {budget}): "
        f"{sorted(modules)}"
    )


def test_run_imports_what_starting_a_vm_needs() -> None:
    """``corral run``'s import path (the command, the runner program, the supervisor and what
    it spawns qemu with): not the manager, the API, the client, another command, or the image
    store's downloads (``http``). The VM document's pydantic models are on it (it validates
    the document)."""
    body = (
        "from corral.cli.main import cli; import click; "
        "cli.get_command(click.Context(cli), 'run'); "
        "import corral.runner.program, corral.runner.supervisor"
    )
    modules = _loaded(body) - _baseline()
    outside = sorted(
        m for m in modules
        if m.startswith(("corral.manager", "corral.api", "corral.client", "corral.cli.vm"))
        or m.split(".")[0] in ("httpx", "fastapi", "uvicorn", "starlette", "rich", "http")
    )  # fmt: skip
    assert not outside, f"corral run imports {outside}"
    assert len(modules) <= RUN_BUDGET, f"corral run imports {len(modules)} modules"


RUN_BUDGET = 370


def test_help_lists_every_command_with_its_own_short_help() -> None:
    """``corral --help`` lists from the lazy table without importing the commands: the table
    must say what each command's docstring says, and hide what the command hides."""
    from corral.cli.main import COMMANDS, cli

    ctx = click.Context(cli)
    for name, (_, short) in COMMANDS.items():
        command = cli.get_command(ctx, name)
        assert command is not None and command.name == name, name
        if command.hidden:
            assert short is None, f"{name} is hidden but listed"
        else:
            assert short == command.get_short_help_str(limit=10_000), name
