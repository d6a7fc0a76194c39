"""Nox sessions: lint, typecheck, tests, bench.

`nox -l` lists them; `nox -s tests` is the test command the README gives and `.ci/run` calls.
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
PY_PATHS = ["deployer", "tests", "benchmarks", "noxfile.py"]


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Ruff (lint and format check) on the Python sources."""
    session.install("-e", ".[lint]")
    session.run("ruff", "check", *PY_PATHS)
    session.run("ruff", "format", "--check", *PY_PATHS)


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """Mypy, strict, on the deployer package (with Ray installed, whose types it checks)."""
    session.install("-e", ".[lint,serve]")
    session.run("mypy")


def install_serve_stack(session: nox.Session) -> None:
    """Install the serving stack and the package: the one place its recipe lives.

    Now Ray Serve (the `serve` extra); the CPU build of vLLM joins here, installed before the
    Ray line, as ../shared/notes/cpu-stack.md says.
    """
    session.install("-e", ".[serve]")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Pytest: unit tests, plus the integration tests this machine can run."""
    install_serve_stack(session)
    session.install("-e", ".[test]")
    session.run("pytest", *(session.posargs or ["tests"]))


@nox.session(python=PYTHON, default=False)
def bench(session: nox.Session) -> None:
    """Benchmarks (not timed tests): placement quality and speed; figures go in the README."""
    session.install("-e", ".[bench]")
    session.run("python", "benchmarks/placement.py", *session.posargs)
