"""The per-request input limits every route applies before any work: item counts and text checks (422)."""

from __future__ import annotations

from app.errors import InvalidInput
from app.lifecycle import Service


def check_item_count(count: int, service: Service, what: str) -> None:
    limit = service.settings.max_items_per_request
    if count == 0:
        raise InvalidInput(f"no {what} in the request")
    if count > limit:
        raise InvalidInput(f"too many {what}: {count} (at most {limit} per request, MAX_ITEMS_PER_REQUEST)")


def check_unicode(text: str, name: str) -> None:
    """422 for a lone surrogate: JSON lets a client escape one (``"\\ud800"``), and no tokenizer can
    encode it (spaCy raised UnicodeEncodeError: a 500 before this check)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidInput(f"{name} is not valid Unicode: a lone surrogate (U+{ord(text[error.start]):04X}) at "
                           f"character {error.start}") from None


def checked_text(text: str, name: str, limit: int, required: bool = True) -> str | None:
    """A client's text as the text routes accept it: 422 when empty or only whitespace (or None where
    ``required`` is false), longer than ``limit`` (MAX_TEXT_CHARS) or not valid Unicode."""
    if not text.strip():
        if required:
            raise InvalidInput(f"{name} is empty or only whitespace")
        return None
    if len(text) > limit:
        raise InvalidInput(f"{name} has {len(text):,} characters; at most {limit:,} are accepted (MAX_TEXT_CHARS)")
    check_unicode(text, name)
    return text
