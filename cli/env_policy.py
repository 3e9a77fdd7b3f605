"""What `vault env run` lets a `.env.vault` file put into a child's environment (docs/env.md).

A reference file is often not written by the person who runs it (it comes with a repository or a
deployment), and the environment decides what a program loads and whom it talks to. So the
file may not set a variable that makes the child run other code, load other libraries or send
its traffic elsewhere, unless the caller names it with `--allow-name`; may not pull a secret
outside the caller's `--allow-prefix`es; and the caller's own `VAULT_*` variables (token,
address, CA) are not handed to the child unless `--keep-vault-env` asks for it.

Pure functions: no I/O, no vault calls. Problems name keys, lines and secret names, never values.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from cli.dotenv import Entry, Reference

CALLER_VAULT_PREFIX = "VAULT_"

# Each pattern is matched against the whole key, case-sensitively (as Linux compares names),
# with `*` matching any characters; proxy names are matched in both cases, as programs read both.
DANGEROUS_NAME_PATTERNS: Mapping[str, str] = {
    # the dynamic loader and C library: load or run arbitrary code in any program
    "LD_*": "the dynamic loader",
    "DYLD_*": "the dynamic loader",
    "GCONV_PATH": "the C library",
    # shells: run a file or a command on start-up, or redefine commands and word splitting
    "BASH_ENV": "shell start-up",
    "ENV": "shell start-up",
    "BASH_FUNC_*": "shell start-up",
    "SHELLOPTS": "shell start-up",
    "BASHOPTS": "shell start-up",
    "PS4": "shell start-up",
    "PROMPT_COMMAND": "shell start-up",
    "IFS": "shell word splitting",
    "CDPATH": "shell directory search",
    # where programs and interpreters find code, and options that make them load more
    "PATH": "the command search path",
    "PYTHON*": "the Python interpreter",
    "PERL5*": "the Perl interpreter",
    "PERLLIB": "the Perl interpreter",
    "RUBYOPT": "the Ruby interpreter",
    "RUBYLIB": "the Ruby interpreter",
    "NODE_OPTIONS": "the Node.js runtime",
    "NODE_PATH": "the Node.js runtime",
    "JAVA_TOOL_OPTIONS": "the Java runtime",
    "JDK_JAVA_OPTIONS": "the Java runtime",
    "_JAVA_OPTIONS": "the Java runtime",
    "CLASSPATH": "the Java runtime",
    "PHPRC": "the PHP interpreter",
    "PHP_INI_SCAN_DIR": "the PHP interpreter",
    "GIT_SSH": "git's transport command",
    "GIT_SSH_COMMAND": "git's transport command",
    "GIT_EXEC_PATH": "git's command search path",
    # where traffic goes and which servers are trusted
    "*_PROXY": "a network proxy",
    "*_proxy": "a network proxy",
    "SSL_CERT_FILE": "TLS trust",
    "SSL_CERT_DIR": "TLS trust",
    "REQUESTS_CA_BUNDLE": "TLS trust",
    "CURL_CA_BUNDLE": "TLS trust",
    "NODE_EXTRA_CA_CERTS": "TLS trust",
    "NODE_TLS_REJECT_UNAUTHORIZED": "TLS trust",
}


@dataclass(frozen=True)
class RunPolicy:
    """The caller's choices for one `vault env run`."""

    keep_vault_env: bool = False
    allowed_names: frozenset[str] = frozenset()
    # Empty means any reference the token can read; else each must start with one of these.
    allowed_prefixes: tuple[str, ...] = ()


def dangerous_because(key: str) -> str | None:
    """What `key` controls if it is a dangerous name (the first pattern that matches), or None."""
    for pattern, controls in DANGEROUS_NAME_PATTERNS.items():
        if fnmatch.fnmatchcase(key, pattern):
            return controls
    return None


# A problem: (the line it is on, the message naming source, line and key).
Problem = tuple[int, str]


def dangerous_name_problems(
    source: str, entries: Iterable[Entry], allowed_names: Collection[str]
) -> list[Problem]:
    """One for each entry of the file that sets a dangerous name the caller did not allow."""
    problems = []
    for entry in entries:
        controls = dangerous_because(entry.key)
        if controls is not None and entry.key not in allowed_names:
            problems.append(
                (
                    entry.line,
                    f"{source}:{entry.line}: key {entry.key!r} controls {controls}; "
                    f"pass --allow-name {entry.key} if this file may set it",
                )
            )
    return problems


def outside_prefix_problems(
    source: str,
    references: Mapping[str, Reference],
    line_of: Mapping[str, int],
    allowed_prefixes: tuple[str, ...],
) -> list[Problem]:
    """One for each reference to a secret outside every allowed prefix (none given: no limit)."""
    if not allowed_prefixes:
        return []
    shown = " or ".join(f"--allow-prefix {prefix}" for prefix in allowed_prefixes)
    return [
        (line_of[key], f"{source}:{line_of[key]}: key {key!r}: {reference} is outside {shown}")
        for key, reference in references.items()
        if not reference.name.startswith(allowed_prefixes)
    ]


def child_environment(
    inherited: Mapping[str, str], values: Mapping[str, str], *, keep_vault_env: bool
) -> dict[str, str]:
    """The inherited environment, less the caller's VAULT_* unless kept, with the file's values
    on top (the file wins, and a VAULT_* the file itself sets is the file's to give)."""
    base = {
        key: value
        for key, value in inherited.items()
        if keep_vault_env or not key.startswith(CALLER_VAULT_PREFIX)
    }
    return {**base, **values}
