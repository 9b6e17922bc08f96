"""The configuration reference's table, generated from ``Neo4jConnectionConfig``.

    python scripts/config_table.py           # print the table
    python scripts/config_table.py --write   # rewrite it in docs/reference/configuration.md
    python scripts/config_table.py --check   # exit 1 if that page is out of date

The table sits in docs/reference/configuration.md between
``<!-- config-table:start -->`` and ``<!-- config-table:end -->``;
``tests/test_docs_examples.py`` fails when it no longer matches the model, so
it cannot drift from the code.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from pydantic_core import PydanticUndefined

from neopool.config import Neo4jConnectionConfig, env_name

PAGE = Path(__file__).resolve().parents[1] / "docs" / "reference" / "configuration.md"
START = "<!-- config-table:start -->"
END = "<!-- config-table:end -->"


def _default(value: Any) -> str:
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, float):
        return f"`{value:g}`"
    if value == "":
        return '`""`'
    return f"`{value}`"


def table() -> str:
    """The markdown table: setting, environment variable, default, meaning."""
    rows = [
        "| Setting | Environment variable | Default | Meaning |",
        "|---|---|---|---|",
    ]
    for name, field in Neo4jConnectionConfig.model_fields.items():
        description = (field.description or "").replace("|", "\\|")
        default = _default(field.default)
        variable = f"`{env_name(name)}`" if env_name(name) else "none (Python only)"
        rows.append(f"| `{name}` | {variable} | {default} | {description} |")
    return "\n".join(rows)


def render(page: str) -> str:
    """``page`` with the text between the markers replaced by :func:`table`."""
    head, start, rest = page.partition(START)
    _old, end, tail = rest.partition(END)
    if not start or not end:
        raise SystemExit(f"{PAGE.name} has no {START} ... {END} section")
    return f"{head}{START}\n{table()}\n{END}{tail}"


def main(argv: list[str]) -> int:
    if "--write" in argv:
        PAGE.write_text(render(PAGE.read_text()))
        return 0
    if "--check" in argv:
        text = PAGE.read_text()
        if render(text) != text:
            print("docs/reference/configuration.md's table is out of date: run", file=sys.stderr)
            print("  python scripts/config_table.py --write", file=sys.stderr)
            return 1
        return 0
    print(table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
