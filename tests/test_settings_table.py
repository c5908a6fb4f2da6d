"""The README's settings table is the operator's reference: every setting has a row with its env var, its
flag and its real default.

This fails when a field is added to `Settings` without a row, when a row names a variable or flag that no
longer exists, or when a default changes in code and not in the README (or the other way round).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from adaptgate.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
# Variables the table lists beside ours because the server reads them too (aliases of a field).
ALIASES = {"RAY_ADDRESS": "ray_address", "OTEL_EXPORTER_OTLP_ENDPOINT": "otlp_endpoint"}
UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "h": 3600, "min": 60, "s": 1}


def table() -> dict[str, tuple[list[str], str]]:
    """Env var -> (the row's flags, its default cell), from README's `## Settings` section.

    A row may pair settings (`A` / `B` with `--a` / `--b` and `x / y`): each variable gets its own default."""
    section = (ROOT / "README.md").read_text().split("## Settings", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[list[str], str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0])
        flags = re.findall(r"`(--[a-z0-9-]+)`", cells[1])
        defaults = [d.strip() for d in cells[2].split(" / ")] if " / " in cells[2] else [cells[2]]
        ours = [n for n in names if n not in ALIASES]
        for i, name in enumerate(ours):
            rows[name] = (flags, defaults[min(i, len(defaults) - 1)])
    return rows


def matches(cell: str, default: object) -> bool:
    """A default cell as the README writes it (`8080`, 16 MiB, 6 h, – for none) against the field's default."""
    if isinstance(default, dict):
        return cell == f"`{json.dumps(default)}`"
    if default is None or default == "":
        return not cell.startswith("`")  # "–", "empty (off)", "packaged MiniLM": what unset means
    if (quoted := re.fullmatch(r"`([^`]*)`", cell)) is not None:
        text = quoted.group(1)
        if isinstance(default, bool):
            return text == str(default).lower()
        if isinstance(default, int | float):
            return float(text) == float(default)
        return text == str(default)
    if (sized := re.fullmatch(r"([\d.]+) (KiB|MiB|GiB|h|min|s)", cell)) is not None:
        return isinstance(default, int | float) and float(sized.group(1)) * UNITS[sized.group(2)] == default
    return False


def test_every_setting_has_a_row_with_its_flag_and_default() -> None:
    rows = table()
    for name, field in Settings.model_fields.items():
        env = f"ADAPTGATE_{name.upper()}"
        assert env in rows, f"README's settings table has no row for {env}"
        flags, cell = rows[env]
        flag = f"--{name.replace('_', '-')}"
        assert flag in flags, f"{env}: the row names {flags}, not {flag}"
        default = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
        assert matches(cell, default), f"{env}: README says {cell!r}, the code's default is {default!r}"


def test_every_row_is_a_setting() -> None:
    fields = {f"ADAPTGATE_{name.upper()}" for name in Settings.model_fields}
    stale = sorted(set(table()) - fields)
    assert not stale, f"README's settings table lists settings that do not exist: {stale}"
