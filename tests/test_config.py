"""Node configuration errors: every wrong config is refused up front, naming the key and the reason.

Unit-level through vaultnode.config.parse_config/load_config, plus one real `vaultnode` process
showing that a bad file ends the node with exit code 2 and that message, before any port opens.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vaultnode.config import ConfigError, Limits, load_config, parse_config

VALID_HASH = "ab" * 32
BASE_DIR = Path("/srv/vault")


def valid_data(**overrides: Any) -> dict[str, Any]:
    """A minimal correct single-node config; an override of None removes that key."""
    data: dict[str, Any] = {
        "node_id": 1,
        "cluster_id": "c0ffee",
        "data_dir": "node1/data",
        "http_listen": "127.0.0.1:8200",
        "peer_listen": "127.0.0.1:8201",
        "root_key_file": "node1/root.key",
        "root_token_sha256": VALID_HASH,
        "root_accessor": "acc_0123",
        "peers": [{"id": 1, "peer_addr": "127.0.0.1:8201", "http_addr": "127.0.0.1:8200"}],
        "http_plaintext": True,
    }
    for key, value in overrides.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def peer(node_id: int, http_addr: str | None = None) -> dict[str, Any]:
    port = 8200 + 2 * (node_id - 1)
    return {
        "id": node_id,
        "peer_addr": f"127.0.0.1:{port + 1}",
        "http_addr": http_addr or f"127.0.0.1:{port}",
    }


def config_error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, BASE_DIR)
    return str(caught.value)


def test_a_valid_config_parses_with_paths_relative_to_the_config_directory() -> None:
    config = parse_config(valid_data(), BASE_DIR)
    assert config.node_id == 1
    assert config.data_dir == BASE_DIR / "node1" / "data"
    assert config.root_key_file == BASE_DIR / "node1" / "root.key"
    assert (config.http_listen.host, config.http_listen.port) == ("127.0.0.1", 8200)
    assert config.root_token_sha256 == bytes.fromhex(VALID_HASH)
    assert [p.node_id for p in config.peers] == [1]
    assert config.limits == Limits()


@pytest.mark.parametrize(
    "key",
    [
        "node_id",
        "cluster_id",
        "data_dir",
        "http_listen",
        "root_key_file",
        "root_token_sha256",
        "root_accessor",
    ],
)
def test_each_missing_required_key_is_named(key: str) -> None:
    assert config_error(valid_data(**{key: None})) == f"{key}: missing (required)"


@pytest.mark.parametrize("key", ["id", "peer_addr", "http_addr"])
def test_a_peer_missing_a_key_is_named_with_its_position(key: str) -> None:
    broken = peer(1)
    del broken[key]
    assert config_error(valid_data(peers=[broken])) == f"peers[0].{key}: missing (required)"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("node_id", "1", "node_id: expected int, got str"),
        ("node_id", 1.0, "node_id: expected int, got float"),
        ("node_id", True, "node_id: expected int, got bool"),
        ("node_id", 0, "node_id: expected a positive integer"),
        ("cluster_id", 7, "cluster_id: expected str, got int"),
        ("cluster_id", "  ", "cluster_id: must not be empty"),
        ("data_dir", ["a"], "data_dir: expected str, got list"),
        ("data_dir", "", "data_dir: must not be empty"),
        ("root_accessor", False, "root_accessor: expected str, got bool"),
        ("log_level", 5, "log_level: expected str, got int"),
        ("peers", 5, "peers: expected an array of tables"),
        ("peers", ["x"], "peers[0]: expected a table"),
        ("limits", [1], "limits: expected a table"),
    ],
)
def test_a_value_of_the_wrong_type_names_the_key_and_what_was_expected(
    key: str, value: Any, expected: str
) -> None:
    assert config_error(valid_data(**{key: value})).startswith(expected)


@pytest.mark.parametrize("key", ["http_listen", "peer_listen"])
@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", ":8200", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536", "host:http", 8200],
)
def test_a_bad_listen_address_names_the_key_and_the_expected_form(key: str, address: Any) -> None:
    message = config_error(valid_data(**{key: address}))
    assert message.startswith(f"{key}: expected")
    assert "host:port" in message or "str" in message


def test_a_bad_peer_address_names_the_peer_position_and_field() -> None:
    message = config_error(valid_data(peers=[peer(1, http_addr="127.0.0.1:99999")]))
    assert message.startswith("peers[0].http_addr: expected 'host:port'")


@pytest.mark.parametrize(
    "token_hash",
    ["ab" * 31, "ab" * 33, "zz" * 32, "0x" + "ab" * 31, "ab " * 32, ""],
)
def test_a_root_token_hash_that_is_not_64_hex_digits_is_refused(token_hash: str) -> None:
    assert config_error(valid_data(root_token_sha256=token_hash)).startswith(
        "root_token_sha256: "
    )


def test_an_unknown_limits_key_is_named() -> None:
    message = config_error(valid_data(limits={"value_bytes_max": 10, "value_byte_max": 10}))
    assert message == "limits.value_byte_max: unknown key"


@pytest.mark.parametrize("value", [0, -1, "10", 1.5, True])
def test_a_limit_that_is_not_a_positive_integer_is_named(value: Any) -> None:
    message = config_error(valid_data(limits={"body_bytes_max": value}))
    assert message.startswith("limits.body_bytes_max: expected a positive integer")


def test_known_limits_override_their_defaults() -> None:
    config = parse_config(valid_data(limits={"value_bytes_max": 10}), BASE_DIR)
    assert config.limits.value_bytes_max == 10
    assert config.limits.body_bytes_max == Limits().body_bytes_max


def test_the_edge_bounds_have_safe_defaults_and_can_be_set() -> None:
    defaults = parse_config(valid_data(), BASE_DIR).limits
    assert (defaults.max_stale_ms, defaults.audit_rotate_bytes) == (5000, 64 * 1024 * 1024)
    assert defaults.idempotency_keys_per_accessor_max == 10_000
    limits = {
        "max_stale_ms": 250,
        "audit_rotate_bytes": 4096,
        "idempotency_keys_per_accessor_max": 5,
    }
    config = parse_config(valid_data(limits=limits), BASE_DIR)
    assert (config.limits.max_stale_ms, config.limits.audit_rotate_bytes) == (250, 4096)
    assert config.limits.idempotency_keys_per_accessor_max == 5


def test_a_per_accessor_idempotency_bound_above_the_global_one_is_refused() -> None:
    limits = {"idempotency_keys_max": 10, "idempotency_keys_per_accessor_max": 11}
    message = config_error(valid_data(limits=limits))
    assert message.startswith("limits.idempotency_keys_per_accessor_max: must not exceed")


def test_duplicate_peer_ids_are_refused() -> None:
    peers = [peer(1), peer(2), {**peer(3), "id": 2}]
    assert config_error(valid_data(peers=peers)) == "peers: two peers share an id"


def test_a_node_id_missing_from_the_peers_is_refused() -> None:
    peers = [peer(2), peer(3), peer(4)]
    message = config_error(valid_data(peers=peers))
    assert message == "peers: this node's id 1 is not among the peers"


def test_a_non_positive_peer_id_is_refused() -> None:
    peers = [peer(1), peer(2), {**peer(3), "id": -3}]
    assert config_error(valid_data(peers=peers)) == "peers: every id must be a positive integer"


@pytest.mark.parametrize("count", [2, 4])
def test_a_cluster_size_without_a_useful_majority_is_refused(count: int) -> None:
    peers = [peer(i) for i in range(1, count + 1)]
    assert config_error(valid_data(peers=peers)).startswith("peers: a cluster has 1, 3 or 5")


def test_load_config_names_an_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config file .*missing\.toml"):
        load_config(tmp_path / "missing.toml")


def test_load_config_names_a_file_that_is_not_toml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("node_id = = 1\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_config(bad)


def test_load_config_resolves_relative_paths_against_the_file_not_the_cwd(tmp_path: Path) -> None:
    good = tmp_path / "conf" / "node1.toml"
    good.parent.mkdir()
    good.write_text(
        "\n".join(
            [
                "node_id = 1",
                'cluster_id = "c"',
                'data_dir = "node1/data"',
                'http_listen = "127.0.0.1:8200"',
                'root_key_file = "/abs/root.key"',
                f'root_token_sha256 = "{VALID_HASH}"',
                'root_accessor = "acc_1"',
                "http_plaintext = true",
            ]
        )
    )
    config = load_config(good)
    assert config.data_dir == good.parent / "node1" / "data"
    assert config.root_key_file == Path("/abs/root.key")


@pytest.mark.processes  # runs vaultnode.main, which exits at its config check
def test_vaultnode_exits_2_naming_the_key_before_touching_anything(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        "\n".join(
            [
                "node_id = 1",
                'cluster_id = "c"',
                'data_dir = "data"',
                'http_listen = "127.0.0.1:8200"',
                'root_key_file = "root.key"',
                'root_token_sha256 = "not-hex"',
                'root_accessor = "acc_1"',
            ]
        )
    )
    finished = subprocess.run(
        [sys.executable, "-m", "vaultnode.main", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert finished.returncode == 2
    assert "configuration error: root_token_sha256: expected 64 hex digits" in finished.stderr
    assert "Traceback" not in finished.stderr
    assert not (tmp_path / "data").exists()


def test_an_unknown_top_level_key_is_refused_by_name(tmp_path: Path) -> None:
    data = valid_data()
    data["http_plaintxt"] = True
    with pytest.raises(ConfigError, match=r"^http_plaintxt: unknown key$"):
        parse_config(data, tmp_path)


# ---- root key sources (issue 17) ----------------------------------------------------------

SHAMIR_KEYS = {
    "root_key_file": None,
    "root_key_source": "shamir",
    "root_key_check_value": "00" * 16,
    "unseal_shares": 5,
    "unseal_threshold": 3,
}


def test_a_shamir_config_needs_no_key_file_and_carries_its_threshold() -> None:
    config = parse_config(valid_data(**SHAMIR_KEYS), BASE_DIR)
    assert config.root_key_source == "shamir" and config.root_key_file is None
    assert (config.unseal_threshold, config.unseal_shares) == (3, 5)
    assert config.root_key_check_value == bytes(16)
    assert config.unseal_progress_timeout_s == 600


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"root_key_source": "tpm"}, "root_key_source"),
        ({**SHAMIR_KEYS, "unseal_threshold": 6}, "unseal_threshold"),
        ({**SHAMIR_KEYS, "unseal_threshold": 1}, "unseal_threshold"),
        ({**SHAMIR_KEYS, "root_key_check_value": "zz" * 16}, "root_key_check_value"),
        ({**SHAMIR_KEYS, "root_key_check_value": None}, "root_key_check_value"),
        ({**SHAMIR_KEYS, "root_key_file": "node1/root.key"}, "root_key_file"),
        ({"root_key_file": None}, "root_key_file"),
        (
            {"root_key_file": None, "root_key_source": "systemd-credential",
             "root_key_credential": "../etc/key"},
            "root_key_credential",
        ),
    ],
)
def test_a_wrong_root_key_source_setting_is_named(overrides: dict[str, Any], named: str) -> None:
    assert config_error(valid_data(**overrides)).startswith(named)


def test_a_credential_config_names_its_credential() -> None:
    config = parse_config(
        valid_data(root_key_file=None, root_key_source="systemd-credential"), BASE_DIR
    )
    assert (config.root_key_source, config.root_key_credential) == (
        "systemd-credential", "vault-root-key"
    )


def test_peers_carry_incarnations_and_voter_flags() -> None:
    peers = [{**peer(n), "incarnation": 100 + n, "voter": n != 3} for n in (1, 2, 3)]
    config = parse_config(valid_data(peers=peers, **_peer_tls()), BASE_DIR)
    assert [(p.incarnation, p.voter) for p in config.peers] == [(101, True), (102, True),
                                                                  (103, False)]
    unbound = parse_config(valid_data(), BASE_DIR)
    assert [(p.incarnation, p.voter) for p in unbound.peers] == [(0, True)]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"incarnation": 0}, "peers[0].incarnation: expected an integer in 1..2**62-1"),
        ({"incarnation": 1 << 62}, "peers[0].incarnation: expected an integer in 1..2**62-1"),
        ({"incarnation": "12"}, "peers[0].incarnation: expected an integer in 1..2**62-1"),
        ({"voter": "yes"}, "peers[0].voter: expected true or false"),
        ({"voter": False}, "peers: at least one peer must be a voter"),
        ({"colour": 1}, "peers[0].colour: unknown key"),
    ],
)
def test_bad_incarnations_and_voter_flags_are_refused(
    change: dict[str, Any], expected: str
) -> None:
    assert config_error(valid_data(peers=[{**peer(1), **change}])).startswith(expected)


def test_incarnations_are_given_for_every_peer_or_none() -> None:
    peers = [{**peer(1), "incarnation": 5}, peer(2), peer(3)]
    message = config_error(valid_data(peers=peers, **_peer_tls()))
    assert message.startswith("peers: an incarnation is given for some peers and not others")


def test_a_joining_node_takes_the_configuration_it_was_given_of_any_size() -> None:
    peers = [{**peer(n), "incarnation": n} for n in (1, 2)]
    joining = {**peer(4), "incarnation": 4, "voter": False, "auto_promote": True}
    data = valid_data(
        node_id=4, peers=[*peers, joining], join=True, join_config_slot=70, **_peer_tls()
    )
    config = parse_config(data, BASE_DIR)
    assert (config.join, config.join_config_slot, config.clustered) == (True, 70, True)
    assert [(p.voter, p.auto_promote) for p in config.peers] == [
        (True, False), (True, False), (False, True)
    ]
    assert config_error(valid_data(join="yes")).startswith("join: expected true or false")
    assert config_error(valid_data(join_config_slot=3)).startswith(
        "join_config_slot: only with join = true"
    )
    assert config_error(valid_data(node_id=4, peers=peers)).startswith(
        "peers: this node's id 4 is not among the peers"
    )
    without_itself = valid_data(node_id=4, join=True, peers=peers, **_peer_tls())
    assert config_error(without_itself).startswith(
        "peers: a joining node (join = true) needs the configuration"
    )


def test_promote_lag_is_a_limit_with_a_default() -> None:
    assert parse_config(valid_data(), BASE_DIR).limits.promote_lag_slots_max == 1000
    limits = {"promote_lag_slots_max": 50}
    assert parse_config(valid_data(limits=limits), BASE_DIR).limits.promote_lag_slots_max == 50


def _peer_tls() -> dict[str, str]:
    return {"tls_ca_file": "ca.pem", "tls_cert_file": "node.pem", "tls_key_file": "node.key"}
