"""rackserve's own process takes Ray's token mode from the rack's token file, unless told."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deployer.serving.ray_token import RAY_AUTH_MODE_ENV, RAY_TOKEN_PATH_ENV, use_rack_token


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy of the environment without Ray's token settings, for this test alone."""
    ours = {k: v for k, v in os.environ.items() if k not in {RAY_AUTH_MODE_ENV, RAY_TOKEN_PATH_ENV}}
    monkeypatch.setattr(os, "environ", ours)


def test_a_readable_token_file_turns_token_mode_on(tmp_path: Path, clean_env: None) -> None:
    token = tmp_path / "ray-token"
    token.write_text("ab" * 32)
    token.chmod(0o600)
    assert use_rack_token(str(token))
    assert os.environ[RAY_AUTH_MODE_ENV] == "token"
    assert os.environ[RAY_TOKEN_PATH_ENV] == str(token)


def test_no_token_file_leaves_ray_alone(tmp_path: Path, clean_env: None) -> None:
    assert not use_rack_token(str(tmp_path / "absent"))
    assert RAY_AUTH_MODE_ENV not in os.environ
    assert RAY_TOKEN_PATH_ENV not in os.environ


@pytest.mark.parametrize("mode", ["disabled", "token"])
def test_an_explicit_mode_wins(tmp_path: Path, clean_env: None, mode: str) -> None:
    token = tmp_path / "ray-token"
    token.write_text("ab" * 32)
    os.environ[RAY_AUTH_MODE_ENV] = mode
    os.environ[RAY_TOKEN_PATH_ENV] = "/elsewhere"
    assert use_rack_token(str(token)) == (mode == "token")
    assert os.environ[RAY_AUTH_MODE_ENV] == mode
    assert os.environ[RAY_TOKEN_PATH_ENV] == "/elsewhere"
