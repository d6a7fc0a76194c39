"""API keys: the key ring (digests, allow-lists, names), the header, and the key file on disk."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest

from deployer.config.api_keys import (
    KEY_PREFIX,
    ApiKey,
    KeyRing,
    bearer_token,
    digest,
    key_ring,
    new_secret,
)
from deployer.errors import ConfigError
from deployer.serving.key_file import KeyFileError, KeyFileWatcher, change_keys, read_keys

pytestmark = pytest.mark.unit


def ring_of(*entries: tuple[str, str, list[str]]) -> KeyRing:
    ring = KeyRing()
    for name, secret, models in entries:
        ring = ring.add(name, secret, models, "2026-12-06T00:00:00Z")
    return ring


def test_a_new_secret_is_long_random_and_prefixed() -> None:
    secrets = {new_secret() for _ in range(100)}
    assert len(secrets) == 100
    assert all(s.startswith(KEY_PREFIX) and len(s) == len(KEY_PREFIX) + 43 for s in secrets)


def test_the_ring_finds_a_key_by_its_secret_and_keeps_only_the_digest() -> None:
    ring = ring_of(("alice", "rsk-alice", ["a"]), ("ops", "rsk-ops", ["*"]))
    found = ring.find("rsk-alice")
    assert found is not None
    assert found.name == "alice"
    assert ring.find("rsk-ops") == ApiKey("ops", digest("rsk-ops"), ("*",), found.created)
    assert ring.find("rsk-alicf") is None
    assert ring.find("") is None
    assert "rsk-alice" not in json.dumps(ring.to_document())


@pytest.mark.parametrize(
    ("models", "asked", "allowed"),
    [
        (["a"], "a", True),
        (["a"], "b", False),
        (["a"], "a:my-lora", True),  # an adapter goes with its base model
        (["a", "b"], "b", True),
        (["*"], "anything", True),
    ],
)
def test_an_allow_list_names_models_or_all(models: list[str], asked: str, allowed: bool) -> None:
    key = ring_of(("k", "s", models)).keys[0]
    assert key.allows(asked) is allowed


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer rsk-abc_DEF-123", "rsk-abc_DEF-123"),
        ("  Bearer rsk-x  ", "rsk-x"),
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Basic dXNlcjpwYXNz", None),
        ("bearer rsk-x", None),
        ("Bearer rsk-x extra", None),
        ("Bearer " + "x" * 513, None),
        ("Bearer rsk-\x1b[31m", None),
    ],
)
def test_only_a_well_formed_bearer_header_yields_a_key(
    header: str | None, token: str | None
) -> None:
    assert bearer_token(header) == token


def test_adding_and_revoking_refuse_what_would_lose_or_confuse_a_key() -> None:
    ring = ring_of(("alice", "s1", ["a"]))
    with pytest.raises(ConfigError, match="a key named 'alice' exists"):
        ring.add("alice", "s2", ["a"], "")
    with pytest.raises(ConfigError, match="key name"):
        ring.add("bad name", "s2", ["a"], "")
    with pytest.raises(ConfigError, match="at least one model"):
        ring.add("bob", "s2", [" ", ""], "")
    with pytest.raises(ConfigError, match="'\\*' already allows every model"):
        ring.add("bob", "s2", ["*", "a"], "")
    with pytest.raises(ConfigError, match="no key named 'bob' \\(keys: alice\\)"):
        ring.revoke("bob")
    assert ring.revoke("alice").find("s1") is None


def test_a_key_file_document_is_checked_entry_by_entry() -> None:
    good = {"name": "a", "digest": digest("s"), "models": ["*"], "created": ""}
    assert key_ring({"keys": [good]}, "f").find("s") is not None
    with pytest.raises(ConfigError) as caught:
        key_ring(
            {
                "keys": [
                    good,
                    {**good, "digest": "md5:00"},
                    {**good, "name": "a"},
                    "x",
                    {**good, "name": "b", "models": []},
                ]
            },
            "f",
        )
    message = str(caught.value)
    for problem in ("keys[1].digest", "keys[2].name: 'a' appears twice", "keys[3]: expected"):
        assert problem in message
    assert "keys[4].models" in message
    with pytest.raises(ConfigError, match="a `keys` list"):
        key_ring([], "f")


def test_the_key_file_is_written_0600_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "api-keys.json"
    change_keys(path, lambda ring: ring.add("alice", "s1", ["a"], "t"))
    change_keys(path, lambda ring: ring.add("bob", "s2", ["b"], "t"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_keys(path).names() == ["alice", "bob"]
    assert "s1" not in path.read_text()
    with pytest.raises(ConfigError):
        change_keys(path, lambda ring: ring.revoke("carol"))
    assert read_keys(path).names() == ["alice", "bob"], "a refused change wrote the file"
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        read_keys(path)


def test_concurrent_changes_lose_no_key(tmp_path: Path) -> None:
    path = tmp_path / "api-keys.json"
    threads = [
        threading.Thread(
            target=change_keys, args=(path, lambda r, n=n: r.add(f"k{n}", f"s{n}", ["*"], ""))
        )
        for n in range(20)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(read_keys(path).names()) == sorted(f"k{n}" for n in range(20))


def test_the_watcher_follows_revocations_and_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "api-keys.json"
    watcher = KeyFileWatcher(path)
    assert watcher.current().keys == (), "no file: no key accepted"
    change_keys(path, lambda ring: ring.add("alice", "s1", ["*"], "t"))
    assert watcher.current().find("s1") is not None
    change_keys(path, lambda ring: ring.revoke("alice"))
    assert watcher.current().find("s1") is None
    change_keys(path, lambda ring: ring.add("bob", "s2", ["*"], "t"))
    assert watcher.current().find("s2") is not None
    path.write_text("{not json")  # a broken edit by hand keeps the last ring read
    assert watcher.current().find("s2") is not None
    path.unlink()
    assert watcher.current().find("s2") is None
