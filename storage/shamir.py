"""Shamir's secret sharing over GF(2^8), byte by byte, in the share format HashiCorp Vault uses.

Owns: splitting a secret into N shares of which any K recover it, and combining K shares back.
Each share is `len(secret) + 1` bytes: one y value per secret byte, then the share's x coordinate
(1..255) as the last byte — Vault's layout, so a share reads the same way in both tools.
Must never: put share or secret bytes in an error message; draw coefficients from anything but
the OS CSPRNG. Combining the wrong shares yields a wrong secret, not an error: the caller checks
the result (the root key's check value) before using it.

No maintained PyPI package fitted (most are unmaintained since 2019-2022 or tied to BIP39
mnemonics), and the arithmetic is short enough to read whole; tests/test_shamir.py pins it with
hand-computed vectors and property tests.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

SHARES_MAX = 255  # x coordinates are the non-zero bytes
THRESHOLD_MIN = 2  # a threshold of one would make every share the whole secret
SECRET_BYTES_MAX = 1024  # bounds a combine request; a root key is 32 bytes

# The AES field polynomial x^8 + x^4 + x^3 + x + 1; 0x03 generates its multiplicative group.
_FIELD_POLYNOMIAL = 0x11B


class ShamirError(ValueError):
    """The split parameters or the shares are malformed (count, length, duplicate x)."""


def _build_tables() -> tuple[list[int], list[int]]:
    exp = [0] * 510
    log = [0] * 256
    value = 1
    for power in range(255):
        exp[power] = value
        log[value] = power
        # value * 3 = value * 2 + value, with the field reduction on overflow.
        doubled = value << 1
        if doubled & 0x100:
            doubled ^= _FIELD_POLYNOMIAL
        value = doubled ^ value
    for power in range(255, 510):
        exp[power] = exp[power - 255]
    return exp, log


_EXP, _LOG = _build_tables()


def gf_mul(a: int, b: int) -> int:
    if a == 0 or b == 0:
        return 0
    return _EXP[_LOG[a] + _LOG[b]]


def gf_div(a: int, b: int) -> int:
    if b == 0:
        raise ZeroDivisionError("division by zero in GF(2^8)")
    if a == 0:
        return 0
    return _EXP[_LOG[a] + 255 - _LOG[b]]


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    """The polynomial with `coefficients` (constant term first) at x, by Horner's rule."""
    result = 0
    for coefficient in reversed(coefficients):
        result = gf_mul(result, x) ^ coefficient
    return result


def split(secret: bytes, shares: int, threshold: int) -> list[bytes]:
    """`shares` shares of `secret`, any `threshold` of which recover it."""
    if not 0 < len(secret) <= SECRET_BYTES_MAX:
        raise ShamirError(f"the secret must be 1..{SECRET_BYTES_MAX} bytes")
    if not THRESHOLD_MIN <= threshold <= shares <= SHARES_MAX:
        raise ShamirError(
            f"need {THRESHOLD_MIN} <= threshold <= shares <= {SHARES_MAX}, "
            f"got threshold {threshold} and shares {shares}"
        )
    # Distinct random x coordinates, as Vault does, so a share's x says nothing about the others.
    xs = list(range(1, 256))
    for position in range(len(xs) - 1, 0, -1):
        swap = int.from_bytes(os.urandom(2), "big") % (position + 1)
        xs[position], xs[swap] = xs[swap], xs[position]
    chosen = xs[:shares]
    outputs = [bytearray() for _ in chosen]
    for secret_byte in secret:
        coefficients = [secret_byte, *os.urandom(threshold - 1)]
        for output, x in zip(outputs, chosen, strict=True):
            output.append(_evaluate(coefficients, x))
    return [bytes(output) + bytes([x]) for output, x in zip(outputs, chosen, strict=True)]


def combine(shares: Sequence[bytes]) -> bytes:
    """The secret whose polynomial passes through `shares` (Lagrange interpolation at x = 0).

    With fewer shares than the threshold, or a share from another split, the result is some
    other byte string; only a check value can tell.
    """
    if len(shares) < THRESHOLD_MIN:
        raise ShamirError(f"need at least {THRESHOLD_MIN} shares")
    if len(shares) > SHARES_MAX:
        raise ShamirError(f"at most {SHARES_MAX} shares")
    length = len(shares[0])
    if not 2 <= length <= SECRET_BYTES_MAX + 1:
        raise ShamirError(f"a share must be 2..{SECRET_BYTES_MAX + 1} bytes")
    if any(len(share) != length for share in shares):
        raise ShamirError("the shares have different lengths")
    xs = [share[-1] for share in shares]
    if 0 in xs:
        raise ShamirError("a share has the x coordinate 0")
    if len(set(xs)) != len(xs):
        raise ShamirError("two shares have the same x coordinate (the same share twice?)")
    # Lagrange basis at 0: l_i = prod_{j != i} x_j / (x_j - x_i); subtraction is XOR here.
    basis = []
    for i, x_i in enumerate(xs):
        weight = 1
        for j, x_j in enumerate(xs):
            if i != j:
                weight = gf_mul(weight, gf_div(x_j, x_j ^ x_i))
        basis.append(weight)
    secret = bytearray()
    for position in range(length - 1):
        value = 0
        for share, weight in zip(shares, basis, strict=True):
            value ^= gf_mul(share[position], weight)
        secret.append(value)
    return bytes(secret)
