"""No secrets on disk: the values of flags and environment variables whose names say they are secret, hidden in
everything compare writes (``runs.jsonl``, ``compare.json``, ``compare.md`` and the logs).

A name is secret when it contains ``token``, ``key``, ``secret`` or ``password`` (any case): ``--hub_token``,
``--api-key``, ``HF_TOKEN``, ``WANDB_API_KEY``, and the fields of ``FAM_HF_SETTINGS`` so named (``hub_token``).
Commands are redacted flag by flag, settings field by field. A run's log is what its command
printed, so every line is searched for the secret values themselves (those of its command and of its environment)
before it is written; values shorter than :data:`MIN_SECRET` characters are left alone there (``false``, ``1``: no
credential is that short, and blanking them would garble the log).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

SECRET_WORDS = ("token", "key", "secret", "password")
HIDDEN = "***"
MIN_SECRET = 8


def is_secret(name: str) -> bool:
    """Return whether a flag or variable name (``--hub_token``, ``HF_TOKEN``) names a secret."""
    name = name.lower()
    return any(word in name for word in SECRET_WORDS)


def redact_command(command: Sequence[str]) -> list[str]:
    """Return ``command`` with the value of every secret flag (``--NAME VALUE`` or ``--NAME=VALUE``) hidden."""
    out: list[str] = []
    hide_next = False
    for token in command:
        if hide_next and not token.startswith("--"):  # the value of a secret flag (a boolean one has none)
            out.append(HIDDEN)
            hide_next = False
            continue
        hide_next = False
        flag, equals, _ = token.partition("=")
        if flag.startswith("-") and is_secret(flag):
            if equals:
                out.append(f"{flag}={HIDDEN}")
                continue
            hide_next = True
        out.append(token)
    return out


def redact_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``settings`` (``FAM_HF_SETTINGS``) with the value of every secret field hidden."""
    return {name: HIDDEN if is_secret(name) and value is not None else value for name, value in settings.items()}


def secret_values(
    command: Sequence[str], environment: Mapping[str, str], settings: Mapping[str, Any] | None = None
) -> list[str]:
    """Return the secret values of a command's flags, of an environment and of settings, longest first (so that a
    value that contains another is hidden whole)."""
    values = {value for name, value in environment.items() if is_secret(name)}
    values |= {str(value) for name, value in (settings or {}).items() if is_secret(name) and value is not None}
    for token, hidden in zip(command, redact_command(command)):
        if token != hidden:
            values.add(token.partition("=")[2] if "=" in token and token.startswith("-") else token)
    return sorted((v for v in values if len(v) >= MIN_SECRET), key=len, reverse=True)


class Redactor:
    """Hides given secret values in text (or bytes) written to a log."""

    def __init__(self, values: Iterable[str]) -> None:
        self.values = [value.encode() for value in values]

    def __call__(self, data: bytes) -> bytes:
        for value in self.values:
            data = data.replace(value, HIDDEN.encode())
        return data

    def text(self, text: str) -> str:
        return self(text.encode()).decode(errors="replace")
