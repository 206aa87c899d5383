"""The one form of a template id: ``tpl-`` and 20 lowercase hex digits.

A template id comes from clients and names a folder of the disk tier, so it is a
name, never a path: every entry point (engine, disk tier, router, CLI) checks it
here before it touches anything. This module imports nothing heavy (no torch), so
the router and the clients use it too.
"""

from __future__ import annotations

import re

from .errors import UnknownTemplate

__all__ = ["TEMPLATE_ID_DIGITS", "check_template_id", "is_template_id", "template_id_from_digest"]

TEMPLATE_ID_DIGITS = 20
_TEMPLATE_ID = re.compile(rf"tpl-[0-9a-f]{{{TEMPLATE_ID_DIGITS}}}")


def is_template_id(value: object) -> bool:
    """Whether ``value`` is a well-formed template id (a ``str``; nothing else is)."""
    return isinstance(value, str) and _TEMPLATE_ID.fullmatch(value) is not None


def check_template_id(value: object) -> str:
    """``value`` if it is a well-formed template id.

    Raises:
        UnknownTemplate: anything else. The message does not repeat the value: it may
            be a path, and answers must not tell which paths exist.
    """
    if not is_template_id(value):
        raise UnknownTemplate(
            f"unknown template: a template id is 'tpl-' and {TEMPLATE_ID_DIGITS} lowercase hex digits, "
            "as registration returns it"
        )
    return value  # type: ignore[return-value]


def template_id_from_digest(hex_digest: str) -> str:
    """The template id of a content hash (a sha256 hex digest)."""
    return check_template_id("tpl-" + hex_digest[:TEMPLATE_ID_DIGITS])
