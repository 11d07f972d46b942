"""Secrets never leave the process: a storage URL's password is masked wherever a command shows or keeps
it (stdout, error lines, the tables' `command` column, stored trial attributes, the report)."""

from __future__ import annotations

import re

# scheme://user:PASSWORD@host and password=VALUE (a URL's query or a libpq keyword string)
_URL_PASSWORD = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*:)([^@\s]*)(@)")
_PASSWORD_OPTION = re.compile(r"((?:^|[?&\s;])password\s*=\s*)([^&\s;]*)", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with every password of a storage URL masked as *** (as SQLAlchemy's
    URL.render_as_string(hide_password=True) shows one): secrets never leave the process, in logs, tables,
    reports or stored attributes."""
    text = _URL_PASSWORD.sub(lambda m: m[1] + ("***" if m[2] else "") + m[3], text)
    return _PASSWORD_OPTION.sub(lambda m: m[1] + "***", text)
