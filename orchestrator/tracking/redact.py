"""Keep secrets out of MLflow: params, tags, the ``recipe.yaml`` artifact and event payloads.

A value is secret when its key looks secret (:func:`is_secret_key`), when it is
a URL with a password (``https://user:pw@host`` keeps ``user``, hides ``pw``) or
a secret query parameter (``?access_token=...``),
or when it contains the value of a secret-looking environment variable (for
example ``RAY_AUTH_TOKEN`` or ``HF_TOKEN``) or of a variable a recipe's ``${env:NAME}``
reference resolved: such values are replaced by :data:`MASK` wherever they appear.
A reference itself (``token: ${env:HF_TOKEN}``) holds no secret and is kept, so that
resume can resolve it again (:mod:`orchestrator.envrefs`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import yaml

from orchestrator.envrefs import is_reference, resolved_values

MASK = "***"

# Substrings that mark a secret wherever they appear in a key segment (separators removed).
_STRONG = (
    "password",
    "passwd",
    "passphrase",
    "secret",
    "credential",
    "apikey",
    "accesskey",
    "privatekey",
)
# Whole words that mark a secret ("auth" but not "author"; "token" but not "tokenizer").
_WORDS = {"auth", "authorization", "token"}
# "pad_token", "eos_token_id", "max_token_len" ... name tokenizer settings, not credentials.
_TOKEN_NOT_SECRET_BEFORE = {
    "pad",
    "bos",
    "eos",
    "unk",
    "sep",
    "cls",
    "mask",
    "special",
    "max",
    "min",
    "num",
    "start",
    "end",
    "image",
    "video",
    "audio",
    "add",
}
_TOKEN_NOT_SECRET_AFTER = {"id", "ids", "type", "types", "len", "length", "count", "limit"}
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^\s/:@]+:)(?P<pw>[^\s/@]+)@")
_QUERY_PARAM = re.compile(r"(?P<head>[?&](?P<name>[^=&\s#]+)=)(?P<value>[^&\s#]+)")
_MIN_ENV_SECRET_LEN = 8  # shorter env values ("1", "token") are too common to scrub


def _words(segment: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", segment)
    return [w for w in re.split(r"[^a-z0-9]+", spaced.lower()) if w]


def _segment_is_secret(segment: str) -> bool:
    words = _words(segment)
    joined = "".join(words)
    if any(s in joined for s in _STRONG):
        return True
    for i, word in enumerate(words):
        if word not in _WORDS:
            continue
        if word == "token":
            before = words[i - 1] if i > 0 else ""
            after = words[i + 1] if i + 1 < len(words) else ""
            if before in _TOKEN_NOT_SECRET_BEFORE or after in _TOKEN_NOT_SECRET_AFTER:
                continue
        return True
    return False


def is_secret_key(key: str) -> bool:
    """True when any dotted segment of ``key`` names a secret (case-insensitive).

    Secret markers: password, passwd, passphrase, secret, credential, api_key /
    apikey, access_key, private_key (as substrings), and the words token, auth,
    authorization. ``tokenizer``, ``max_tokens``, ``pad_token`` or
    ``eos_token_id`` are not secrets; ``hf_token``, ``RAY_AUTH_TOKEN``,
    ``apiKey`` and ``db.password`` are.
    """
    return any(_segment_is_secret(seg) for seg in str(key).split("."))


def secret_env_values() -> list[str]:
    """Values of environment variables whose names look secret, or that a recipe reference
    resolved, longest first."""
    values = {
        v for k, v in os.environ.items() if is_secret_key(k) and len(v) >= _MIN_ENV_SECRET_LEN
    }
    values.update(v for v in resolved_values() if len(v) >= _MIN_ENV_SECRET_LEN)
    return sorted(values, key=len, reverse=True)


def redact_string(text: str, env_values: list[str] | None = None) -> str:
    """``text`` with URL passwords, secret URL query values (``?token=...``) and secret
    environment values replaced by :data:`MASK`."""
    text = _URL_PASSWORD.sub(
        lambda m: m.group(0) if is_reference(m.group("pw")) else f"{m.group('head')}{MASK}@", text
    )
    text = _QUERY_PARAM.sub(
        lambda m: (
            m.group("head") + MASK
            if is_secret_key(m.group("name")) and not is_reference(m.group("value"))
            else m.group(0)
        ),
        text,
    )
    for value in secret_env_values() if env_values is None else env_values:
        if value in text:
            text = text.replace(value, MASK)
    return text


def redact(obj: Any, *, _env: list[str] | None = None) -> Any:
    """A deep copy of ``obj`` (dicts, lists, tuples, scalars) with every secret replaced by "***".

    Values under secret-looking keys are masked whole (even nested dicts), except
    ``None``, "" and ``${env:NAME}`` references, which hide nothing, are kept. Other
    strings are scrubbed with :func:`redact_string`. Tuples come back as lists.
    """
    env = secret_env_values() if _env is None else _env
    if isinstance(obj, Mapping):
        out: dict[Any, Any] = {}
        for key, value in obj.items():
            hides_nothing = value in (None, "") or (isinstance(value, str) and is_reference(value))
            if is_secret_key(str(key)) and not hides_nothing:
                out[key] = MASK
            else:
                out[key] = redact(value, _env=env)
        return out
    if isinstance(obj, list | tuple):
        return [redact(v, _env=env) for v in obj]
    if isinstance(obj, str):
        return redact_string(obj, env)
    return obj


_SECRET_LINE = re.compile(r"^(?P<head>\s*-?\s*(?P<key>[^\s:#][^:#]*?)\s*:)(?P<rest>\s*\S.*)$")


def _redact_lines(text: str) -> str:
    """Fallback for text that is not a single YAML mapping: mask ``secret_key: value`` lines."""
    out = []
    for line in text.splitlines():
        m = _SECRET_LINE.match(line)
        if m and is_secret_key(m.group("key").strip("'\"")):
            line = f"{m.group('head')} '{MASK}'"
        out.append(redact_string(line))
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def redact_text(yaml_text: str) -> str:
    """The YAML recipe text with secrets masked, for the ``recipe.yaml`` artifact.

    When nothing needs masking the text comes back unchanged (same bytes, so its
    sha256 still identifies the recipe). Otherwise it is parsed with
    ``yaml.safe_load``, redacted and re-dumped with ``sort_keys=False`` (comments
    are lost). Text that does not parse falls back to a line-by-line mask.
    """
    try:
        data = yaml.safe_load(yaml_text)
    except yaml.YAMLError:
        return _redact_lines(yaml_text)
    clean = redact(data)
    if clean == data:
        return yaml_text
    return yaml.safe_dump(clean, sort_keys=False, allow_unicode=True)
