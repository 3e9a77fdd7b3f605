"""`vault env encrypt | expand | run`: move `.env` files into the vault and back, all or nothing.

Owns the file side of the `.env` workflows of docs/env.md: reading a file as UTF-8, turning its
entries into one `POST /v1/batch/create` or one `POST /v1/batch/read`, writing output files
atomically with mode 0600, and starting the child of `env run` with the expanded environment.
A FILE or `--out` of `-` is standard input or output. The grammar itself lives in
cli/dotenv.py; what `env run` lets a file put into the child's environment, in cli/env_policy.py.

Must never: create some secrets of a file but not others, write an output file for a command that
failed, leave a partly written output file behind, write expanded values anywhere on disk for
`env run`, or put a value or a token into a message. Problems name files, line numbers, keys and
secret names only.

This module is registered by cli/main.py (`main.add_command(env)`) and so never imports it: it
reaches the HTTP client through click's context object, which only has to offer `.client`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol

import click

from cli.client import ClientError, ServerError, VaultClient
from cli.dotenv import (
    REFERENCE_PREFIX,
    Document,
    DotenvError,
    Entry,
    Reference,
    find_references,
    parse,
    replace_values,
)
from cli.env_policy import (
    RunPolicy,
    dangerous_name_problems,
    outside_prefix_problems,
)
from cli.env_policy import (
    child_environment as compose_environment,
)
from vaultnode.names import InvalidInput, check_name, check_prefix

EXIT_FAILED = 1  # the server, the network or a file's content said no
EXIT_USAGE = 2  # the command line itself is wrong (click uses 2 for its usage errors too)
# What env(1) and shells answer when the command cannot be run at all.
EXIT_COMMAND_NOT_EXECUTABLE = 126
EXIT_COMMAND_NOT_FOUND = 127
OUTPUT_MODE = 0o600
VAULT_SUFFIX = ".vault"
STDIO = Path("-")  # as FILE: standard input; as --out: standard output


def source_name(path: Path) -> str:
    """How messages name FILE: its path, or <stdin> (as compilers do) for `-`."""
    return "<stdin>" if path == STDIO else str(path)


class HasClient(Protocol):
    """What `env` needs from click's context object (cli.main.Context provides it)."""

    @property
    def client(self) -> VaultClient: ...


class EnvCommandError(Exception):
    """A `vault env` command refused to act; `problems` names every reason, one per line."""

    def __init__(self, summary: str, problems: list[str], exit_code: int = EXIT_FAILED) -> None:
        self.summary = summary
        self.problems = problems
        self.exit_code = exit_code
        listing = "".join(f"\n  {problem}" for problem in problems)
        super().__init__(f"{summary}{listing}")


# ---- reading ---------------------------------------------------------------------------------
def read_document(path: Path) -> Document:
    """The parsed file (standard input for `-`); EnvCommandError listing every problem (with
    line numbers) otherwise."""
    source = source_name(path)
    try:
        raw = sys.stdin.buffer.read() if path == STDIO else path.read_bytes()
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EnvCommandError(
            f"{source} is not UTF-8 text (byte offset {exc.start})", [], EXIT_FAILED
        ) from None
    except OSError as exc:
        raise EnvCommandError(f"cannot read {source}: {exc.strerror or exc}", []) from None
    try:
        return parse(text)
    except DotenvError as exc:
        raise _located(exc, source, f"{source} is not a valid .env file") from None


def _located(error: DotenvError, source: str, summary: str) -> EnvCommandError:
    """The refusal for a file's defects, each named `source:LINE`."""
    problems = [f"{source}:{problem.line}: {problem.message}" for problem in error.problems]
    return EnvCommandError(summary, problems)


def write_stdout(text: str) -> None:
    # Bytes, not text: the console's encoding must not alter or refuse a value.
    sys.stdout.flush()
    sys.stdout.buffer.write(text.encode("utf-8"))
    sys.stdout.buffer.flush()


# ---- writing ---------------------------------------------------------------------------------
@dataclass
class StagedFile:
    """Complete, fsynced content in a temporary file next to its destination, not yet visible."""

    temp_path: Path
    destination: Path

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.temp_path.unlink()

    def publish(self, *, replace: bool) -> None:
        """Make the content appear at `destination` in one step, then make that step durable.

        Without `replace` an existing destination is never overwritten, even one created after
        the caller looked: a hard link fails atomically if the name is taken.
        """
        try:
            if replace:
                os.replace(self.temp_path, self.destination)
            else:
                self._link_without_overwrite()
        except BaseException:
            self.discard()
            raise
        _fsync_directory(self.destination.parent)

    def _link_without_overwrite(self) -> None:
        try:
            os.link(self.temp_path, self.destination)
        except FileExistsError:
            raise
        except OSError as exc:
            # Some file systems have no hard links; fall back to check-then-rename.
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            if self.destination.exists():
                raise FileExistsError(errno.EEXIST, "file exists", str(self.destination)) from None
            os.replace(self.temp_path, self.destination)
            return
        self.temp_path.unlink()


def stage_file(destination: Path, text: str) -> StagedFile:
    """Write `text` (UTF-8) to a mode-0600 temporary file in the destination's directory and
    fsync it, so publishing it later is a rename that cannot be seen half done."""
    directory = destination.parent
    descriptor, temp_name = tempfile.mkstemp(
        prefix=f".{destination.name}.", suffix=".tmp", dir=directory
    )
    staged = StagedFile(Path(temp_name), destination)
    try:
        # mkstemp already creates 0600; say it explicitly because the file may hold secrets.
        os.fchmod(descriptor, OUTPUT_MODE)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(text.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        staged.discard()
        raise
    return staged


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_file_atomically(destination: Path, text: str) -> None:
    """Replace `destination` with `text` as one step (temp file, fsync, rename, fsync dir)."""
    stage_file(destination, text).publish(replace=True)


# ---- encrypt ---------------------------------------------------------------------------------
def secret_name(prefix: str, key: str) -> str:
    return f"{prefix}/{key}"


def encrypt_problems(path: Path, doc: Document, prefix: str | None) -> list[str]:
    """Every reason the entries cannot become `prefix/KEY` secrets, checked before any call
    (names are checked only with a valid prefix, else every key would repeat its problem)."""
    problems: list[str] = []
    source = source_name(path)
    if not doc.entries():
        problems.append(f"{source}: the file defines no keys, so there is nothing to encrypt")
    for entry in doc.entries():
        if entry.value.startswith(REFERENCE_PREFIX):
            problems.append(
                f"{source}:{entry.line}: key {entry.key!r} already holds a vault reference; "
                "expand the file first instead of storing the reference text as a secret"
            )
        if prefix is None:
            continue
        try:
            check_name(secret_name(prefix, entry.key))
        except InvalidInput as exc:
            problems.append(f"{source}:{entry.line}: key {entry.key!r}: {exc.message}")
    return problems


def default_encrypt_output(path: Path) -> Path:
    """FILE.vault; standard output when FILE is standard input."""
    return STDIO if path == STDIO else path.with_name(path.name + VAULT_SUFFIX)


def encrypt_file(
    client: VaultClient, path: Path, prefix: str, out: Path, *, force: bool
) -> dict[str, Any]:
    """Create `prefix/KEY` for every entry with one batch call and write the reference file
    (to standard output when `out` is `-`).

    The reference file is staged (complete and fsynced) before the batch call, so after the
    call succeeds only a same-directory rename remains. On any failure nothing is created and
    nothing is written. Returns the server's batch reply.
    """
    usage_problems: list[str] = []
    valid_prefix: str | None = prefix
    try:
        check_name(prefix)
    except InvalidInput as exc:
        valid_prefix = None
        usage_problems.append(f"--prefix {prefix!r}: {exc.message} (give it without a final '/')")
    to_stdout = out == STDIO
    if not to_stdout and out.exists() and not force:
        usage_problems.append(f"{out} already exists; pass --force to replace it")
    try:
        doc = read_document(path)
    except EnvCommandError as exc:
        if not usage_problems:
            raise
        raise EnvCommandError(exc.summary, usage_problems + exc.problems, EXIT_USAGE) from None
    content_problems = encrypt_problems(path, doc, valid_prefix)
    if usage_problems or content_problems:
        raise EnvCommandError(
            "nothing was created",
            usage_problems + content_problems,
            EXIT_USAGE if usage_problems else EXIT_FAILED,
        )
    entries = doc.entries()
    references = {entry.key: str(Reference(secret_name(prefix, entry.key), 1)) for entry in entries}
    reference_text = replace_values(doc, references)
    staged: StagedFile | None = None
    try:
        if not to_stdout:
            staged = stage_file(out, reference_text)
    except OSError as exc:
        raise EnvCommandError(
            f"cannot write {out} ({exc.strerror or exc}); nothing was created", []
        ) from None
    try:
        reply = client.request(
            "POST",
            "/v1/batch/create",
            json_body={
                "secrets": [
                    {"name": secret_name(prefix, entry.key), "value": entry.value}
                    for entry in entries
                ]
            },
        )
    except (ServerError, ClientError) as exc:
        if staged is not None:
            staged.discard()
        if isinstance(exc, ServerError) and exc.status < 500:
            raise _batch_create_refused(exc, path, prefix, entries) from None
        # A 5xx after the client's retries, or no answer: the batch may have been applied.
        raise EnvCommandError(
            f"the vault did not confirm the batch ({exc}); it is one log entry, so either every "
            f"secret was created or none was, and `vault list {prefix}/` shows which. "
            "No output file was written.",
            [],
        ) from None
    except BaseException:
        if staged is not None:
            staged.discard()
        raise
    if staged is None:
        write_stdout(reference_text)
        body: dict[str, Any] = reply.body
        return body
    try:
        staged.publish(replace=force)
    except OSError as exc:
        raise EnvCommandError(
            f"all {len(entries)} secrets were created, but {out} could not be written "
            f"({exc.strerror or exc})",
            [f"every value of key KEY is now the reference {REFERENCE_PREFIX}{prefix}/KEY@1"],
        ) from None
    published: dict[str, Any] = reply.body
    return published


# What a refusal means for each name it lists, where the error code says it all; for other
# codes the server's message (which states the reason) is shown once, above the names.
_CREATE_REFUSALS = {"already_exists": "already exists", "forbidden": "may not be created"}
_READ_REFUSALS = {"not_found": "is not found", "forbidden": "is not readable with this token"}


def _batch_create_refused(
    error: ServerError, path: Path, prefix: str, entries: list[Entry]
) -> EnvCommandError:
    line_of = {secret_name(prefix, entry.key): entry.line for entry in entries}
    reason = _CREATE_REFUSALS.get(error.code, "is refused")
    problems = [
        f"{source_name(path)}:{line_of.get(name, '?')}: secret {name} {reason}"
        for name in (str(n) for n in error.details.get("names", []))
    ]
    return EnvCommandError(
        f"the vault refused the batch ({_cause(error, _CREATE_REFUSALS, problems)}); "
        "nothing was created",
        problems,
    )


# ---- expand ----------------------------------------------------------------------------------
def _reference_label(reference: Reference) -> str:
    """How the server names a missing reference: NAME, or NAME@N when pinned."""
    return reference.name if reference.version is None else f"{reference.name}@{reference.version}"


def references_of(path: Path, doc: Document) -> dict[str, Reference]:
    """Every referring key's reference; EnvCommandError listing each malformed one."""
    source = source_name(path)
    try:
        return find_references(doc)
    except DotenvError as exc:
        summary = f"{source} has malformed vault references; nothing was written"
        raise _located(exc, source, summary) from None


def resolve_references(
    client: VaultClient, path: Path, doc: Document
) -> tuple[dict[str, str], int | None]:
    """The value of every referring key, all read with ONE batch read at one applied index.

    Returns (values by key, the index they were read at; None if the file has no references).
    """
    references = references_of(path, doc)
    if not references:
        return {}, None
    unique = list(dict.fromkeys(references.values()))
    request = [
        {"name": r.name} if r.version is None else {"name": r.name, "version": r.version}
        for r in unique
    ]
    try:
        reply = client.request("POST", "/v1/batch/read", json_body={"secrets": request})
    except ServerError as exc:
        raise _batch_read_refused(exc, path, doc, references) from None
    except ClientError as exc:
        raise EnvCommandError(f"cannot reach the vault ({exc}); nothing was written", []) from None
    secrets = reply.body["secrets"]
    if len(secrets) != len(unique):
        raise EnvCommandError("the vault answered a different number of secrets than asked", [])
    value_of = {
        reference: secret["value"] for reference, secret in zip(unique, secrets, strict=True)
    }
    index: int = reply.body["index"]
    return {key: value_of[reference] for key, reference in references.items()}, index


def _batch_read_refused(
    error: ServerError, path: Path, doc: Document, references: Mapping[str, Reference]
) -> EnvCommandError:
    named = {str(name) for name in error.details.get("names", [])}
    line_of = {entry.key: entry.line for entry in doc.entries()}
    reason = _READ_REFUSALS.get(error.code, "is refused")
    problems = [
        f"{source_name(path)}:{line_of[key]}: key {key!r}: {reference} {reason}"
        for key, reference in references.items()
        if reference.name in named or _reference_label(reference) in named
    ]
    return EnvCommandError(
        f"the vault refused the read ({_cause(error, _READ_REFUSALS, problems)}); "
        "nothing was written",
        problems,
    )


def _cause(error: ServerError, explained: Mapping[str, str], problems: list[str]) -> str:
    """The status and code, plus the server's message unless each problem line says it."""
    cause = f"{error.status} {error.code}"
    return cause if problems and error.code in explained else f"{cause}: {error.message}"


def expand_text(client: VaultClient, path: Path) -> tuple[str, dict[str, str]]:
    """(the expanded file text, every key's final value); references resolved, rest verbatim."""
    return expand_document(client, path, read_document(path))


def expand_document(client: VaultClient, path: Path, doc: Document) -> tuple[str, dict[str, str]]:
    resolved, _ = resolve_references(client, path, doc)
    text = replace_values(doc, resolved)
    values = parse(text).values()
    # quote_value promises an exact read-back; check it, since the output goes to deployments.
    expected = {**doc.values(), **resolved}
    if values != expected:
        raise AssertionError("expanded text does not read back as the resolved values")
    return text, values


# ---- run -------------------------------------------------------------------------------------
def check_run_policy(path: Path, doc: Document, policy: RunPolicy) -> None:
    """Refuse, before any request, a file that sets a dangerous name the caller did not allow
    or refers to a secret outside the caller's prefixes; every problem is listed."""
    source = source_name(path)
    problems = dangerous_name_problems(source, doc.entries(), policy.allowed_names)
    if policy.allowed_prefixes:
        line_of = {entry.key: entry.line for entry in doc.entries()}
        problems += outside_prefix_problems(
            source, references_of(path, doc), line_of, policy.allowed_prefixes
        )
    if problems:
        in_file_order = [message for _, message in sorted(problems)]
        raise EnvCommandError(f"{source} may not set these; nothing was read or run", in_file_order)


def child_environment(values: Mapping[str, str], *, keep_vault_env: bool) -> dict[str, str]:
    """The current environment (less the caller's VAULT_* unless kept) with the file's values
    on top (the file wins)."""
    unusable = [key for key, value in values.items() if "\0" in value]
    if unusable:
        raise EnvCommandError(
            "an environment variable cannot hold a NUL character; nothing was run",
            [f"key {key!r}" for key in unusable],
        )
    return compose_environment(os.environ, values, keep_vault_env=keep_vault_env)


def exec_command(command: list[str], environment: dict[str, str]) -> NoReturn:
    """Become `command`: its exit status and signals are then the caller's, with no relay."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(command[0], command, environment)
    except FileNotFoundError:
        _exit_with(f"command not found: {command[0]}", EXIT_COMMAND_NOT_FOUND)
    except PermissionError:
        _exit_with(f"command not executable: {command[0]}", EXIT_COMMAND_NOT_EXECUTABLE)
    except OSError as exc:
        _exit_with(f"cannot run {command[0]}: {exc.strerror or exc}", EXIT_COMMAND_NOT_EXECUTABLE)


# ---- click -----------------------------------------------------------------------------------
def _exit_with(message: str, code: int) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


@contextlib.contextmanager
def _reported() -> Iterator[None]:
    try:
        yield
    except EnvCommandError as exc:
        _exit_with(str(exc), exc.exit_code)


_FILE = click.Path(exists=True, dir_okay=False, path_type=Path, allow_dash=True)
_OUT = click.Path(dir_okay=False, writable=True, path_type=Path, allow_dash=True)


@click.group()
def env() -> None:
    """Move .env files into the vault and back (see docs/env.md)."""


@env.command()
@click.argument("file", type=_FILE)
@click.option("--prefix", required=True, help="Store KEY as the secret PREFIX/KEY.")
@click.option(
    "--out",
    type=_OUT,
    default=None,
    help="Reference file, '-' for standard output (default: FILE.vault; stdout for FILE -).",
)
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.pass_obj
def encrypt(obj: HasClient, file: Path, prefix: str, out: Path | None, force: bool) -> None:
    """Create one secret per key of FILE ('-': standard input) in one batch, and write a file
    of references.

    Every key or none: a duplicate key, a syntax error or an existing secret fails the whole
    command, and then nothing is created and nothing is written.
    """
    destination = out if out is not None else default_encrypt_output(file)
    with _reported():
        body = encrypt_file(obj.client, file, prefix, destination, force=force)
    count = len(body["secrets"])
    wrote = "the references to standard output" if destination == STDIO else str(destination)
    click.echo(
        f"created {count} secrets under {prefix}/ in one batch (index {body['index']}); "
        f"wrote {wrote}",
        err=destination == STDIO,  # stdout holds the reference file itself
    )


@env.command()
@click.argument("file", type=_FILE)
@click.option(
    "--out", type=_OUT, default=None, help="Write here (mode 0600), not to stdout ('-')."
)
@click.pass_obj
def expand(obj: HasClient, file: Path, out: Path | None) -> None:
    """Resolve every vault:NAME[@N] of FILE ('-': standard input) with one consistent read and
    print a .env file.

    Any reference that cannot be resolved fails the whole command; nothing is written.
    """
    with _reported():
        text, _ = expand_text(obj.client, file)
        if out is None or out == STDIO:
            write_stdout(text)
            return
        try:
            write_file_atomically(out, text)
        except OSError as exc:
            raise EnvCommandError(f"cannot write {out}: {exc.strerror or exc}", []) from None


def _allowed_prefix(
    _: click.Context, __: click.Parameter, value: tuple[str, ...]
) -> tuple[str, ...]:
    for prefix in value:
        try:
            check_prefix(prefix)
        except InvalidInput as exc:
            raise click.BadParameter(f"{prefix!r}: {exc.message}") from None
    return value


@env.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option(
    "--keep-vault-env",
    is_flag=True,
    help="Hand the caller's VAULT_* variables (token, address, CA) to COMMAND too.",
)
@click.option(
    "--allow-name",
    "allowed_names",
    multiple=True,
    metavar="KEY",
    help="Let FILE set KEY although it is a dangerous name (LD_*, PATH, *_PROXY... see"
    " docs/env.md); repeatable.",
)
@click.option(
    "--allow-prefix",
    "allowed_prefixes",
    multiple=True,
    metavar="PREFIX",
    callback=_allowed_prefix,
    help="Refuse FILE unless every reference names a secret starting with PREFIX, e.g. app/;"
    " repeatable.",
)
@click.argument("file", type=_FILE)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_obj
def run(
    obj: HasClient,
    keep_vault_env: bool,
    allowed_names: tuple[str, ...],
    allowed_prefixes: tuple[str, ...],
    file: Path,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND with FILE's expanded values added to its environment: vault env run
    [OPTIONS] FILE -- CMD ARGS... FILE may be '-' (standard input, which the command then
    finds at its end). The command's exit code is vault's; nothing is written to disk.

    The caller's VAULT_* variables are removed from the command's environment, and a FILE
    that sets a dangerous name or refers outside --allow-prefix is refused before any request.
    """
    # Option parsing stops at FILE, so click hands a `--` separator through as an argument.
    argv = list(command[1:] if command[0] == "--" else command)
    if not argv:
        raise click.UsageError("no command to run after '--'")
    if command[0] != "--" and command[0].startswith("-"):
        # Most likely an option of ours written after FILE, which would otherwise be run.
        raise click.UsageError(f"{command[0]}: options go before FILE; the command follows '--'")
    policy = RunPolicy(keep_vault_env, frozenset(allowed_names), allowed_prefixes)
    with _reported():
        doc = read_document(file)
        check_run_policy(file, doc, policy)
        _, values = expand_document(obj.client, file, doc)
        environment = child_environment(values, keep_vault_env=policy.keep_vault_env)
    obj.client.close()
    exec_command(argv, environment)
