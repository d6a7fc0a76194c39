"""API keys for the endpoint: named, stored as SHA-256 digests, each with the models it may use.

A key is `rsk-` followed by 43 URL-safe characters (256 random bits). Only its digest is kept
(`sha256:` and 64 hex digits), with its name, its allow-list (model ids, or `*` for every
model) and when it was made. SHA-256 rather than a slow password hash: the secret is random
and long, so no dictionary helps an attacker who reads the file, and the ingress checks a key
on every request. The key ring is plain data; the file it lives in is `deployer.serving.key_file`.

Pure: no I/O. `new_secret` draws from `secrets`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from deployer.errors import ConfigError, shown

KEY_PREFIX = "rsk-"
ALL_MODELS = "*"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_BEARER = re.compile(r"^Bearer ([A-Za-z0-9._~+/=-]{1,512})$")


def new_secret() -> str:
    """A fresh key: `rsk-` and 256 random bits, URL-safe base64."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    """What the key file keeps of a key."""
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


def bearer_token(header: str | None) -> str | None:
    """The key in an `Authorization: Bearer KEY` header; None when missing or malformed."""
    if header is None:
        return None
    match = _BEARER.match(header.strip())
    return match.group(1) if match else None


@dataclass(frozen=True)
class ApiKey:
    """One key as stored: never the secret itself."""

    name: str
    digest: str
    models: tuple[str, ...] = (ALL_MODELS,)
    created: str = ""

    def allows(self, model_id: str) -> bool:
        """Whether this key may use the model (a LoRA adapter `base:adapter` by its base)."""
        base = model_id.split(":", 1)[0]
        return ALL_MODELS in self.models or model_id in self.models or base in self.models


@dataclass(frozen=True)
class KeyRing:
    """Every key the endpoint accepts, by name."""

    keys: tuple[ApiKey, ...] = field(default_factory=tuple)

    def find(self, secret: str) -> ApiKey | None:
        """The key whose digest matches; compared in constant time against each key."""
        wanted = digest(secret)
        found = None
        for key in self.keys:
            if hmac.compare_digest(key.digest, wanted):
                found = key
        return found

    def names(self) -> list[str]:
        """The keys' names, in the order they were added."""
        return [key.name for key in self.keys]

    def add(self, name: str, secret: str, models: Sequence[str], created: str) -> KeyRing:
        """The ring with a new key; a name already used, or a bad name or list, is refused."""
        check_name(name)
        if name in self.names():
            raise ConfigError(
                f"a key named {name!r} exists; revoke it first, or choose another name"
            )
        allowed = check_models(models)
        return replace(self, keys=(*self.keys, ApiKey(name, digest(secret), allowed, created)))

    def revoke(self, name: str) -> KeyRing:
        """The ring without the named key; an unknown name is refused."""
        if name not in self.names():
            known = ", ".join(self.names()) or "none"
            raise ConfigError(f"no key named {shown(name)} (keys: {known})")
        return replace(self, keys=tuple(k for k in self.keys if k.name != name))

    def to_document(self) -> dict[str, Any]:
        """The JSON document of the key file."""
        return {
            "keys": [
                {"name": k.name, "digest": k.digest, "models": list(k.models), "created": k.created}
                for k in self.keys
            ]
        }


def check_name(name: str) -> str:
    """A key name: letters, digits and `._@-`, up to 64 characters (it labels metrics)."""
    if not _NAME.match(name):
        raise ConfigError(
            f"key name {shown(name)}: use 1-64 letters, digits, '.', '_', '@' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_models(models: Sequence[str]) -> tuple[str, ...]:
    """An allow-list: model ids, or `*` alone for every model."""
    allowed = tuple(dict.fromkeys(m.strip() for m in models if m.strip()))
    if not allowed:
        raise ConfigError("a key needs at least one model it may use (or '*' for every model)")
    if ALL_MODELS in allowed and len(allowed) > 1:
        raise ConfigError("'*' already allows every model: give it alone, or list model ids")
    return allowed


def key_ring(document: object, source: str) -> KeyRing:
    """A key ring from the key file's JSON document, each problem named."""
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise ConfigError("expected an object with a `keys` list", source=source)
    problems: list[str] = []
    keys: list[ApiKey] = []
    for index, item in enumerate(document["keys"]):
        where, before = f"keys[{index}]", len(problems)
        if not isinstance(item, Mapping):
            problems.append(f"{where}: expected an object, got {shown(item)}")
            continue
        name, stored, models = item.get("name"), item.get("digest"), item.get("models")
        if not isinstance(name, str) or not _NAME.match(name):
            problems.append(f"{where}.name: {shown(name)} is not a key name")
        elif name in (k.name for k in keys):
            problems.append(f"{where}.name: {name!r} appears twice")
        if not isinstance(stored, str) or not _DIGEST.match(stored):
            problems.append(f"{where}.digest: expected 'sha256:' and 64 hex digits")
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            problems.append(f"{where}.models: expected a list of model ids or ['*']")
        if len(problems) > before:
            continue
        try:
            allowed = check_models(models)  # type: ignore[arg-type]  # checked above
        except ConfigError as exc:
            problems.append(f"{where}.models: {exc.problems[0]}")
            continue
        created = item.get("created", "")
        keys.append(ApiKey(str(name), str(stored), allowed, str(created)))
    if problems:
        raise ConfigError(problems, source=source)
    return KeyRing(tuple(keys))
