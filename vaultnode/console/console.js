// The vault web console (docs/ui.md). Talks only to this node's public API, the endpoints the
// `vault` CLI calls. The token lives in sessionStorage and is sent as a header, never in a
// cookie or URL. Every piece of data reaches the page through textContent (el() below), never
// innerHTML. A revealed value exists only in the DOM of the page that showed it: every
// navigation empties <main>.
"use strict";

const TOKEN_KEY = "vault.token";
const CLUSTER_REFRESH_MS = 2000;
let clusterTimer = null;

function token() { return sessionStorage.getItem(TOKEN_KEY); }

// el("p", {class: "x"}, "text", child): strings become text nodes, so data is never markup.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "onclick" || key === "onsubmit") node.addEventListener(key.slice(2), value);
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(typeof child === "string" || typeof child === "number" ? String(child) : child);
  }
  return node;
}

function randomKey() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// One call to the API. Names go into paths as written: the server never percent-decodes.
async function api(method, path, options) {
  const opts = options || {};
  const headers = {};
  if (!opts.anonymous) headers["Authorization"] = "Bearer " + token();
  if (method !== "GET") headers["Idempotency-Key"] = randomKey();
  let url = path;
  if (opts.query) {
    const query = new URLSearchParams();
    for (const [key, value] of Object.entries(opts.query)) {
      if (value !== "" && value !== null && value !== undefined) query.set(key, value);
    }
    if (query.toString()) url += "?" + query.toString();
  }
  const init = { method, headers, cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer" };
  if (opts.body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(opts.body);
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch (error) {
    return { ok: false, status: 0, body: null, error: { code: "unreachable", message: "the node did not answer" } };
  }
  let body = null;
  try { body = await response.json(); } catch (error) { body = null; }
  const error = !response.ok ? ((body && body.error) || { code: "http_" + response.status, message: "HTTP " + response.status }) : null;
  if (response.status === 401 && !opts.anonymous) forgetToken();
  return { ok: response.ok, status: response.status, body, error };
}

function errorText(error) { return error.code + ": " + error.message; }

function main() { return document.getElementById("main"); }

function show(...nodes) {
  main().replaceChildren(...nodes);
}

function notice(target, text, kind) {
  target.replaceChildren(el("p", { class: kind || "error", role: kind === "notice" ? "status" : "alert" }, text));
}

function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
}

function secretHref(name) { return "#/secret/" + encodeURIComponent(name); }

// ---- sign in / out -----------------------------------------------------------------------
function signInPage(message) {
  const input = el("input", { id: "token", type: "password", autocomplete: "off", required: "required" });
  const result = el("div", { id: "sign-in-result" });
  if (message) notice(result, message);
  const form = el("form", { id: "sign-in", onsubmit: async (event) => {
    event.preventDefault();
    const candidate = input.value;
    input.value = "";
    sessionStorage.setItem(TOKEN_KEY, candidate);
    const reply = await api("GET", "/v1/tokens/self");
    if (!reply.ok) { forgetToken(); notice(result, errorText(reply.error)); return; }
    location.hash = "#/secrets";
    route();
  } }, el("label", {}, "Token", input), el("button", { type: "submit" }, "Sign in"));
  show(el("h1", {}, "Sign in"), el("p", {}, "Paste a vault token. It is kept in this tab only and forgotten on sign out."), form, result);
  input.focus();
}

async function showWho() {
  const who = document.getElementById("who");
  const reply = await api("GET", "/v1/tokens/self");
  if (reply.ok) who.textContent = "Signed in as " + (reply.body.display_name || reply.body.accessor) + (reply.body.root ? " (root)" : "");
}

function signOut() {
  forgetToken();
  document.getElementById("who").textContent = "";
  location.hash = "#/sign-in";
  route();
}

// ---- secrets -----------------------------------------------------------------------------
async function secretsPage(params) {
  const prefix = params.get("prefix") || "";
  const prefixInput = el("input", { id: "prefix", value: prefix, autocomplete: "off" });
  const listForm = el("form", { id: "list", onsubmit: (event) => {
    event.preventDefault();
    location.hash = "#/secrets?prefix=" + encodeURIComponent(prefixInput.value);
  } }, el("label", {}, "Prefix", prefixInput), el("button", { type: "submit" }, "List"));
  const listing = el("div", { id: "listing", "aria-live": "polite" }, el("p", { class: "muted" }, "Loading…"));
  const newName = el("input", { id: "new-name", autocomplete: "off", required: "required" });
  const newValue = el("textarea", { id: "new-value", rows: "2", autocomplete: "off" });
  const createResult = el("div", { id: "create-result" });
  const createForm = el("form", { id: "create", onsubmit: async (event) => {
    event.preventDefault();
    const name = newName.value;
    const reply = await api("POST", "/v1/secrets/" + name, { body: { value: newValue.value } });
    newValue.value = "";
    if (!reply.ok) { notice(createResult, errorText(reply.error)); return; }
    location.hash = secretHref(name);
  } }, el("label", {}, "Name", newName), el("label", {}, "Value", newValue), el("button", { type: "submit" }, "Create"));
  show(el("h1", {}, "Secrets"), listForm, listing,
    el("section", {}, el("h2", {}, "New secret"), createForm, createResult));
  const reply = await api("GET", "/v1/secrets", { query: { prefix } });
  if (!reply.ok) { notice(listing, errorText(reply.error)); return; }
  const secrets = reply.body.secrets;
  if (secrets.length === 0) { listing.replaceChildren(el("p", { class: "muted" }, "No secrets this token may list under this prefix.")); return; }
  const rows = secrets.map((s) => el("tr", {},
    el("td", {}, el("a", { class: "secret-link", href: secretHref(s.name) }, s.name)),
    el("td", {}, s.current_version), el("td", {}, s.updated_at)));
  listing.replaceChildren(el("div", { class: "table-wrap" }, el("table", { id: "secrets" },
    el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Name"), el("th", { scope: "col" }, "Version"), el("th", { scope: "col" }, "Updated"))),
    el("tbody", {}, ...rows))));
}

function versionState(v) {
  if (v.destroyed) return "destroyed";
  if (v.deletion_time) return "deleted " + v.deletion_time;
  return v.valid_to === null ? "current" : "";
}

function timeline(versions) {
  const start = Date.parse(versions[0].valid_from);
  const end = Math.max(Date.now(), ...versions.map((v) => Date.parse(v.valid_to || v.valid_from)));
  const span = Math.max(1, end - start);
  const bars = versions.map((v) => {
    const from = Date.parse(v.valid_from);
    const to = v.valid_to ? Date.parse(v.valid_to) : end;
    const kind = v.destroyed ? "destroyed" : v.deletion_time ? "deleted" : v.valid_to === null ? "current" : "live";
    const label = "version " + v.version + ": " + v.valid_from + " to " + (v.valid_to || "now") + (kind === "live" || kind === "current" ? "" : " (" + kind + ")");
    const bar = el("div", { class: "bar " + kind, title: label, role: "listitem", "aria-label": label }, "v" + v.version);
    bar.style.left = (100 * (from - start) / span) + "%";
    bar.style.width = (100 * Math.max(0, to - from) / span) + "%";
    return bar;
  });
  return el("div", {},
    el("div", { class: "timeline", id: "timeline", role: "list", "aria-label": "Validity of each version, oldest on the left" }, ...bars),
    el("div", { class: "legend" }, el("span", { class: "l-live" }, "superseded"), el("span", { class: "l-current" }, "current"),
      el("span", { class: "l-deleted" }, "deleted"), el("span", { class: "l-destroyed" }, "destroyed")));
}

// A value is fetched only on this explicit click (the read is audited) and dropped on Hide.
function revealer(id, fetchValue) {
  const holder = el("span", { id });
  const reveal = el("button", { type: "button", class: "reveal", onclick: async () => {
    const reply = await fetchValue();
    if (!reply.ok) { holder.replaceChildren(el("span", { class: "error" }, errorText(reply.error))); return; }
    const hide = el("button", { type: "button", class: "hide", onclick: () => { holder.replaceChildren(reveal); reveal.focus(); } }, "Hide");
    holder.replaceChildren(el("output", { class: "value" }, reply.body.value), " ", hide);
    hide.focus();
  } }, "Reveal");
  holder.append(reveal);
  return holder;
}

async function changeVersions(name, action, version, result) {
  const question = action === "destroy"
    ? "Destroy version " + version + " of " + name + " for good? Its value cannot be recovered."
    : action[0].toUpperCase() + action.slice(1) + " version " + version + " of " + name + "?";
  if (!window.confirm(question)) return;
  const path = { delete: "/v1/delete/", undelete: "/v1/undelete/", destroy: "/v1/destroy/" }[action];
  const reply = await api("POST", path + name, { body: { versions: [version] } });
  if (!reply.ok) { notice(result, errorText(reply.error)); return; }
  const past = { delete: "deleted", undelete: "undeleted", destroy: "destroyed" }[action];
  await secretPage(name, past + " version " + version);
}

async function secretPage(name, done) {
  const result = el("div", { id: "action-result" });
  if (done) notice(result, done, "notice");
  show(el("p", {}, el("a", { href: "#/secrets" }, "← Secrets")), el("h1", { id: "secret-name" }, name), result);
  const reply = await api("GET", "/v1/history/" + name);
  if (!reply.ok) { main().append(el("p", { class: "error", role: "alert" }, errorText(reply.error))); return; }
  const versions = reply.body.versions;
  const current = versions[versions.length - 1];
  const rows = versions.map((v) => {
    const actions = el("td", {});
    if (!v.destroyed) {
      actions.append(revealer("value-" + v.version, () => api("GET", "/v1/secrets/" + name, { query: { version: v.version } })), " ");
      const action = v.deletion_time ? "undelete" : "delete";
      actions.append(el("button", { type: "button", class: action, onclick: () => changeVersions(name, action, v.version, result) }, action === "delete" ? "Delete" : "Undelete"), " ");
      actions.append(el("button", { type: "button", class: "destroy", onclick: () => changeVersions(name, "destroy", v.version, result) }, "Destroy"));
    }
    return el("tr", { id: "version-" + v.version },
      el("td", {}, v.version), el("td", {}, v.valid_from), el("td", {}, v.valid_to || "—"),
      el("td", { class: "state" }, versionState(v)),
      el("td", { class: "created-by" }, v.created_by.display_name || v.created_by.accessor),
      actions);
  });
  const asOfInput = el("input", { id: "as-of", placeholder: "2026-11-27T14:00:00Z", autocomplete: "off", required: "required" });
  const asOfResult = el("div", { id: "as-of-result", "aria-live": "polite" });
  const asOfForm = el("form", { id: "as-of-form", onsubmit: async (event) => {
    event.preventDefault();
    const at = asOfInput.value.trim();
    const found = await api("GET", "/v1/history/" + name, { query: { at } });
    if (!found.ok) { notice(asOfResult, errorText(found.error)); return; }
    const v = found.body.versions[0];
    asOfResult.replaceChildren(el("p", {}, "Version ", el("strong", { id: "as-of-version" }, v.version),
      " was valid at " + at + " (" + v.valid_from + " to " + (v.valid_to || "now") + ")", " ",
      revealer("as-of-value", () => api("GET", "/v1/secrets/" + name, { query: { at } }))));
  } }, el("label", {}, "Value as of (RFC 3339)", asOfInput), el("button", { type: "submit" }, "Show"));
  const updateValue = el("textarea", { id: "update-value", rows: "2", autocomplete: "off" });
  const expected = el("input", { id: "expected-version", type: "number", min: "1", value: current.version });
  const updateResult = el("div", { id: "update-result" });
  const updateForm = el("form", { id: "update", onsubmit: async (event) => {
    event.preventDefault();
    const body = { value: updateValue.value };
    if (expected.value !== "") body.expected_version = Number(expected.value);
    const written = await api("PUT", "/v1/secrets/" + name, { body });
    updateValue.value = "";
    if (!written.ok) {
      const text = written.error.code === "version_conflict"
        ? "Conflict: you expected version " + expected.value + " but the current version is " + written.error.current_version + ". Nothing was written; reload to see the newer version."
        : errorText(written.error);
      notice(updateResult, text);
      return;
    }
    await secretPage(name, "updated to version " + written.body.version);
  } }, el("label", {}, "New value", updateValue), el("label", {}, "Expected version", expected), el("button", { type: "submit" }, "Update"));
  main().append(
    el("section", {}, el("h2", {}, "Timeline"), timeline(versions)),
    el("section", {}, el("h2", {}, "Versions"), el("div", { class: "table-wrap" }, el("table", { id: "versions" },
      el("thead", {}, el("tr", {}, ...["Version", "Valid from", "Valid to", "State", "Created by", "Actions"].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, ...rows)))),
    el("section", {}, el("h2", {}, "Value as of an instant"), asOfForm, asOfResult),
    el("section", {}, el("h2", {}, "Update (compare-and-set)"), updateForm, updateResult));
}

// ---- cluster -----------------------------------------------------------------------------
async function clusterPage() {
  const view = el("div", { id: "cluster", "aria-live": "polite" }, el("p", { class: "muted" }, "Loading…"));
  const changes = el("div", { id: "leader-changes" });
  show(el("h1", {}, "Cluster"), el("p", { class: "muted" }, "Refreshed every " + CLUSTER_REFRESH_MS / 1000 + " s, as this node sees its peers."), view,
    el("section", {}, el("h2", {}, "Last leader changes"), changes));
  const refresh = async () => {
    const reply = await api("GET", "/v1/cluster", { anonymous: true });
    if (!document.body.contains(view)) return;  // navigated away meanwhile
    if (!reply.ok) { notice(view, errorText(reply.error)); return; }
    const cell = (value) => el("td", {}, value === null || value === undefined ? "—" : value);
    const rows = reply.body.nodes.map((n) => el("tr", { id: "node-" + n.node_id, class: n.role === "leader" ? "leader" : null },
      cell(n.node_id), el("td", { class: "status" }, n.status, n.last_seen ? el("span", { class: "muted" }, " (last answered " + n.last_seen + ")") : null), el("td", { class: "role" }, n.role || "—"), cell(n.leader_id),
      cell(n.commit_index), cell(n.applied_index), el("td", { class: "lag" }, n.lag === null || n.lag === undefined ? "—" : n.lag)));
    view.replaceChildren(el("div", { class: "table-wrap" }, el("table", {},
      el("thead", {}, el("tr", {}, ...["Node", "Status", "Role", "Leader", "Commit", "Applied", "Lag"].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, ...rows))), el("p", { class: "muted" }, "Updated " + new Date().toISOString()));
    const items = reply.body.leader_changes.map((c) => el("li", {}, c.at + ": " + (c.leader_id === null ? "no leader" : "node " + c.leader_id)));
    changes.replaceChildren(items.length ? el("ol", {}, ...items) : el("p", { class: "muted" }, "None seen yet."));
  };
  await refresh();
  clusterTimer = setInterval(refresh, CLUSTER_REFRESH_MS);
}

// ---- routing -----------------------------------------------------------------------------
function route() {
  if (clusterTimer !== null) { clearInterval(clusterTimer); clusterTimer = null; }
  main().replaceChildren();  // drops any revealed value with the page that showed it
  const signedIn = token() !== null;
  document.getElementById("nav").hidden = !signedIn;
  const hash = location.hash || "#/secrets";
  const [path, queryString] = hash.slice(1).split("?");
  main().focus();
  if (!signedIn || path === "/sign-in") { signInPage(); return; }
  if (!document.getElementById("who").textContent) showWho();
  if (path.startsWith("/secret/")) { secretPage(decodeURIComponent(path.slice("/secret/".length))); }
  else if (path === "/cluster") { clusterPage(); }
  else { secretsPage(new URLSearchParams(queryString || "")); }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("sign-out").addEventListener("click", signOut);
  window.addEventListener("hashchange", route);
  route();
});
