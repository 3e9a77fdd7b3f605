"""Idempotency-Key end to end, against real vaultnode processes over HTTP.

Owns the HTTP half of docs/idempotency.md: a lost reply followed by a retry (create, update, batch
create, token creation), byte-identical replays with `Idempotent-Replayed: true`, 422 on key reuse,
scope by token, key validation, replayed errors, restarts (SIGTERM and SIGKILL) between attempt
and retry, racing identical requests, and rewrap with a key. Never sleeps on a race: every wait is
on a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import struct
from typing import Any

import httpx
import pytest

from simulations.harness import Cluster, started_cluster, wait_until

DEADLINE_S = 10.0


def raw_request(
    cluster: Cluster, method: str, path: str, headers: dict[str, bytes], body: bytes = b""
) -> bytes:
    """The bytes of one HTTP/1.1 request with exactly these header values (no client checks)."""
    lines = [f"{method} {path} HTTP/1.1".encode(), f"Host: {cluster.nodes[0].http_addr}".encode()]
    lines.append(f"Authorization: Bearer {cluster.root_token}".encode())
    lines += [name.encode() + b": " + value for name, value in headers.items()]
    lines += [b"Content-Type: application/json", f"Content-Length: {len(body)}".encode()]
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def keyed_write(
    cluster: Cluster, method: str, name: str, key: bytes, payload: dict[str, Any]
) -> bytes:
    """The raw bytes of a keyed create (POST) or update (PUT) of secret `name`."""
    return raw_request(
        cluster, method, f"/v1/secrets/{name}", {"Idempotency-Key": key}, body_bytes(payload)
    )


def connect(cluster: Cluster) -> socket.socket:
    host, _, port = cluster.nodes[0].http_addr.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=DEADLINE_S)


def raw_status(cluster: Cluster, request: bytes) -> tuple[int, dict[str, Any]]:
    with connect(cluster) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def send_and_lose_the_reply(cluster: Cluster, request: bytes, applied: Any) -> None:
    """Send a request, wait until it took effect, then reset the connection unread."""
    sock = connect(cluster)
    try:
        sock.sendall(request)
        wait_until(applied, DEADLINE_S, "the first attempt to take effect")
    finally:
        # Linger 0: close with a reset, the way a dropped network path ends, never reading a byte.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


def one_policy(prefix: str) -> dict[str, Any]:
    """A token-creation body: create and read under `prefix`."""
    return {"policies": [{"prefix": prefix, "capabilities": ["create", "read"]}]}


def body_bytes(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()


def versions(client: httpx.Client, name: str) -> list[dict[str, Any]]:
    response = client.get(f"/v1/history/{name}")
    return response.json()["versions"] if response.status_code == 200 else []


def send(
    client: httpx.Client, method: str, path: str, key: str | None, payload: dict[str, Any]
) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return client.request(method, path, content=body_bytes(payload), headers=headers)


def assert_replay_of(replay: httpx.Response, first_status: int, first_body: bytes) -> None:
    assert replay.headers.get("Idempotent-Replayed") == "true"
    assert (replay.status_code, replay.content) == (first_status, first_body)


# ---- a lost reply, then a retry ----------------------------------------------------------------
def test_a_create_whose_reply_was_lost_replays_the_original_201(shared_vault: Cluster) -> None:
    name, payload = "lost/create", {"value": "s3cret"}
    request = keyed_write(shared_vault, "POST", name, b"create-1", payload)
    with shared_vault.client() as client:
        send_and_lose_the_reply(shared_vault, request, lambda: versions(client, name))
        retry = send(client, "POST", f"/v1/secrets/{name}", "create-1", payload)
        again = send(client, "POST", f"/v1/secrets/{name}", "create-1", payload)
        history = versions(client, name)
    assert retry.status_code == 201 and retry.headers.get("Idempotent-Replayed") == "true"
    assert again.content == retry.content  # every replay is the same bytes
    assert len(history) == 1
    # The replay is the original answer: it names the version and log index the first attempt got.
    assert retry.json() == {
        "name": name,
        "version": 1,
        "valid_from": history[0]["valid_from"],
        "index": history[0]["index"],
    }


def test_an_update_whose_reply_was_lost_adds_one_version_not_two(shared_vault: Cluster) -> None:
    name, payload = "lost/update", {"value": "v2", "expected_version": 1}
    with shared_vault.client() as client:
        assert client.post(f"/v1/secrets/{name}", json={"value": "v1"}).status_code == 201
        request = keyed_write(shared_vault, "PUT", name, b"update-1", payload)
        send_and_lose_the_reply(shared_vault, request, lambda: len(versions(client, name)) == 2)
        retry = send(client, "PUT", f"/v1/secrets/{name}", "update-1", payload)
        history = versions(client, name)
        value = client.get(f"/v1/secrets/{name}").json()["value"]
    assert retry.status_code == 200 and retry.headers.get("Idempotent-Replayed") == "true"
    assert retry.json()["version"] == 2 and retry.json()["index"] == history[1]["index"]
    assert [v["version"] for v in history] == [1, 2] and value == "v2"


def test_a_client_that_hangs_up_at_once_and_retries_ends_with_one_version(
    shared_vault: Cluster,
) -> None:
    # Whether the node served the abandoned attempt or not, the retry's answer is a 201 for
    # version 1 (fresh or replayed) and there is exactly one version.
    name, payload = "lost/hangup", {"value": "s3cret"}
    request = keyed_write(shared_vault, "POST", name, b"hangup-1", payload)
    with connect(shared_vault) as sock:
        sock.sendall(request)
    with shared_vault.client() as client:
        retry = send(client, "POST", f"/v1/secrets/{name}", "hangup-1", payload)
        assert (retry.status_code, retry.json()["version"]) == (201, 1)
        assert len(versions(client, name)) == 1


def test_a_replay_is_byte_identical_to_the_first_answer(shared_vault: Cluster) -> None:
    with shared_vault.client() as client:
        first = send(client, "POST", "/v1/secrets/bytes/a", "bytes-1", {"value": "x"})
        replay = send(client, "POST", "/v1/secrets/bytes/a", "bytes-1", {"value": "x"})
        assert "Idempotent-Replayed" not in first.headers
        assert_replay_of(replay, 201, first.content)
        assert len(versions(client, "bytes/a")) == 1


def test_the_canonical_body_ignores_key_order_and_spacing(shared_vault: Cluster) -> None:
    path = "/v1/secrets/canonical/a"
    with shared_vault.client() as client:
        assert client.post(path, json={"value": "v1"}).status_code == 201
        first = client.put(
            path,
            content=b'{"value": "v2", "expected_version": 1}',
            headers={"Idempotency-Key": "c"},
        )
        replay = client.put(
            path, content=b'{"expected_version":1,"value":"v2"}', headers={"Idempotency-Key": "c"}
        )
        assert_replay_of(replay, 200, first.content)


# ---- 422, scope, validation, replayed errors ----------------------------------------------------
def test_the_same_key_with_another_body_is_422_and_writes_nothing(shared_vault: Cluster) -> None:
    name = "reuse/a"
    with shared_vault.client() as client:
        first = send(client, "POST", f"/v1/secrets/{name}", "reuse-1", {"value": "one"})
        assert first.status_code == 201
        other_body = send(client, "PUT", f"/v1/secrets/{name}", "reuse-1", {"value": "two"})
        other_path = send(client, "POST", "/v1/secrets/reuse/b", "reuse-1", {"value": "one"})
        for refused in (other_body, other_path):
            assert refused.status_code == 422
            assert refused.json()["error"]["code"] == "idempotency_key_reused"
            assert "Idempotent-Replayed" not in refused.headers
        assert len(versions(client, name)) == 1
        assert client.get(f"/v1/secrets/{name}").json()["value"] == "one"
        assert client.get("/v1/secrets/reuse/b").status_code == 404
        # The key still stands for its first request.
        assert_replay_of(
            send(client, "POST", f"/v1/secrets/{name}", "reuse-1", {"value": "one"}),
            201,
            first.content,
        )


def test_the_same_key_from_another_token_is_independent(shared_vault: Cluster) -> None:
    with shared_vault.client() as root:
        created = root.post(
            "/v1/tokens",
            json=one_policy("scope/"),
        )
        assert created.status_code == 201
        for key, name in (("shared", "scope/root"), ("shared-x", "scope/x")):
            assert send(root, "POST", f"/v1/secrets/{name}", key, {"value": "r"}).status_code == 201
    with shared_vault.client(token=created.json()["token"]) as other:
        # Root's exact request under root's key is not a replay for this token: it runs afresh.
        same = send(other, "POST", "/v1/secrets/scope/root", "shared", {"value": "r"})
        assert same.status_code == 409 and "Idempotent-Replayed" not in same.headers
        # Root's key with another request is not a 422 either: the key is this token's own.
        mine = send(other, "POST", "/v1/secrets/scope/other", "shared-x", {"value": "o"})
        assert mine.status_code == 201 and "Idempotent-Replayed" not in mine.headers


@pytest.mark.parametrize(
    "key",
    [b"", b"k" * 256, "clé".encode(), b"two words", b"tab\there"],
    ids=["empty", "256-chars", "non-ascii", "space", "tab"],
)
def test_an_invalid_key_is_400_and_writes_nothing(shared_vault: Cluster, key: bytes) -> None:
    request = raw_request(
        shared_vault, "POST", "/v1/secrets/badkey/a", {"Idempotency-Key": key}, b'{"value":"x"}'
    )
    status, body = raw_status(shared_vault, request)
    assert status == 400 and body["error"]["code"] == "bad_request"
    assert "Idempotency-Key" in body["error"]["message"]
    with shared_vault.client() as client:
        assert client.get("/v1/secrets/badkey/a").status_code == 404


def test_the_longest_and_oddest_valid_keys_are_accepted(shared_vault: Cluster) -> None:
    with shared_vault.client() as client:
        for n, key in enumerate(["k" * 255, "!", "~{}\"'`"]):
            assert (
                send(client, "POST", f"/v1/secrets/goodkey/{n}", key, {"value": "x"}).status_code
                == 201
            )


def test_an_error_outcome_replays_as_the_same_error(shared_vault: Cluster) -> None:
    with shared_vault.client() as client:
        assert client.post("/v1/secrets/errors/a", json={"value": "v1"}).status_code == 201
        exists = send(client, "POST", "/v1/secrets/errors/a", "err-1", {"value": "v9"})
        conflict = send(
            client, "PUT", "/v1/secrets/errors/a", "err-2", {"value": "v9", "expected_version": 7}
        )
        assert exists.status_code == 409 and conflict.status_code == 409
        assert_replay_of(
            send(client, "POST", "/v1/secrets/errors/a", "err-1", {"value": "v9"}),
            409,
            exists.content,
        )
        assert_replay_of(
            send(
                client,
                "PUT",
                "/v1/secrets/errors/a",
                "err-2",
                {"value": "v9", "expected_version": 7},
            ),
            409,
            conflict.content,
        )
        assert len(versions(client, "errors/a")) == 1


def test_a_token_creation_replay_returns_the_same_token(shared_vault: Cluster) -> None:
    payload = {"display_name": "ci", "policies": [{"prefix": "ci/", "capabilities": ["read"]}]}
    with shared_vault.client() as client:
        first = send(client, "POST", "/v1/tokens", "token-1", payload)
        replay = send(client, "POST", "/v1/tokens", "token-1", payload)
    assert first.status_code == 201
    assert_replay_of(replay, 201, first.content)
    with shared_vault.client(token=replay.json()["token"]) as minted:
        assert minted.get("/v1/tokens/self").json()["accessor"] == first.json()["accessor"]


def test_a_token_replay_after_its_sealing_key_was_retired_is_a_clear_410(
    shared_vault: Cluster,
) -> None:
    payload = one_policy("retired/")
    with shared_vault.client() as client:
        first = send(client, "POST", "/v1/tokens", "token-retired", payload)
        sealing_kek_id = client.get("/v1/sys/keys").json()["current_kek_id"]
        assert client.post("/v1/sys/rotate").status_code == 200
        assert client.post("/v1/sys/rewrap").json()["remaining"] == 0
        assert client.post(f"/v1/sys/keys/{sealing_kek_id}/retire").status_code == 200
        replay = client.post(
            "/v1/tokens",
            content=body_bytes(payload),
            headers={"Idempotency-Key": "token-retired", "X-Request-Id": "replay-after-retire"},
        )
    assert replay.status_code == 410 and replay.json()["error"]["code"] == "replay_unavailable"
    assert first.json()["token"] not in replay.text
    # The event log tells the same story as the answer: a failure, not a token created.
    logged = [
        json.loads(line)
        for line in shared_vault.nodes[0].log_text().splitlines()
        if '"replay-after-retire"' in line
    ]
    assert [(e["event"], e["status"]) for e in logged] == [("request.failed", 410)]
    with shared_vault.client(token=first.json()["token"]) as minted:
        assert minted.get("/v1/tokens/self").status_code == 200  # the token itself still works


def test_a_rotate_replay_rotates_once(shared_vault: Cluster) -> None:
    with shared_vault.client() as client:
        keys_before = len(client.get("/v1/sys/keys").json()["keys"])
        first = client.post("/v1/sys/rotate", headers={"Idempotency-Key": "rotate-1"})
        replay = client.post("/v1/sys/rotate", headers={"Idempotency-Key": "rotate-1"})
        assert first.status_code == 200
        assert_replay_of(replay, 200, first.content)
        assert len(client.get("/v1/sys/keys").json()["keys"]) == keys_before + 1


def test_a_batch_create_replay_creates_nothing_more(shared_vault: Cluster) -> None:
    payload = {"secrets": [{"name": "batch/a", "value": "1"}, {"name": "batch/b", "value": "2"}]}
    with shared_vault.client() as client:
        first = send(client, "POST", "/v1/batch/create", "batch-1", payload)
        assert first.status_code == 201
        assert_replay_of(
            send(client, "POST", "/v1/batch/create", "batch-1", payload), 201, first.content
        )
        assert len(versions(client, "batch/a")) == 1 and len(versions(client, "batch/b")) == 1


def test_a_keyed_rewrap_of_more_than_one_batch_finishes(shared_vault: Cluster) -> None:
    # Rewrap submits one command per batch of 256 versions; a key on each would replay the first
    # batch's outcome forever. The key is accepted, and the work finishes.
    payload = {"secrets": [{"name": f"rewrap/{n}", "value": "v"} for n in range(300)]}
    with shared_vault.client() as client:
        client.timeout = httpx.Timeout(DEADLINE_S)
        assert client.post("/v1/batch/create", json=payload).status_code == 201
        assert client.post("/v1/sys/rotate").status_code == 200
        done = client.post("/v1/sys/rewrap", headers={"Idempotency-Key": "rewrap-1"})
        assert done.status_code == 200, done.text
        assert done.json()["remaining"] == 0 and done.json()["batches"] >= 2
        assert client.get("/v1/secrets/rewrap/299").json()["value"] == "v"


def test_without_a_key_a_retry_is_a_new_request(shared_vault: Cluster) -> None:
    with shared_vault.client() as client:
        assert send(client, "POST", "/v1/secrets/nokey/a", None, {"value": "v1"}).status_code == 201
        again = send(client, "POST", "/v1/secrets/nokey/a", None, {"value": "v1"})
        assert again.status_code == 409 and again.json()["error"]["code"] == "already_exists"
        for _ in range(2):
            assert (
                send(client, "PUT", "/v1/secrets/nokey/a", None, {"value": "v2"}).status_code == 200
            )
        assert len(versions(client, "nokey/a")) == 3  # the retried update added a version
        guarded = {"value": "v3", "expected_version": 3}
        assert send(client, "PUT", "/v1/secrets/nokey/a", None, guarded).status_code == 200
        conflict = send(client, "PUT", "/v1/secrets/nokey/a", None, guarded)
        assert (
            conflict.status_code == 409 and conflict.json()["error"]["code"] == "version_conflict"
        )
        assert len(versions(client, "nokey/a")) == 4


def test_a_retried_self_revocation_meets_the_revoked_token(shared_vault: Cluster) -> None:
    with shared_vault.client() as root:
        token = root.post("/v1/tokens", json=one_policy("bye/")).json()["token"]
    with shared_vault.client(token=token) as client:
        assert (
            client.delete("/v1/tokens/self", headers={"Idempotency-Key": "bye"}).status_code == 200
        )
        # Authentication comes before the key is looked at, and the token is gone: 401, no replay.
        retry = client.delete("/v1/tokens/self", headers={"Idempotency-Key": "bye"})
        assert retry.status_code == 401 and "Idempotent-Replayed" not in retry.headers


# ---- races ---------------------------------------------------------------------------------
def test_identical_keyed_requests_racing_take_effect_once_and_answer_alike(
    shared_vault: Cluster,
) -> None:
    pairs = 24

    async def race() -> list[tuple[httpx.Response, httpx.Response]]:
        headers = {"Authorization": f"Bearer {shared_vault.root_token}"}
        async with httpx.AsyncClient(
            base_url=shared_vault.nodes[0].url, headers=headers, timeout=DEADLINE_S
        ) as client:

            async def attempt(n: int) -> httpx.Response:
                method = "POST" if n % 2 else "PUT"
                key = {"Idempotency-Key": f"race-{n}"}
                body = body_bytes({"value": f"raced-{n}"})
                return await client.request(
                    method, f"/v1/secrets/race/{n}", content=body, headers=key
                )

            answers = await asyncio.gather(*(attempt(n) for n in range(pairs) for _ in range(2)))
            return list(zip(answers[0::2], answers[1::2], strict=True))

    with shared_vault.client() as client:
        for n in range(0, pairs, 2):  # the PUT half races on secrets that exist
            assert client.post(f"/v1/secrets/race/{n}", json={"value": "v1"}).status_code == 201
        raced = asyncio.run(race())
        for n, (one, two) in enumerate(raced):
            assert (one.status_code, one.content) == (two.status_code, two.content)
            assert one.status_code == (201 if n % 2 else 200)
            replayed = [r.headers.get("Idempotent-Replayed") == "true" for r in (one, two)]
            assert sorted(replayed) == [False, True]
            assert len(versions(client, f"race/{n}")) == (1 if n % 2 else 2)


# ---- restarts between the attempt and the retry ------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_retry_after_a_restart_still_replays(vault: Cluster, signum: int) -> None:
    with vault.client() as client:
        assert client.post("/v1/secrets/restart/u", json={"value": "v1"}).status_code == 201
        for method, name, key in (("POST", "restart/c", b"c-1"), ("PUT", "restart/u", b"u-1")):
            request = keyed_write(vault, method, name, key, {"value": "v2"})
            wanted = 1 if method == "POST" else 2
            send_and_lose_the_reply(
                vault, request, lambda n=name, w=wanted: len(versions(client, n)) == w
            )
    vault.nodes[0].kill(signum)
    vault.nodes[0].start()
    with vault.client() as client:
        created = send(client, "POST", "/v1/secrets/restart/c", "c-1", {"value": "v2"})
        updated = send(client, "PUT", "/v1/secrets/restart/u", "u-1", {"value": "v2"})
        assert created.status_code == 201 and created.headers["Idempotent-Replayed"] == "true"
        assert updated.status_code == 200 and updated.headers["Idempotent-Replayed"] == "true"
        assert len(versions(client, "restart/c")) == 1
        assert len(versions(client, "restart/u")) == 2


def test_another_tokens_failed_keyed_requests_do_not_evict_this_tokens_key(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    limits = {"idempotency_keys_max": 8, "idempotency_keys_per_accessor_max": 3}
    root = tmp_path_factory.mktemp("idempotency-cap") / "cluster"
    for cluster in started_cluster(root, nodes=1, limits=limits):
        with cluster.client() as client:
            first = client.post(
                "/v1/secrets/cap/db", json={"value": "v1"}, headers={"Idempotency-Key": "mine"}
            )
            assert first.status_code == 201
            created = client.post(
                "/v1/tokens",
                json={"policies": [{"prefix": "cap/", "capabilities": ["create"]}]},
            )
            other = created.json()["token"]
        with cluster.client(token=other) as tenant:
            # 20 creates that can only fail (the name exists), each remembered under a fresh key.
            for n in range(20):
                failed = tenant.post(
                    "/v1/secrets/cap/db", json={"value": "x"}, headers={"Idempotency-Key": f"k{n}"}
                )
                assert failed.status_code == 409
            # The tenant's own oldest keys went: its k0 runs again (a new 409, not a replay).
            rerun = tenant.post(
                "/v1/secrets/cap/db", json={"value": "x"}, headers={"Idempotency-Key": "k0"}
            )
            assert "Idempotent-Replayed" not in rerun.headers
        with cluster.client() as client:
            retry = client.post(
                "/v1/secrets/cap/db", json={"value": "v1"}, headers={"Idempotency-Key": "mine"}
            )
        assert retry.status_code == 201 and retry.headers["Idempotent-Replayed"] == "true"
        assert retry.content == first.content
