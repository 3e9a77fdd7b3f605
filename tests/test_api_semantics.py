"""The semantic rules of docs/semantics.md, each shown against a real vaultnode process: names,
values, create-once (also under a 50-way race), update and expected_version (also under a race),
validity intervals, reads by version and by instant, history and list.

The module runs twice: against one node, and through a follower of a three-node cluster (the
`shared_vault` fixture in tests/conftest.py); the refusals of malformed input run against a node
served in-process instead of a one-node process. Each run shares its vault among the tests, so
each writes only names no other test uses.
"""

from __future__ import annotations

import itertools
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from simulations.harness import Cluster
from tests.test_http_wire import assert_error, raw_exchange, raw_request

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
VALUE_BYTES_MAX = 64 * 1024  # the default limit in vaultnode/config.py
RACERS = 50

# Each rule runs against one node and through a follower; the refusals of malformed input run
# against an in-process node instead of a one-node process (the same HTTP server, API and state
# machine; no process starts, so they are in `make test-fast`) and through a follower.
THROUGH_ONE_NODE_AND_A_FOLLOWER = pytest.mark.parametrize(
    "shared_vault", ["one_node", "follower"], indirect=True, scope="module"
)
REFUSED_IN_PROCESS_AND_THROUGH_A_FOLLOWER = pytest.mark.parametrize(
    "shared_vault", ["in_process", "follower"], indirect=True, scope="module"
)


def to_us(stamp: str) -> int:
    moment = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return int(moment.timestamp()) * 1_000_000 + moment.microsecond


def from_us(time_us: int) -> str:
    seconds, micros = divmod(time_us, 1_000_000)
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{micros:06d}Z"


def history(client: httpx.Client, name: str) -> list[dict[str, Any]]:
    response = client.get(f"/v1/history/{name}")
    assert response.status_code == 200, response.text
    versions: list[dict[str, Any]] = response.json()["versions"]
    return versions


# ---- names -------------------------------------------------------------------------------

VALID_NAMES = [
    "a",
    "app/db/password",
    "A-Z_a-z.0-9",
    "...",  # three dots is an ordinary segment; only '.' and '..' are reserved
    ".hidden/x..y",
    "n" * 256,
    "/".join(["s"] * 128)[:255] + "z",
]
INVALID_NAMES = [
    ("", "empty"),
    ("n" * 257, "257 characters"),
    ("a//b", "empty segment"),
    ("/a", "leading slash"),
    ("a/", "trailing slash"),
    (".", "dot segment"),
    ("..", "dot-dot segment"),
    ("a/./b", "inner dot segment"),
    ("a/../b", "inner dot-dot segment"),
    ("a%2Fb", "percent-encoded slash"),
    ("%61", "percent-encoded letter"),
    ("a%20b", "percent-encoded space"),
    ("a:b", "colon"),
    ("a*b", "star"),
    ("a+b", "plus"),
    ("caf%C3%A9", "percent-encoded non-ASCII"),
    ("a;b", "semicolon"),
]


@THROUGH_ONE_NODE_AND_A_FOLLOWER
@pytest.mark.parametrize("name", VALID_NAMES, ids=range(len(VALID_NAMES)))
def test_valid_names_are_accepted(shared_vault: Cluster, name: str) -> None:
    with shared_vault.client() as client:
        created = client.post(f"/v1/secrets/{name}", json={"value": "v"})
        assert created.status_code == 201, created.text
        assert created.json()["name"] == name
        assert client.get(f"/v1/secrets/{name}").json()["value"] == "v"


@THROUGH_ONE_NODE_AND_A_FOLLOWER
def test_names_of_1_and_256_characters_are_the_bounds(shared_vault: Cluster) -> None:
    with shared_vault.client() as client:
        assert client.post("/v1/secrets/b", json={"value": "v"}).status_code == 201
        assert client.post("/v1/secrets/" + "b" * 256, json={"value": "v"}).status_code == 201
        assert_error(
            client.post("/v1/secrets/" + "b" * 257, json={"value": "v"}), 400, "invalid_name"
        )


@REFUSED_IN_PROCESS_AND_THROUGH_A_FOLLOWER
@pytest.mark.parametrize(("name", "why"), INVALID_NAMES, ids=[w for _, w in INVALID_NAMES])
def test_invalid_names_are_400_invalid_name_on_every_route(
    shared_vault: Cluster, name: str, why: str
) -> None:
    # Raw requests: httpx would resolve '.'/'..' segments before sending.
    token = shared_vault.root_token
    addr = shared_vault.nodes[0].http_addr
    for method, path, body in (
        ("POST", f"/v1/secrets/{name}", b'{"value":"v"}'),
        ("PUT", f"/v1/secrets/{name}", b'{"value":"v"}'),
        ("GET", f"/v1/secrets/{name}", b""),
        ("GET", f"/v1/history/{name}", b""),
    ):
        (response,), _ = raw_exchange(addr, raw_request(method, path, token, body))
        assert_error(response, 400, "invalid_name")


@REFUSED_IN_PROCESS_AND_THROUGH_A_FOLLOWER
def test_a_refused_name_creates_nothing(shared_vault: Cluster) -> None:
    token = shared_vault.root_token
    addr = shared_vault.nodes[0].http_addr
    raw_exchange(addr, raw_request("POST", "/v1/secrets/refused/./x", token, b'{"value":"v"}'))
    with shared_vault.client() as client:
        assert client.get("/v1/secrets", params={"prefix": "refused"}).json() == {"secrets": []}


# ---- values and bodies ---------------------------------------------------------------------


@REFUSED_IN_PROCESS_AND_THROUGH_A_FOLLOWER
@pytest.mark.parametrize(
    "body",
    [{"value": 1}, {"value": None}, {"value": ["a"]}, {"value": {"a": "b"}}, {"value": True}],
    ids=["int", "null", "list", "object", "bool"],
)
def test_a_non_string_value_is_400_bad_request(shared_vault: Cluster, body: Any) -> None:
    with shared_vault.client() as client:
        assert_error(client.post("/v1/secrets/values/nonstring", json=body), 400, "bad_request")
        assert_error(client.get("/v1/secrets/values/nonstring"), 404, "not_found")


@REFUSED_IN_PROCESS_AND_THROUGH_A_FOLLOWER
def test_a_missing_value_is_400_bad_request(shared_vault: Cluster) -> None:
    with shared_vault.client() as client:
        assert_error(client.post("/v1/secrets/values/missing", json={}), 400, "bad_request")
        assert_error(client.post("/v1/secrets/values/missing", content=b""), 400, "bad_request")
        client.post("/v1/secrets/values/present", json={"value": "v"})
        put = client.put("/v1/secrets/values/present", json={"expected_version": 1})
        assert_error(put, 400, "bad_request")


@REFUSED_IN_PROCESS_AND_THROUGH_A_FOLLOWER
def test_values_up_to_64_kib_of_utf8_are_stored_and_larger_ones_are_413(
    shared_vault: Cluster,
) -> None:
    exact_ascii = "x" * VALUE_BYTES_MAX
    exact_multibyte = "é" * (VALUE_BYTES_MAX // 2)  # two UTF-8 bytes each: the limit is in bytes
    with shared_vault.client() as client:
        for name, value in (("ascii", exact_ascii), ("multibyte", exact_multibyte), ("empty", "")):
            assert client.post(f"/v1/secrets/size/{name}", json={"value": value}).status_code == 201
            assert client.get(f"/v1/secrets/size/{name}").json()["value"] == value
        for name, value in (("over", exact_ascii + "x"), ("over-mb", exact_multibyte + "é")):
            response = client.post(f"/v1/secrets/size/{name}", json={"value": value})
            assert_error(response, 413, "payload_too_large")
            assert_error(client.get(f"/v1/secrets/size/{name}"), 404, "not_found")
        update = client.put("/v1/secrets/size/ascii", json={"value": exact_ascii + "x"})
        assert_error(update, 413, "payload_too_large")
        assert history(client, "size/ascii")[-1]["version"] == 1


@REFUSED_IN_PROCESS_AND_THROUGH_A_FOLLOWER
def test_an_invalid_utf8_value_is_400_bad_request(shared_vault: Cluster) -> None:
    with shared_vault.client() as client:
        lone_surrogate = b'{"value":"\\ud800"}'
        assert_error(client.post("/v1/secrets/utf8", content=lone_surrogate), 400, "bad_request")
        not_utf8 = b'{"value":"\xff"}'
        assert_error(client.post("/v1/secrets/utf8", content=not_utf8), 400, "bad_request")


@REFUSED_IN_PROCESS_AND_THROUGH_A_FOLLOWER
@pytest.mark.parametrize(
    "raw_body",
    [
        b"{not json",
        b'["value", "v"]',
        b'"just a string"',
        b"42",
        b'{"value": "v", "extra": 1}',
        b'{"value": "v", "expected_version": 1}',  # a create takes no expected_version
        b"[" * 200_000 + b"]" * 200_000,  # deep nesting: bad input, not a server fault
    ],
    ids=["malformed", "array", "string", "number", "unknown-field", "update-field", "deep"],
)
def test_a_body_that_is_not_the_documented_object_is_400_bad_request(
    shared_vault: Cluster, raw_body: bytes
) -> None:
    with shared_vault.client() as client:
        response = client.post("/v1/secrets/bodies/x", content=raw_body)
        assert_error(response, 400, "bad_request")
        assert_error(client.get("/v1/secrets/bodies/x"), 404, "not_found")


# ---- create exactly once -------------------------------------------------------------------


@THROUGH_ONE_NODE_AND_A_FOLLOWER
def test_a_second_create_is_409_already_exists_and_changes_nothing(shared_vault: Cluster) -> None:
    with shared_vault.client() as client:
        first = client.post("/v1/secrets/app/once", json={"value": "original"})
        assert first.status_code == 201
        assert first.json()["version"] == 1
        assert set(first.json()) == {"name", "version", "valid_from", "index"}
        before = history(client, "app/once")
        second = client.post("/v1/secrets/app/once", json={"value": "intruder"})
        assert_error(second, 409, "already_exists")
        assert client.get("/v1/secrets/app/once").json()["value"] == "original"
        assert history(client, "app/once") == before


@THROUGH_ONE_NODE_AND_A_FOLLOWER
def test_50_concurrent_creates_of_one_name_give_one_201_and_49_409(shared_vault: Cluster) -> None:
    barrier = threading.Barrier(RACERS)

    def race(racer: int) -> tuple[int, str, httpx.Response]:
        value = f"racer-{racer}"
        # Each racer has its own connection, opened before the start line.
        with shared_vault.client() as client:
            assert client.get("/health").status_code == 200
            barrier.wait(timeout=30)
            return racer, value, client.post("/v1/secrets/race/one", json={"value": value})

    with ThreadPoolExecutor(RACERS) as pool:
        results = list(pool.map(race, range(RACERS)))
    winners = [(value, r) for _, value, r in results if r.status_code == 201]
    losers = [r for _, _, r in results if r.status_code != 201]
    assert len(winners) == 1, [r.status_code for _, _, r in results]
    assert len(losers) == RACERS - 1
    for response in losers:
        assert_error(response, 409, "already_exists")
    winning_value, _ = winners[0]
    with shared_vault.client() as client:
        stored = client.get("/v1/secrets/race/one").json()
        assert stored["value"] == winning_value and stored["version"] == 1
        assert len(history(client, "race/one")) == 1


# ---- update and expected_version -----------------------------------------------------------


@THROUGH_ONE_NODE_AND_A_FOLLOWER
def test_update_appends_version_n_plus_1(shared_vault: Cluster) -> None:
    with shared_vault.client() as client:
        client.post("/v1/secrets/app/upd", json={"value": "v1"})
        for n in (2, 3, 4):
            response = client.put("/v1/secrets/app/upd", json={"value": f"v{n}"})
            assert response.status_code == 200
            assert response.json()["version"] == n
            assert set(response.json()) == {"name", "version", "valid_from", "index"}
        assert client.get("/v1/secrets/app/upd").json()["value"] == "v4"
        assert [v["version"] for v in history(client, "app/upd")] == [1, 2, 3, 4]


@THROUGH_ONE_NODE_AND_A_FOLLOWER
def test_update_of_an_unknown_name_is_404_and_creates_nothing(shared_vault: Cluster) -> None:
    with shared_vault.client() as client:
        assert_error(client.put("/v1/secrets/app/ghost", json={"value": "v"}), 404, "not_found")
        assert_error(client.get("/v1/secrets/app/ghost"), 404, "not_found")


@THROUGH_ONE_NODE_AND_A_FOLLOWER
def test_expected_version_mismatch_is_409_version_conflict_and_writes_nothing(
    shared_vault: Cluster,
) -> None:
    with shared_vault.client() as client:
        client.post("/v1/secrets/app/cas", json={"value": "v1"})
        client.put("/v1/secrets/app/cas", json={"value": "v2"})
        before = history(client, "app/cas")
        for stale in (1, 3, 99):
            response = client.put(
                "/v1/secrets/app/cas", json={"value": "lost", "expected_version": stale}
            )
            assert_error(response, 409, "version_conflict")
            assert response.json()["error"]["current_version"] == 2
        assert history(client, "app/cas") == before
        assert client.get("/v1/secrets/app/cas").json()["value"] == "v2"
        matching = client.put("/v1/secrets/app/cas", json={"value": "v3", "expected_version": 2})
        assert matching.status_code == 200 and matching.json()["version"] == 3


@REFUSED_IN_PROCESS_AND_THROUGH_A_FOLLOWER
@pytest.mark.parametrize("expected", [0, -1, "1", 1.5, True, [1], 2**63, 10**30])
def test_a_malformed_expected_version_is_400_bad_request(
    shared_vault: Cluster, expected: Any
) -> None:
    with shared_vault.client() as client:
        client.post("/v1/secrets/cas/malformed", json={"value": "v1"})
        response = client.put(
            "/v1/secrets/cas/malformed", json={"value": "v", "expected_version": expected}
        )
        assert_error(response, 400, "bad_request")
        assert history(client, "cas/malformed")[-1]["version"] == 1


@THROUGH_ONE_NODE_AND_A_FOLLOWER
def test_concurrent_updates_with_the_same_expected_version_let_exactly_one_win(
    shared_vault: Cluster,
) -> None:
    racers = 20
    with shared_vault.client() as client:
        client.post("/v1/secrets/race/cas", json={"value": "v1"})
    barrier = threading.Barrier(racers)

    def race(racer: int) -> tuple[str, httpx.Response]:
        value = f"racer-{racer}"
        with shared_vault.client() as client:
            assert client.get("/health").status_code == 200
            barrier.wait(timeout=30)
            body = {"value": value, "expected_version": 1}
            return value, client.put("/v1/secrets/race/cas", json=body)

    with ThreadPoolExecutor(racers) as pool:
        results = list(pool.map(race, range(racers)))
    winners = [value for value, r in results if r.status_code == 200]
    assert len(winners) == 1, [r.status_code for _, r in results]
    for _, response in results:
        if response.status_code != 200:
            assert_error(response, 409, "version_conflict")
    with shared_vault.client() as client:
        current = client.get("/v1/secrets/race/cas").json()
        assert current["version"] == 2 and current["value"] == winners[0]


# ---- validity intervals and reads ----------------------------------------------------------


def _four_versions(client: httpx.Client, name: str) -> list[dict[str, Any]]:
    client.post(f"/v1/secrets/{name}", json={"value": "value-1"})
    for n in (2, 3, 4):
        client.put(f"/v1/secrets/{name}", json={"value": f"value-{n}"})
    return history(client, name)


@THROUGH_ONE_NODE_AND_A_FOLLOWER
def test_validity_intervals_are_contiguous_strictly_increasing_and_open_at_the_end(
    shared_vault: Cluster,
) -> None:
    with shared_vault.client() as client:
        versions = _four_versions(client, "app/intervals")
    starts = [to_us(v["valid_from"]) for v in versions]
    assert starts == sorted(set(starts)), "valid_from must be strictly increasing"
    for earlier, later in itertools.pairwise(versions):
        assert earlier["valid_to"] == later["valid_from"]
    assert versions[-1]["valid_to"] is None
    for version in versions:
        assert TIMESTAMP.match(version["valid_from"]), version
        assert version["valid_to"] is None or TIMESTAMP.match(version["valid_to"]), version
    indexes = [v["index"] for v in versions]
    assert indexes == sorted(set(indexes)), "each version sits at its own, later log position"


@THROUGH_ONE_NODE_AND_A_FOLLOWER
def test_reads_by_version_return_that_version_with_its_interval(shared_vault: Cluster) -> None:
    with shared_vault.client() as client:
        versions = _four_versions(client, "app/byversion")
        for version in versions:
            n = version["version"]
            body = client.get("/v1/secrets/app/byversion", params={"version": n}).json()
            assert body == {
                "name": "app/byversion",
                "version": n,
                "value": f"value-{n}",
                "valid_from": version["valid_from"],
                "valid_to": version["valid_to"],
                "index": version["index"],
            }
        current = client.get("/v1/secrets/app/byversion").json()
        assert current["version"] == 4 and current["valid_to"] is None
        missing = client.get("/v1/secrets/app/byversion", params={"version": 5})
        assert_error(missing, 404, "not_found")


@THROUGH_ONE_NODE_AND_A_FOLLOWER
def test_reads_at_an_instant_return_the_version_whose_interval_contains_it(
    shared_vault: Cluster,
) -> None:
    with shared_vault.client() as client:
        versions = _four_versions(client, "app/at")

        def version_at(instant: str) -> httpx.Response:
            return client.get("/v1/secrets/app/at", params={"at": instant})

        for version in versions:
            start = to_us(version["valid_from"])
            end = to_us(version["valid_to"]) if version["valid_to"] else start + 10_000_000
            inside = version_at(from_us((start + end) // 2)).json()
            assert inside["version"] == version["version"]
            # Intervals are [valid_from, valid_to): a boundary instant belongs to the newer one.
            assert version_at(version["valid_from"]).json()["version"] == version["version"]
            last_microsecond = version_at(from_us(end - 1)).json()
            assert last_microsecond["version"] == version["version"]
        first_start = to_us(versions[0]["valid_from"])
        assert_error(version_at(from_us(first_start - 1)), 404, "not_found")
        assert_error(version_at("2000-01-01T00:00:00Z"), 404, "not_found")
        assert version_at("9999-12-31T23:59:59Z").json()["version"] == 4


@THROUGH_ONE_NODE_AND_A_FOLLOWER
def test_at_accepts_any_rfc3339_spelling_of_the_same_instant(shared_vault: Cluster) -> None:
    with shared_vault.client() as client:
        versions = _four_versions(client, "app/offset")
        instant = to_us(versions[1]["valid_from"])
        seconds, micros = divmod(instant, 1_000_000)
        shifted = datetime.fromtimestamp(seconds, tz=UTC).astimezone(
            datetime.strptime("+0200", "%z").tzinfo
        )
        as_offset = shifted.strftime("%Y-%m-%dT%H:%M:%S") + f".{micros:06d}+02:00"
        lower_case = versions[1]["valid_from"].replace("T", "t").replace("Z", "z")
        for spelling in (as_offset, lower_case):
            body = client.get("/v1/secrets/app/offset", params={"at": spelling}).json()
            assert body["version"] == 2, spelling


@REFUSED_IN_PROCESS_AND_THROUGH_A_FOLLOWER
def test_version_and_at_together_are_400(shared_vault: Cluster) -> None:
    with shared_vault.client() as client:
        client.post("/v1/secrets/app/both", json={"value": "v"})
        response = client.get(
            "/v1/secrets/app/both", params={"version": 1, "at": "2030-01-01T00:00:00Z"}
        )
        assert_error(response, 400, "bad_request")


@REFUSED_IN_PROCESS_AND_THROUGH_A_FOLLOWER
@pytest.mark.parametrize(
    "query",
    [
        "version=0",
        "version=-1",
        "version=x",
        "version=1.5",
        "version=",
        "version=" + quote("²"),  # a Unicode digit str.isdigit() accepts and int() refuses
        "version=" + "9" * 5000,  # past int()'s digit limit
        "version=1&version=2",
        "at=yesterday",
        "at=",
        "at=2026-13-01T00:00:00Z",
        "at=2026-11-27T21:26:41",  # no zone
        "at=2026-11-27 21:26:41Z",
        "at=" + quote("٢٠٢٦-11-27T21:26:41Z"),
        "at=" + quote("2026-11-27T21:26:41.١Z"),  # int() would read that digit as a fraction
    ],
)
def test_a_malformed_version_or_at_is_400_bad_request(shared_vault: Cluster, query: str) -> None:
    with shared_vault.client() as client:
        client.post("/v1/secrets/reads/malformed", json={"value": "v"})
        assert_error(client.get(f"/v1/secrets/reads/malformed?{query}"), 400, "bad_request")


@THROUGH_ONE_NODE_AND_A_FOLLOWER
def test_reading_an_unknown_name_is_404(shared_vault: Cluster) -> None:
    with shared_vault.client() as client:
        assert_error(client.get("/v1/secrets/app/unknown"), 404, "not_found")
        assert_error(client.get("/v1/secrets/app/unknown", params={"version": 1}), 404, "not_found")
        assert_error(client.get("/v1/history/app/unknown"), 404, "not_found")


# ---- history and list ----------------------------------------------------------------------


@THROUGH_ONE_NODE_AND_A_FOLLOWER
def test_history_is_ascending_with_index_and_created_by(shared_vault: Cluster) -> None:
    with shared_vault.client() as client:
        versions = _four_versions(client, "app/hist")
        root_accessor = client.get("/v1/tokens/self").json()["accessor"]
        writer = client.post(
            "/v1/tokens",
            json={
                "display_name": "ci-writer",
                "policies": [{"prefix": "app/", "capabilities": ["update"]}],
            },
        ).json()
    with shared_vault.client(token=writer["token"]) as writer_client:
        assert writer_client.put("/v1/secrets/app/hist", json={"value": "v5"}).status_code == 200
    with shared_vault.client() as client:
        response = client.get("/v1/history/app/hist").json()
    assert response["name"] == "app/hist"
    versions = response["versions"]
    assert [v["version"] for v in versions] == [1, 2, 3, 4, 5]
    for version in versions:
        assert set(version) == {"version", "valid_from", "valid_to", "index", "created_by"}
        assert "value" not in version
    assert all(
        v["created_by"] == {"accessor": root_accessor, "display_name": "root"} for v in versions[:4]
    )
    assert versions[4]["created_by"] == {
        "accessor": writer["accessor"],
        "display_name": "ci-writer",
    }


@THROUGH_ONE_NODE_AND_A_FOLLOWER
def test_list_returns_names_and_versions_under_a_prefix_and_never_values(
    shared_vault: Cluster,
) -> None:
    with shared_vault.client() as client:
        client.post("/v1/secrets/team-a/db", json={"value": "secret-db"})
        client.put("/v1/secrets/team-a/db", json={"value": "secret-db-2"})
        client.post("/v1/secrets/team-a/api", json={"value": "secret-api"})
        client.post("/v1/secrets/team-b/db", json={"value": "secret-b"})
        listed = client.get("/v1/secrets", params={"prefix": "team-a/"})
        assert listed.status_code == 200
        assert "secret-" not in listed.text
        secrets = listed.json()["secrets"]
        assert [(s["name"], s["current_version"]) for s in secrets] == [
            ("team-a/api", 1),
            ("team-a/db", 2),
        ]
        for entry in secrets:
            assert set(entry) == {"name", "current_version", "updated_at"}
            assert entry["updated_at"] == history(client, entry["name"])[-1]["valid_from"]
        everything = client.get("/v1/secrets", params={"prefix": "team-"}).json()["secrets"]
        assert [s["name"] for s in everything] == ["team-a/api", "team-a/db", "team-b/db"]
        partial = client.get("/v1/secrets", params={"prefix": "team"}).json()["secrets"]
        assert len(partial) == 3  # a prefix may end mid-segment
        assert client.get("/v1/secrets", params={"prefix": "nobody/"}).json() == {"secrets": []}
        assert_error(client.get("/v1/secrets", params={"prefix": "a b"}), 400, "invalid_name")


@THROUGH_ONE_NODE_AND_A_FOLLOWER
def test_written_and_read_timestamps_have_microseconds_and_z(shared_vault: Cluster) -> None:
    with shared_vault.client() as client:
        created = client.post("/v1/secrets/app/ts", json={"value": "v"}).json()
        updated = client.put("/v1/secrets/app/ts", json={"value": "v"}).json()
        read = client.get("/v1/secrets/app/ts", params={"version": 1}).json()
        listed = client.get("/v1/secrets", params={"prefix": "app/ts"}).json()["secrets"][0]
    for stamp in (
        created["valid_from"],
        updated["valid_from"],
        read["valid_to"],
        listed["updated_at"],
    ):
        assert TIMESTAMP.match(stamp), stamp
    assert read["valid_to"] == updated["valid_from"]
