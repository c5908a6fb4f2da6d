"""Adapter references: `tenant/name[@version|:alias]`, or `name…` inside the caller's own tenant."""

from __future__ import annotations

import re
from dataclasses import dataclass

from adaptgate.errors import InvalidArgument

# Both patterns are applied with fullmatch: with `$` and match, a trailing newline would pass.
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_REF_PATTERN = re.compile(r"(?:(?P<tenant>[^/@:]+)/)?(?P<name>[^/@:]+)(?:@v?(?P<version>[0-9]{1,9})|:(?P<alias>[^/@:]+))?")


def check_name(value: str, what: str) -> str:
    """Names become directory names, so only a safe alphabet passes (no `..` anywhere, `/`, or absolute paths)."""
    if not NAME_PATTERN.fullmatch(value) or ".." in value:
        raise InvalidArgument(
            f"{what} {value[:80]!r} is not valid: use 1-64 lowercase letters, digits, '_', '.', '-', "
            "starting with a letter or digit, with no '..'"
        )
    return value


@dataclass(frozen=True)
class AdapterRef:
    tenant: str
    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        suffix = f"@v{self.version}" if self.version is not None else f":{self.alias}" if self.alias else ""
        return f"{self.tenant}/{self.name}{suffix}"


def parse_ref(text: str, default_tenant: str) -> AdapterRef:
    text = text.strip()
    if not text:
        raise InvalidArgument("adapter is empty; give a reference like 'acme/spam:prod' or 'spam@v2'")
    match = _REF_PATTERN.fullmatch(text)
    if not match:
        raise InvalidArgument(f"adapter {text[:140]!r} is not a reference like 'tenant/name', 'name@v3' or 'name:prod'")
    tenant = check_name(match["tenant"] or default_tenant, "tenant")
    name = check_name(match["name"], "adapter name")
    alias = check_name(match["alias"], "alias") if match["alias"] else None
    version = int(match["version"]) if match["version"] else None
    return AdapterRef(tenant, name, version, alias)
