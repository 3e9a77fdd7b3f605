"""Shamir's secret sharing over GF(2^8) (storage/shamir.py): known vectors and properties."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage import shamir


def _slow_mul(a: int, b: int) -> int:
    """Carry-less multiplication reduced by x^8+x^4+x^3+x+1: the textbook definition."""
    product = 0
    while b:
        if b & 1:
            product ^= a
        a <<= 1
        if a & 0x100:
            a ^= 0x11B
        b >>= 1
    return product


def test_field_multiplication_matches_the_textbook_definition_for_every_pair() -> None:
    for a in range(256):
        for b in range(256):
            assert shamir.gf_mul(a, b) == _slow_mul(a, b)


def test_known_inverse_pair_from_fips_197() -> None:
    # FIPS-197 section 4.2: {53} * {CA} = {01}.
    assert shamir.gf_mul(0x53, 0xCA) == 0x01
    assert shamir.gf_div(1, 0x53) == 0xCA


def test_hand_computed_shares_of_one_byte_recover_it() -> None:
    # f(x) = 0x2A + 0x53 x: f(1) = 0x79, f(2) = 0x2A ^ 0xA6 = 0x8C, f(3) = 0x2A ^ 0xF5 = 0xDF.
    shares = [bytes([0x79, 1]), bytes([0x8C, 2]), bytes([0xDF, 3])]
    for pair in itertools.combinations(shares, 2):
        assert shamir.combine(list(pair)) == b"\x2a"


def test_hand_computed_threshold_three_vector() -> None:
    # f(x) = 0x01 + 0x02 x + 0x03 x^2 at x = 4, 5, 6 and 7, computed with the textbook multiply.
    def f(x: int) -> int:
        return 0x01 ^ _slow_mul(0x02, x) ^ _slow_mul(0x03, _slow_mul(x, x))

    shares = [bytes([f(x), x]) for x in (4, 5, 6, 7)]
    for trio in itertools.combinations(shares, 3):
        assert shamir.combine(list(trio)) == b"\x01"
    # Two shares of a threshold-3 split interpolate a line: a different constant term.
    assert shamir.combine(shares[:2]) != b"\x01"


@settings(max_examples=60, deadline=None)
@given(
    secret=st.binary(min_size=1, max_size=48),
    shares_and_threshold=st.integers(2, 10).flatmap(
        lambda n: st.tuples(st.just(n), st.integers(2, n))
    ),
    data=st.data(),
)
def test_any_threshold_subset_recovers_the_secret(
    secret: bytes, shares_and_threshold: tuple[int, int], data: st.DataObject
) -> None:
    count, threshold = shares_and_threshold
    shares = shamir.split(secret, count, threshold)
    assert len(shares) == count
    assert all(len(share) == len(secret) + 1 for share in shares)
    subset = data.draw(st.permutations(shares))[:threshold]
    assert shamir.combine(subset) == secret
    assert shamir.combine(shares) == secret  # more than the threshold works too


def test_fewer_than_threshold_shares_do_not_recover_a_root_key() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, 5, 3)
    for pair in itertools.combinations(shares, 2):
        assert shamir.combine(list(pair)) != secret


def test_split_uses_distinct_nonzero_x_coordinates() -> None:
    shares = shamir.split(b"k" * 32, 255, 2)
    xs = [share[-1] for share in shares]
    assert sorted(xs) == list(range(1, 256))


@pytest.mark.parametrize(
    ("count", "threshold"), [(5, 1), (2, 3), (256, 3), (0, 0)]
)
def test_split_refuses_impossible_parameters(count: int, threshold: int) -> None:
    with pytest.raises(shamir.ShamirError):
        shamir.split(b"secret", count, threshold)


def test_combine_refuses_malformed_share_sets() -> None:
    shares = shamir.split(b"0123456789", 3, 2)
    with pytest.raises(shamir.ShamirError, match="same x"):
        shamir.combine([shares[0], shares[0]])
    with pytest.raises(shamir.ShamirError, match="different lengths"):
        shamir.combine([shares[0], shares[1][1:]])
    with pytest.raises(shamir.ShamirError, match="at least"):
        shamir.combine([shares[0]])
    with pytest.raises(shamir.ShamirError, match="x coordinate 0"):
        shamir.combine([shares[0], b"\x00" * 10 + b"\x00"])
