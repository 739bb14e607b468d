"""How the LoRA modules word a refusal: what was given, what is allowed, what to do."""
from __future__ import annotations


def fail(what: str, allowed: str, todo: str) -> ValueError:
    return ValueError(f"{what}. {allowed}. {todo}.")


def short_list(items, limit: int = 12) -> str:
    items = list(items)
    shown = ", ".join(str(x) for x in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
