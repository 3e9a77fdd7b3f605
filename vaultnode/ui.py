"""The web console's static files, served under `/ui/` by every node (docs/ui.md).

Owns which files the console is made of (a fixed set, read once from the package's
`vaultnode/console/` directory at start, so a request can never name any other file: no path
traversal, no file system access per request) and the security headers they carry: a strict
Content-Security-Policy (scripts and styles only from the console's own files, nothing inline,
`connect-src 'self'` so the page talks to this node's API only, `frame-ancestors 'none'`),
`Referrer-Policy: no-referrer`, `Cache-Control: no-store` and `nosniff`. API answers the console
reads carry values, so `Cache-Control: no-store` is added to every `/v1/` answer too.
"""

from __future__ import annotations

from importlib import resources

from vaultnode.http_server import Handler, Request, Response, error_response

UI_PREFIX = "/ui/"
_FILES = {
    "": ("index.html", "text/html; charset=utf-8"),
    "index.html": ("index.html", "text/html; charset=utf-8"),
    "console.js": ("console.js", "text/javascript; charset=utf-8"),
    "console.css": ("console.css", "text/css; charset=utf-8"),
}
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
]


def _load_files() -> dict[str, tuple[bytes, str]]:
    folder = resources.files("vaultnode") / "console"
    return {
        path: ((folder / file_name).read_bytes(), content_type)
        for path, (file_name, content_type) in _FILES.items()
    }


class Console:
    """Wraps the node's request handler: `/ui/…` is answered here, everything else there."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._files = _load_files()  # a few tens of KiB, fixed at start

    async def handle(self, request: Request) -> Response:
        path = request.path
        if path == "/ui" or path.startswith(UI_PREFIX):
            return self._serve(request)
        response = await self._handler(request)
        if path.startswith("/v1/") and not any(
            name.lower() == "cache-control" for name, _ in response.headers
        ):
            response.headers.append(("Cache-Control", "no-store"))
        return response

    def _serve(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return error_response(
                405, "method_not_allowed", f"{request.method} is not allowed on the console",
                list(SECURITY_HEADERS),
            )
        if request.path == "/ui":
            return Response(301, headers=[("Location", UI_PREFIX), *SECURITY_HEADERS])
        found = self._files.get(request.path[len(UI_PREFIX) :])
        if found is None:
            return error_response(
                404, "not_found", "no such console file", list(SECURITY_HEADERS)
            )
        body, content_type = found
        return Response(200, body, list(SECURITY_HEADERS), content_type=content_type)
