"""The web inspector: one static page at `/` (HTML, vanilla JS and CSS from
kernel_service/api/static, no build step) that lists sessions, shows their history and runs code.

The page and its two files are served without an API key (they hold no data); the page asks
for the key and sends it with every API call. Outputs are written by model code, so the
page renders all text as text and HTML outputs in sandboxed iframes; its Content Security
Policy lets it load nothing but its own files and talk to nothing but this service.
"""

from importlib.resources import files

from fastapi import APIRouter, Response

router = APIRouter(include_in_schema=False)

STATIC = files("kernel_service.api") / "static"
# Served without an API key (see auth.py): the page and what it loads, nothing else.
PAGES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/inspector.js": ("inspector.js", "text/javascript; charset=utf-8"),
    "/static/inspector.css": ("inspector.css", "text/css; charset=utf-8"),
}
# Inherited by the HTML outputs' srcdoc iframes: nothing outside this origin is loaded,
# so model-written HTML cannot call home (no script runs in them anyway: see inspector.js).
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",  # pandas tables carry <style> blocks
        "img-src 'self' data:",
        "connect-src 'self'",
        "frame-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _serve(name: str, media_type: str) -> Response:
    return Response((STATIC / name).read_bytes(), media_type=media_type, headers=_HEADERS)


@router.get("/")
async def index() -> Response:
    return _serve(*PAGES["/"])


@router.get("/static/inspector.js")
async def script() -> Response:
    return _serve(*PAGES["/static/inspector.js"])


@router.get("/static/inspector.css")
async def stylesheet() -> Response:
    return _serve(*PAGES["/static/inspector.css"])
