"""Credentials inside URLs: found, refused with the reason, and redacted wherever a URL could be stored.

    credentials_in(url)      # 'user:password@ before the host' | 'the query parameter api_key' | None
    redact(text)             # every URL in text with its userinfo and secret query values replaced by ***

A judge URL is copied into judgment rows, report.json/report.md, the run's recipe.yaml and Slurm job scripts, and it
is a process argument that `ps` shows. A key inside it would be written to all of these, so a URL with credentials
is refused (the key belongs in an environment variable whose NAME is configured), and what is stored is redacted
in case an older file still holds one.
"""

from __future__ import annotations

import re
from typing import Any, Optional

_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s@]*)@")
_SECRET_QUERY = re.compile(r"(?P<lead>[?&;](?P<name>[A-Za-z0-9_.-]*(?:key|token|secret|password|passwd|pwd|sig|"
                           r"signature|auth|credential)[A-Za-z0-9_.-]*)=)(?P<value>[^&#\s]*)", re.IGNORECASE)
REDACTED = "***"


def credentials_in(text: str) -> Optional[str]:
    """Where `text` (a URL, or a spec holding one) carries a credential, in words without its value; None if it
    carries none."""
    if _USERINFO.search(text):
        return "a user:password@ part before the host"
    query = _SECRET_QUERY.search(text)
    if query:
        return f"the query parameter {query['name']!r}"
    return None


def redact(text: Any) -> Any:
    """`text` with every URL's userinfo and every secret-named query value replaced by ***; a value that is not a
    string (a missing field) is returned as it is."""
    if not isinstance(text, str):
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['lead']}{REDACTED}", text)


def refusal(field: str, text: str) -> Optional[str]:
    """The error message for a `field` value that carries a credential (the value redacted), or None."""
    where = credentials_in(text)
    if where is None:
        return None
    return (f"{field} {redact(text)!r} carries a credential ({where}); refused because the URL is stored in "
            f"judgment rows, reports, the run's recipe.yaml and Slurm job scripts, and is visible in `ps`. Remove it "
            f"from the URL and export the key in an environment variable instead (eval.judge --api-key-env NAME, "
            f"default OPENAI_API_KEY)")
