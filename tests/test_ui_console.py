"""The web console under /ui/ (docs/ui.md): its headers, its endpoints, and the pages in a browser.

The browser tests drive Debian's headless `chromium` through `chromedriver` and `selenium` against
one real three-node cluster, in one browser session, in file order (the last one stops a node).
They are skipped, with the reason, where chromium or chromedriver is absent. Screenshots of the
main pages go to the test's tmp directory (printed), and also to $VAULT_UI_SCREENSHOTS if set
(`VAULT_UI_SCREENSHOTS=docs/ui` refreshes the ones docs/ui.md shows).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from simulations.harness import Cluster, Node, started_cluster, wait_for_leader, wait_until

ROOT = Path(__file__).resolve().parent.parent
CONSOLE_JS = ROOT / "vaultnode" / "console" / "console.js"
XSS = "<img src=x onerror=alert(1)>"
WAIT_S = 20.0


# ---- the console calls only what the CLI calls ------------------------------------------------
def _normalised(path: str) -> str:
    """A path pattern with every interpolated piece written `{}`."""
    return re.sub(r"\{[^}]*\}", "{}", path)


def console_endpoints() -> set[tuple[str, str]]:
    """(method, path pattern) of every `api(...)` call in console.js; a path built as
    `"/v1/x/" + name` is `/v1/x/{}`."""
    text = CONSOLE_JS.read_text()
    found = set()
    for method, expression in re.findall(r'\bapi\("([A-Z]+)", ([^,)]+)', text):
        parts = [p.strip() for p in expression.split("+")]
        path = "".join(p[1:-1] if p.startswith('"') else "{}" for p in parts)
        found.add((method, path))
    # The delete/undelete/destroy paths come from one table in changeVersions().
    table = re.search(
        r'\{ delete: "([^"]+)", undelete: "([^"]+)", destroy: "([^"]+)" \}', text
    )
    assert table is not None, "changeVersions() no longer has its path table"
    found.discard(("POST", "{}{}"))
    found.update(("POST", prefix + "{}") for prefix in table.groups())
    return found


def cli_endpoints() -> set[tuple[str, str]]:
    """(method, path pattern) of every request the CLI makes; `{action}` expanded to the
    actions the CLI passes."""
    found = set()
    for source in (ROOT / "cli").glob("*.py"):
        for method, path in re.findall(
            r'request\(\s*"([A-Z]+)",\s*f?"(/[^"]*)"', source.read_text()
        ):
            if "{action}" in path:
                for action in ("delete", "undelete", "destroy"):
                    found.add((method, _normalised(path.replace("{action}", action))))
            else:
                found.add((method, _normalised(path)))
    return found


def test_the_console_calls_only_endpoints_the_cli_calls() -> None:
    console = console_endpoints()
    assert ("GET", "/v1/history/{}") in console and ("PUT", "/v1/secrets/{}") in console
    missing = console - cli_endpoints()
    assert not missing, f"the console calls endpoints the CLI does not: {sorted(missing)}"


# ---- one cluster, one browser -----------------------------------------------------------------
@dataclass
class Session:
    cluster: Cluster
    node: Node  # the node whose console the browser uses
    driver: Any
    shots: Path

    @property
    def base(self) -> str:
        return self.node.url + "/ui/"

    def api(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.node.url,
            headers={"Authorization": f"Bearer {token or self.cluster.root_token}"},
            timeout=30.0,
        )

    def screenshot(self, name: str) -> None:
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        extra = os.environ.get("VAULT_UI_SCREENSHOTS")
        if extra:
            Path(extra).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(extra) / path.name)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from started_cluster(tmp_path_factory.mktemp("ui") / "cluster", nodes=3)


def _browser_or_skip() -> Any:
    chromium = shutil.which("chromium")
    chromedriver = shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        reason = (
            "chromium and chromium-driver are not installed "
            "(apt-get install -y chromium chromium-driver)"
        )
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        reason = "selenium is not installed (pip install -e '.[test]')"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
        "--window-size=1280,1000", "--disable-extensions",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(chromedriver), options=options)


@pytest.fixture(scope="module")
def session(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    driver = _browser_or_skip()
    shots = tmp_path_factory.mktemp("ui-screenshots")
    print(f"console screenshots: {shots}")
    try:
        leader = wait_for_leader(cluster.nodes)
        follower = next(n for n in cluster.nodes if n is not leader)
        yield Session(cluster, follower, driver, shots)  # a follower: its answers go via consensus
    finally:
        driver.quit()


def _by(kind: str) -> Any:
    from selenium.webdriver.common.by import By

    return {"id": By.ID, "css": By.CSS_SELECTOR}[kind]


def find(session: Session, selector: str) -> Any:
    return session.driver.find_element(_by("css"), selector)


def wait_for(session: Session, selector: str, text: str | None = None) -> Any:
    """The element once it exists (and contains `text`, if given)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    found: list[Any] = []

    def present() -> bool:
        try:
            element = session.driver.find_element(_by("css"), selector)
            if text is not None and text not in element.text:
                return False
        except (NoSuchElementException, StaleElementReferenceException):
            return False
        found[:] = [element]
        return True

    what = f"{selector!r}" + (f" to contain {text!r}" if text else "")
    try:
        wait_until(present, WAIT_S, what)
    except TimeoutError:
        shown = session.driver.execute_script("return document.body.innerText")
        raise TimeoutError(f"timed out waiting for {what}; the page shows:\n{shown}") from None
    return found[0]


def text_of(session: Session, selector: str) -> str:
    """The element's text, read again if a live refresh replaced the element meanwhile."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    for _ in range(50):
        try:
            return str(session.driver.find_element(_by("css"), selector).text)
        except (NoSuchElementException, StaleElementReferenceException):
            time.sleep(0.1)
    raise AssertionError(f"{selector!r} never stayed long enough to be read")


def go(session: Session, fragment: str) -> None:
    session.driver.get(session.base + fragment)


def sign_in(session: Session, token: str) -> None:
    from selenium.webdriver.common.keys import Keys

    go(session, "#/sign-in")
    field = wait_for(session, "#token")
    field.send_keys(token, Keys.ENTER)  # the keyboard alone signs in
    wait_for(session, "#who", "Signed in as")


def no_alert(session: Session) -> bool:
    from selenium.common.exceptions import NoAlertPresentException

    try:
        session.driver.switch_to.alert  # noqa: B018 - raises when there is none
    except NoAlertPresentException:
        return True
    return False


# ---- headers ----------------------------------------------------------------------------------
def test_console_files_carry_the_security_headers_and_nothing_else_is_served(
    cluster: Cluster,
) -> None:
    node = cluster.nodes[0]
    with httpx.Client(base_url=node.url, timeout=10.0) as client:
        for path in ("/ui/", "/ui/console.js", "/ui/console.css"):
            response = client.get(path)
            assert response.status_code == 200, path
            csp = response.headers["content-security-policy"]
            assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp
            assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
            assert response.headers["referrer-policy"] == "no-referrer"
            assert response.headers["cache-control"] == "no-store"
            assert response.headers["x-content-type-options"] == "nosniff"
        assert "<script src=\"console.js\" defer></script>" in client.get("/ui/").text
        assert "<script>" not in client.get("/ui/").text  # no inline script to allow
        for path in ("/ui/../setup.cfg", "/ui/%2e%2e/setup.cfg", "/ui/console", "/ui/ui.py",
                     "/ui//etc/passwd", "/ui/console.js/"):
            assert client.get(path).status_code == 404, path
        assert client.post("/ui/").status_code == 405
        assert client.get("/ui", follow_redirects=False).headers["location"] == "/ui/"
        # Answers that may carry a value are never cached either.
        read = client.get("/v1/secrets", headers={"Authorization": f"Bearer {cluster.root_token}"})
        assert read.headers["cache-control"] == "no-store"


# ---- browser ----------------------------------------------------------------------------------
@dataclass
class FiveVersions:
    name: str
    values: list[str]
    valid_from: list[str]


@pytest.fixture(scope="module")
def five_versions(session: Session) -> FiveVersions:
    name = f"ui/app/db-{os.urandom(3).hex()}"
    values = [f"value-{n}-{os.urandom(4).hex()}" for n in range(1, 6)]
    valid_from = []
    with session.api() as api:
        first = api.post(f"/v1/secrets/{name}", json={"value": values[0]})
        assert first.status_code == 201, first.text
        valid_from.append(first.json()["valid_from"])
        for n, value in enumerate(values[1:], start=1):
            written = api.put(f"/v1/secrets/{name}", json={"value": value, "expected_version": n})
            assert written.status_code == 200, written.text
            valid_from.append(written.json()["valid_from"])
    return FiveVersions(name, values, valid_from)


def _between(a: str, b: str) -> str:
    """An RFC 3339 instant strictly between two of the vault's timestamps (µs apart at least)."""
    from datetime import datetime

    start, end = (datetime.fromisoformat(t.replace("Z", "+00:00")) for t in (a, b))
    middle = start + (end - start) / 2
    return middle.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_sign_in_browse_and_read_values_as_of_three_instants_with_reveal_and_hide(
    session: Session, five_versions: FiveVersions
) -> None:
    sign_in(session, session.cluster.root_token)
    assert session.driver.execute_script("return sessionStorage.getItem('vault.token')") == (
        session.cluster.root_token
    )
    assert session.cluster.root_token not in session.driver.current_url
    assert session.driver.get_cookies() == []
    # Browse: list by prefix, open the secret from the list.
    prefix = wait_for(session, "#prefix")
    prefix.clear()
    prefix.send_keys("ui/app/")
    find(session, "#list button").click()
    link = wait_for(session, "#secrets a.secret-link", five_versions.name)
    session.screenshot("secrets")
    link.click()
    wait_for(session, "#versions #version-5")
    rows = session.driver.find_elements(_by("css"), "#versions tbody tr")
    assert [r.get_attribute("id") for r in rows] == [f"version-{n}" for n in range(1, 6)]
    assert len(session.driver.find_elements(_by("css"), "#timeline .bar")) == 5
    assert "root" in find(session, "#version-1 .created-by").text
    for value in five_versions.values:  # nothing revealed yet
        assert value not in session.driver.page_source
    # "Value as of" three instants: v1's first microsecond, between v3 and v4, between v4 and v5.
    vf = five_versions.valid_from
    for instant, expected in ((vf[0], 1), (_between(vf[2], vf[3]), 3), (_between(vf[3], vf[4]), 4)):
        field = find(session, "#as-of")
        field.clear()
        field.send_keys(instant)
        find(session, "#as-of-form button").click()
        wait_for(session, "#as-of-version", str(expected))
        assert find(session, "#as-of-version").text == str(expected)
        find(session, "#as-of-value button.reveal").click()
        shown = wait_for(session, "#as-of-value output.value")
        assert shown.text == five_versions.values[expected - 1]
        if expected == 3:
            session.screenshot("secret")
        find(session, "#as-of-value button.hide").click()
        wait_for(session, "#as-of-value button.reveal")
        assert five_versions.values[expected - 1] not in session.driver.page_source
    # Reveal a row's value, then navigate away: no value remains in the DOM.
    find(session, "#value-5 button.reveal").click()
    assert wait_for(session, "#value-5 output.value").text == five_versions.values[4]
    find(session, "nav a[href='#/secrets']").click()
    wait_for(session, "#prefix")
    dom = session.driver.execute_script("return document.documentElement.outerHTML")
    for value in five_versions.values:
        assert value not in dom
    # Back to the secret: hidden again.
    session.driver.back()
    wait_for(session, "#value-5 button.reveal")
    assert five_versions.values[4] not in session.driver.page_source


def test_a_stale_compare_and_set_update_shows_the_conflict_and_writes_nothing(
    session: Session, five_versions: FiveVersions
) -> None:
    name = five_versions.name
    go(session, f"#/secret/{name}")
    expected = wait_for(session, "#expected-version")
    assert expected.get_attribute("value") == "5"
    # Someone else writes version 6 while the page still expects 5.
    with session.api() as api:
        sixth = api.put(f"/v1/secrets/{name}", json={"value": "by-someone-else"})
        assert sixth.json()["version"] == 6
    find(session, "#update-value").send_keys("mine-" + os.urandom(4).hex())
    find(session, "#update button").click()
    conflict = wait_for(session, "#update-result .error", "Conflict")
    assert "current version is 6" in conflict.text and "Nothing was written" in conflict.text
    with session.api() as api:
        assert api.get(f"/v1/secrets/{name}").json()["version"] == 6
    # Expecting the current version writes.
    expected = find(session, "#expected-version")
    expected.clear()
    expected.send_keys("6")
    find(session, "#update-value").send_keys("mine-now")
    find(session, "#update button").click()
    wait_for(session, "#action-result", "updated to version 7")
    with session.api() as api:
        assert api.get(f"/v1/secrets/{name}").json()["value"] == "mine-now"


def test_delete_and_undelete_a_version_after_confirming(
    session: Session, five_versions: FiveVersions
) -> None:
    name = five_versions.name
    go(session, f"#/secret/{name}")
    wait_for(session, "#version-2 button.delete").click()
    session.driver.switch_to.alert.dismiss()  # no: nothing happens
    with session.api() as api:
        assert api.get(f"/v1/secrets/{name}", params={"version": 2}).status_code == 200
    find(session, "#version-2 button.delete").click()
    session.driver.switch_to.alert.accept()
    wait_for(session, "#action-result", "deleted version 2")
    # The notice shows before the page has re-read the history: wait for the new rows.
    wait_for(session, "#version-2 button.undelete")
    assert find(session, "#version-2 .state").text.startswith("deleted")
    assert "deleted" in find(session, "#timeline .bar.deleted").get_attribute("aria-label")
    with session.api() as api:
        gone = api.get(f"/v1/secrets/{name}", params={"version": 2})
        assert gone.status_code == 404 and gone.json()["error"]["version"] == 2
    find(session, "#version-2 button.undelete").click()
    session.driver.switch_to.alert.accept()
    wait_for(session, "#action-result", "undeleted version 2")
    wait_for(session, "#version-2 button.delete")
    assert find(session, "#version-2 .state").text == ""
    with session.api() as api:
        read = api.get(f"/v1/secrets/{name}", params={"version": 2})
        assert read.json()["value"] == five_versions.values[1]


def test_markup_in_names_and_metadata_renders_as_text(session: Session) -> None:
    with session.api() as api:
        token = api.post(
            "/v1/tokens",
            json={"display_name": XSS, "policies": [{"prefix": "ui/xss/", "capabilities": [
                "create", "update", "read", "history", "list"]}]},
        ).json()["token"]
    name = f"ui/xss/{os.urandom(3).hex()}"
    with session.api(token) as api:
        assert api.post(f"/v1/secrets/{name}", json={"value": "x"}).status_code == 201
    # Created by a token whose display name is markup: shown as those characters.
    go(session, f"#/secret/{name}")
    assert wait_for(session, "#version-1 .created-by").text == XSS
    # A name that is markup (the API refuses it) is shown as text too, heading and error alike.
    go(session, "#/secret/" + XSS)
    wait_for(session, "p.error", "invalid_name")
    assert find(session, "#secret-name").text == XSS
    assert session.driver.find_elements(_by("css"), "main img") == []
    assert no_alert(session)
    # No script ran and no markup was even tried (a CSP refusal would be logged as a violation).
    logged = [e for e in session.driver.get_log("browser") if e.get("source") != "network"]
    assert logged == []


def test_a_limited_token_sees_only_its_names_and_sign_out_forgets_it(
    session: Session, five_versions: FiveVersions
) -> None:
    marker = os.urandom(3).hex()
    mine, other = f"ui/team-{marker}/api-key", f"ui/other-{marker}/api-key"
    with session.api() as api:
        for name in (mine, other):
            assert api.post(f"/v1/secrets/{name}", json={"value": "v"}).status_code == 201
        limited = api.post(
            "/v1/tokens",
            json={"display_name": "team", "policies": [
                {"prefix": f"ui/team-{marker}/", "capabilities": ["list", "read", "history"]}]},
        ).json()["token"]
    find(session, "#sign-out").click()
    wait_for(session, "#token")
    assert session.driver.execute_script("return sessionStorage.getItem('vault.token')") is None
    sign_in(session, limited)
    go(session, "#/secrets?prefix=ui/")
    wait_for(session, "#secrets a.secret-link", mine)
    listed = [a.text for a in session.driver.find_elements(_by("css"), "#secrets a.secret-link")]
    assert listed == [mine]
    # A name outside its policy: refused, and nothing about it is shown.
    go(session, f"#/secret/{five_versions.name}")
    wait_for(session, "p.error", "forbidden")
    assert session.driver.find_elements(_by("css"), "#versions") == []
    find(session, "#sign-out").click()
    wait_for(session, "#token")
    assert session.driver.execute_script("return sessionStorage.getItem('vault.token')") is None
    go(session, "#/secrets")
    wait_for(session, "#token")  # signed out: every page asks for a token again


def test_pages_reflow_at_200_percent_zoom(session: Session) -> None:
    sign_in(session, session.cluster.root_token)
    # 200 % zoom of a 1280 px window lays the page out in 640 CSS pixels.
    session.driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 640, "height": 500, "deviceScaleFactor": 2, "mobile": False},
    )
    try:
        for fragment, ready in (("#/secrets", "#prefix"), ("#/cluster", "#cluster table")):
            go(session, fragment)
            wait_for(session, ready)
            overflow = session.driver.execute_script(
                "return document.documentElement.scrollWidth - window.innerWidth"
            )
            assert overflow <= 0, f"{fragment} scrolls sideways at 200 % zoom"
    finally:
        session.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_the_cluster_page_shows_a_stopped_followers_lag_live(session: Session) -> None:
    """Last: it stops a node."""
    sign_in(session, session.cluster.root_token)
    go(session, "#/cluster")
    for node in session.cluster.nodes:
        wait_for(session, f"#node-{node.node_id} .status", "ok")
    assert len(session.driver.find_elements(_by("css"), "#cluster tr.leader")) == 1
    wait_for(session, "#leader-changes li", "node ")
    session.screenshot("cluster")
    leader = wait_for_leader(session.cluster.nodes)
    stopped = next(n for n in session.cluster.nodes if n not in (leader, session.node))
    stopped.stop()
    with session.api() as api:
        for n in range(5):
            created = api.post(f"/v1/secrets/ui/lag-{os.urandom(3).hex()}-{n}", json={"value": "v"})
            assert created.status_code == 201
    # Refreshed live: no reload, the stopped node's row turns unreachable with its lag.
    row = f"#node-{stopped.node_id}"
    wait_for(session, f"{row} .status", "unreachable")

    def lag() -> int:
        text = text_of(session, f"{row} .lag")
        return int(text) if text.isdigit() else -1

    wait_until(lambda: lag() >= 5, WAIT_S, "the stopped node's lag to show the 5 writes")
    serving = f"#node-{session.node.node_id}"
    wait_until(
        lambda: text_of(session, f"{serving} .lag") == "0", WAIT_S, "the serving node at lag 0"
    )
    session.screenshot("cluster-node-stopped")
    stopped.start()
    wait_until(
        lambda: text_of(session, f"{row} .status") == "ok" and lag() == 0,
        WAIT_S * 2,
        "the restarted node to catch up on the page",
    )
