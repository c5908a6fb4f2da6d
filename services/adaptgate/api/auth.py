"""Bearer tokens → principals (tenant, admin) from the token file; constant-time comparison."""

from __future__ import annotations

import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from adaptgate.adapters.refs import AdapterRef, check_name, parse_ref
from adaptgate.errors import AdapterNotFound, InvalidArgument, PermissionDenied, Unauthenticated

DEV_TENANT = "dev"


@dataclass(frozen=True)
class Principal:
    tenant: str
    admin: bool = False

    def scope(self) -> str | None:
        """The tenant whose records this caller may see; None (all) for admins."""
        return None if self.admin else self.tenant

    def require_admin(self, action: str) -> None:
        if not self.admin:
            raise PermissionDenied(f"{action} needs an admin token")

    def adapter(self, text: str) -> AdapterRef:
        """Parse a reference in this caller's tenant; another tenant's adapter looks exactly like a missing one."""
        ref = parse_ref(text, self.tenant)
        if ref.tenant != self.tenant and not self.admin:
            raise AdapterNotFound(f"adapter {ref} not found")
        return ref


class TokenAuthenticator:
    def __init__(self, tokens: dict[str, Principal]) -> None:
        self._tokens = [(token.encode(), principal) for token, principal in tokens.items()]

    def authenticate(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> Principal:
        header = next((v for k, v in metadata or () if k == "authorization"), None)
        if header is None:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        value = header.decode() if isinstance(header, bytes) else header
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("the authorization metadata must be 'Bearer <token>'")
        found = None
        for known, principal in self._tokens:  # compare against every token: timing says nothing
            if hmac.compare_digest(known, token.strip().encode()):
                found = principal
        if found is None:
            raise Unauthenticated("the token is not valid")
        return found


def load_tokens(path: Path) -> dict[str, Principal]:
    try:
        raw = json.loads(path.read_text())["tokens"]
        tokens = {str(t): Principal(check_name(str(p["tenant"]), "tenant"), bool(p.get("admin", False))) for t, p in raw.items()}
    except (OSError, ValueError, KeyError, TypeError, InvalidArgument) as exc:
        raise ValueError(f"token file {path} is not valid ({exc}); expected {{\"tokens\": {{\"<token>\": {{\"tenant\": \"acme\", \"admin\": false}}}}}}") from None
    if not tokens:
        raise ValueError(f"token file {path} holds no tokens; the server never runs without authentication")
    return tokens


def ensure_dev_tokens(path: Path) -> tuple[str, str]:
    """First start without a token file: one dev-tenant token and one admin token, kept for later starts."""
    if path.exists():
        tokens = json.loads(path.read_text())["tokens"]
        tenant = next(t for t, p in tokens.items() if not p.get("admin"))
        admin = next(t for t, p in tokens.items() if p.get("admin"))
        return tenant, admin
    tenant, admin = f"dev-{secrets.token_urlsafe(18)}", f"admin-{secrets.token_urlsafe(18)}"
    body = {"tokens": {tenant: {"tenant": DEV_TENANT, "admin": False}, admin: {"tenant": "admin", "admin": True}}}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(body, f, indent=2)
    return tenant, admin
