"""Input the edge must refuse with a 4xx and a stable code, never a 500: numbers too large for a
command, and display names carrying control or other unprintable characters. They run against an
in-process node (the `api_vault` fixture in tests/conftest.py): validation needs no process."""

from __future__ import annotations

import httpx
import pytest

from simulations.in_process import InProcessVault


@pytest.mark.parametrize(
    "kek_text",
    [
        "9" * 19,  # past a signed 64-bit integer: the command could not be encoded
        "18446744073709551616",  # 2**64
        "1" + "0" * 5000,  # past int()'s 4300-digit limit
    ],
)
def test_retiring_a_key_id_too_large_to_exist_is_a_404_not_a_500(
    api_vault: InProcessVault, kek_text: str
) -> None:
    with api_vault.client() as client:
        reply = client.post(f"/v1/sys/keys/{kek_text}/retire")
        assert reply.status_code == 404, reply.text
        assert reply.json()["error"]["code"] == "not_found"
        # The node is unharmed: the current key is still listed and a write still works.
        assert client.get("/v1/sys/keys").status_code == 200
        written = client.post(f"/v1/secrets/after/retire-{len(kek_text)}", json={"value": "v"})
        assert written.status_code == 201


def _create_token(vault: InProcessVault, display_name: str) -> httpx.Response:
    with vault.client() as client:
        return client.post(
            "/v1/tokens",
            json={
                "display_name": display_name,
                "policies": [{"prefix": "app/", "capabilities": ["read"]}],
            },
        )


@pytest.mark.parametrize(
    "display_name",
    [
        "bell\x07",
        "line\nbreak",
        "tab\there",
        "esc\x1b[31mred",
        "del\x7f",
        "nbsp\u00a0x",
        "zero\u200bwidth",
        "bidi\u202eevil",
        " leading",
        "trailing ",
    ],
)
def test_a_display_name_with_unprintable_characters_is_a_clear_400(
    api_vault: InProcessVault, display_name: str
) -> None:
    reply = _create_token(api_vault, display_name)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["code"] == "bad_request"
    assert "display_name" in error["message"] and "printable" in error["message"]


@pytest.mark.parametrize("display_name", ["deploy bot", "ci-writer_2", "Zoë's key", "秘密"])
def test_a_display_name_of_printable_characters_is_accepted(
    api_vault: InProcessVault, display_name: str
) -> None:
    reply = _create_token(api_vault, display_name)
    assert reply.status_code == 201, reply.text
    assert reply.json()["display_name"] == display_name


def test_huge_numbers_and_extreme_times_in_any_parameter_never_answer_500(
    api_vault: InProcessVault,
) -> None:
    huge = "9" * 30
    with api_vault.client() as client:
        client.post("/v1/secrets/probe/one", json={"value": "v"}).raise_for_status()
        probes: list[httpx.Response] = [
            client.get(f"/v1/secrets/probe/one?version={huge}"),
            client.get(f"/v1/history/probe/one?limit={huge}"),
            client.get(f"/v1/history/probe/one?after_version={huge}"),
            client.get("/v1/secrets/probe/one?at=9999-12-31T23:59:59-23:59"),
            client.get("/v1/secrets/probe/one?at=0001-01-01T00:00:00%2B23:59"),
            client.get("/v1/history/probe/one?from=0001-01-01T00:00:00%2B23:59"),
            client.post(
                "/v1/batch/read", json={"secrets": [{"name": "probe/one", "version": 10**30}]}
            ),
            client.put("/v1/secrets/probe/one", json={"value": "v", "expected_version": 10**30}),
            client.post(
                "/v1/tokens",
                json={"policies": [{"prefix": "a/", "capabilities": ["read"]}], "ttl": 10**30},
            ),
            client.post(f"/v1/sys/keys/{huge}/retire"),
        ]
    for reply in probes:
        # A valid answer or a refusal with a stable code; never a server fault.
        assert reply.status_code < 500, (reply.request.url, reply.text)
