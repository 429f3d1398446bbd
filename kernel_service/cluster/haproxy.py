"""HAProxy's configuration for the front of a cluster, made from its list of cells: a request
for an existing session goes to the cell whose tag begins the session's id, any other to a
cell with room. Pure: text in, text out (docs/scaling.md explains each part)."""

import ipaddress
import json
from dataclasses import dataclass
from http import HTTPStatus

from kernel_service import __version__

# How much of a request body is read to find the session it names. Every request costs in
# proportion to it (HAProxy's buffers are this size): 1 MiB added about 1 ms to each
# request here, 64 KiB about 0.2 ms. A longer body is routed by the id found before the
# cut; `POST /sessions/{id}/execute` is routed by its path alone.
DEFAULT_BODY_BUFFER = 64 * 1024
MAX_CELLS = 65536  # tags are 4 hex digits
# The room HAProxy keeps in each buffer for rewriting headers (its default, at our sizes).
_REWRITE_ROOM = 1024


@dataclass(frozen=True)
class Cell:
    """One cell of the cluster: `kernel-service serve --cell <index>` at `address` (host:port)."""

    index: int
    address: str

    @property
    def tag(self) -> str:
        """What every id the cell makes begins with."""
        return f"{self.index:04x}"

    @property
    def name(self) -> str:
        return f"cell-{self.index}"

    @property
    def backend(self) -> str:
        return f"cell_{self.tag}"

    @property
    def named(self) -> bool:
        """Whether its address is a DNS name (a pod's, whose address changes as it restarts)."""
        host = self.address.rpartition(":")[0].strip("[]")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return True
        return False


@dataclass(frozen=True)
class Front:
    """The front's settings; `render` makes its configuration."""

    listen: str  # host:port the front binds ("0.0.0.0:8000", "[::]:8000", "127.0.0.1:8000")
    cells: tuple[Cell, ...]
    # where the cluster's status endpoint listens (the front's GET /healthz); None: a cell's
    status: str | None = None
    # bytes of a request body read to find the session it names (HAProxy's tune.bufsize)
    body_buffer: int = DEFAULT_BODY_BUFFER
    # seconds a request may wait for its answer: above twice the cells' max_timeout, as an
    # execution may wait for the one before it in its session and then run that long
    server_timeout: float = 3600.0
    # seconds an open WebSocket may stay silent (cells ping theirs every 20 s)
    tunnel_timeout: float = 3600.0
    max_connections: int = 4096

    def __post_init__(self) -> None:
        if not self.cells:
            raise ValueError("a cluster needs at least one cell")
        indexes = [cell.index for cell in self.cells]
        if len(set(indexes)) != len(indexes):
            raise ValueError(f"cell indexes must differ, got {indexes}")
        if not all(0 <= index < MAX_CELLS for index in indexes):
            raise ValueError(f"cell indexes go from 0 to {MAX_CELLS - 1}, got {indexes}")
        addresses = [cell.address for cell in self.cells]
        if len(set(addresses)) != len(addresses):
            raise ValueError(f"cells must have addresses of their own, got {addresses}")
        for address in [self.listen, *(c.address for c in self.cells), self.status or ":1"]:
            _check_address(address)
        if self.body_buffer < 16 * 1024:
            raise ValueError(
                f"the body buffer must be at least 16384 bytes, got {self.body_buffer}"
            )
        for name, seconds in (("server", self.server_timeout), ("tunnel", self.tunnel_timeout)):
            if not seconds > 0:  # also NaN
                raise ValueError(f"the {name} timeout must be more than 0 seconds, got {seconds}")


def _check_address(address: str) -> None:
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not host:port (a port from 1 to 65535)")
    if any(c.isspace() or c in "'\"#\\" for c in host):
        raise ValueError(f"{address!r} is not host:port")


def _error(status: int, code: str, detail: str) -> str:
    """An error body in the service's shape, with Jupyter's `reason` and `message` too (on
    every path: the proxy's answer cannot depend on the path), as an HAProxy string."""
    body = {
        "detail": detail,
        "code": code,
        "reason": HTTPStatus(status).phrase,
        "message": detail,
    }
    # single-quoted in the configuration, where nothing is escaped: JSON's escape instead
    text = json.dumps(body).replace("'", "\\u0027")
    return f"content-type application/json string '{text}'"


def _seconds(value: float) -> str:
    milliseconds = max(1, round(value * 1000))
    return f"{milliseconds // 1000}s" if milliseconds % 1000 == 0 else f"{milliseconds}ms"


_GENERIC_ERRORS = {
    400: ("bad_request", "The front could not read this HTTP request."),
    408: ("request_timeout", "The request did not arrive in full within 10 s."),
    500: ("proxy_error", "The front failed on this request; try again."),
    502: (
        "cell_unavailable",
        "The cell answering this request ended before it answered. A session's kernel lives "
        "on while its cell restarts: ask again in a few seconds.",
    ),
    503: ("cell_unavailable", "No cell of the cluster is up now; try again in a few seconds."),
    504: (
        "cell_timeout",
        "The cell did not answer within the front's timeout (longer than any execution may run).",
    ),
}

# Where a request names a session. The first found wins; an id's first 4 hex digits are the
# tag of the cell that made it.
_SESSION_SOURCES = (
    "path,field(3,/),url_dec if { path_beg /sessions/ }",
    "path,field(4,/),url_dec if { path_beg /api/kernels/ /api/sessions/ }",
    "req.hdr(mcp-session-id) if { req.hdr(mcp-session-id) -m found }",
    "req.hdr(e2b-sandbox-id) if { req.hdr(e2b-sandbox-id) -m found }",
    "req.body,json_query('$.session_id') if { method POST } { path /execute /sessions }",
    "req.body,json_query('$.kernel.id') if { method POST } { path /api/sessions }",
)


def render(front: Front) -> str:
    """The whole haproxy.cfg of `front`."""
    return "\n".join(
        [
            f"# Made by kernel-service {__version__} for {len(front.cells)} cells: do not edit,",
            "# make it again (kernel-service proxy-config; docs/scaling.md explains each part).",
            *_global(front),
            *_resolvers(front),
            *_defaults(front),
            *_frontend(front),
            *_backends(front),
            "",
        ]
    )


def _global(front: Front) -> list[str]:
    return [
        "",
        "global",
        "    log stdout format raw local0 info",
        f"    maxconn {front.max_connections}",
        "    # a request body is read up to the buffer to find the session it names; each",
        "    # request and answer in flight holds up to two buffers",
        f"    tune.bufsize {front.body_buffer + _REWRITE_ROOM}",
        f"    tune.maxrewrite {_REWRITE_ROOM}",
    ]


def _resolvers(front: Front) -> list[str]:
    if not any(cell.named for cell in front.cells):
        return []
    return [
        "",
        "# cells named by DNS (a StatefulSet's pods): asked again every second, since a",
        "# restarted pod comes back at another address; one not (yet) in DNS is out of service",
        "resolvers dns",
        "    parse-resolv-conf",
        "    resolve_retries 3",
        "    timeout resolve 1s",
        "    timeout retry 1s",
        "    hold valid 1s",
        "    hold other 1s",
        "    hold refused 1s",
        "    hold nx 1s",
        "    hold timeout 1s",
        "    hold obsolete 1s",
    ]


def _server(cell: Cell, options: str) -> str:
    found = " resolvers dns init-addr last,libc,none resolve-prefer ipv4" if cell.named else ""
    return f"    server {cell.name} {cell.address} {options}{found}"


def _defaults(front: Front) -> list[str]:
    errors = [
        f"    http-error status {status} {_error(status, code, detail)}"
        for status, (code, detail) in _GENERIC_ERRORS.items()
    ]
    return [
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    option httplog",
        "    option dontlog-normal  # errors, retries, health changes; not every request",
        "    # a connection to a cell per request: never one the cell closed as idle meanwhile.",
        "    # (Reusing them saved ~0.15 ms a request here, but a request on a kept connection",
        "    # to a cell that has died gets the client's connection closed, not a 503.)",
        "    option http-server-close",
        "    option forwardfor",
        "    # a cell that is down is known within 2 s: refused or silent connections give up",
        "    # fast and are tried once more, on the same cell",
        "    timeout connect 500ms",
        "    retries 1",
        "    # a connection the cell closed with nothing said (it died as the request came, or",
        "    # while running it): tried once more, not closed on the client. The cell is then",
        "    # down (refused: 503), unless it was started again within the moment: then it runs",
        "    # the request, which it may have begun, again (a restart takes seconds)",
        "    retry-on conn-failure empty-response",
        "    # a client that hangs up: the cell sees it too, and interrupts the execution",
        "    # (KERNEL_SERVICE_INTERRUPT_ON_DISCONNECT) as when the client is its own",
        "    option abortonclose",
        "    timeout check 2s",
        "    timeout queue 1s",
        "    timeout http-request 10s",
        "    timeout http-keep-alive 15s",
        "    # no timeout that cuts a long execution (an answer waits for it; a stream sends",
        "    # keep-alives every 10 s) or an idle kernel WebSocket (cells ping every 20 s)",
        f"    timeout client {_seconds(front.server_timeout)}",
        f"    timeout server {_seconds(front.server_timeout)}",
        f"    timeout tunnel {_seconds(front.tunnel_timeout)}",
        *errors,
    ]


def _frontend(front: Front) -> list[str]:
    tags = " ".join(cell.tag for cell in front.cells)
    first, *others = _SESSION_SOURCES
    not_found = _error(
        404,
        "cell_not_found",
        "No cell of this cluster has the tag %[var(txn.tag)] that begins this id: the session "
        "does not exist here (its id is wrong, or it belongs to another cluster).",
    ).replace(" string ", " lf-string ", 1)
    drain = _error(
        403,
        "drain_a_cell",
        "POST /drain drains one cell: send it to that cell's own address, not to the front "
        "(kernel-service drain --url http://CELL).",
    )
    wrong_cell = _error(
        400,
        "wrong_cell",
        "No cell of this cluster has the tag %[var(txn.tag)] that begins this session id: a "
        "session id you choose must begin with the tag (4 hex digits) of a cell "
        "(GET /healthz on a cell tells its own); or leave it out to be given one.",
    ).replace(" string ", " lf-string ", 1)
    ready = '{"status":"ready","cells_ready":%[nbsrv(placement)]}'
    full = '{"status":"unavailable","cells_ready":0}'
    lines = [
        "",
        "frontend front",
        f"    bind {front.listen}",
        "    # a new session's request body, read up to the buffer (what is past it is sent on)",
        "    http-request wait-for-body time 10s if { method POST } "
        "{ path /execute /sessions /api/sessions }",
        "    # the session the request names: the first found of these",
        "    acl has_session var(txn.session) -m found",
        "    acl has_tag var(txn.tag) -m found",
        f"    acl known_tag var(txn.tag) -m str {tags}",
        f"    http-request set-var(txn.session) {first}",
        *(
            f"    http-request set-var(txn.session) {source.replace(' if ', ' if !has_session ')}"
            for source in others
        ),
        "    http-request set-var(txn.tag) var(txn.session),bytes(0,4),lower "
        "if { var(txn.session) -m reg ^[0-9A-Fa-f]{4} }",
        "    # a new session with an id of its choosing, for a cell there is not",
        f"    http-request return status 400 {wrong_cell} if has_tag !known_tag "
        "{ method POST } { path /sessions }",
        f"    http-request return status 404 {not_found} if has_tag !known_tag",
        "    # a cell is drained from its own machine, never through the front (the path as a",
        "    # cell reads it: percent-decoded, slashes repeated or trailing)",
        f"    http-request return status 403 {drain} if {{ path,url_dec -m reg -i ^/+drain/*$ }}",
        "    # the cluster takes new sessions while one of its cells does",
        "    http-request return status 200 content-type application/json "
        f"lf-string '{ready}' if {{ path /readyz }} {{ nbsrv(placement) gt 0 }}",
        "    http-request return status 503 content-type application/json "
        f"string '{full}' if {{ path /readyz }}",
    ]
    if front.status is not None:
        lines.append("    use_backend status if { path /healthz }")
    lines += [
        f"    use_backend {cell.backend} if {{ var(txn.tag) -m str {cell.tag} }}"
        for cell in front.cells
    ]
    lines += [
        "    # no cell has room (all full or draining): a cell answers why (or what it can)",
        "    use_backend any_cell if { nbsrv(placement) eq 0 }",
        "    default_backend placement",
    ]
    return lines


def _backends(front: Front) -> list[str]:
    lines: list[str] = []
    for cell in front.cells:
        unavailable = (
            f"{cell.name} (tag {cell.tag}), which holds this session, is not answering: try "
            "again once it is back. Its sessions go on then; whether with their variables "
            "depends on whether its kernels outlived it (the next execution says if not)."
        )
        ended = (
            f"{cell.name} (tag {cell.tag}) ended before it answered: try again once it is "
            "back. The session goes on then; the next execution says what was lost, if "
            "anything."
        )
        lines += [
            "",
            f"# {cell.name}: the sessions whose ids begin with {cell.tag}",
            f"backend {cell.backend}",
            "    option httpchk",
            "    http-check send meth GET uri /healthz ver HTTP/1.1 hdr Host localhost",
            "    http-check expect status 200",
            f"    http-error status 503 {_error(503, 'cell_unavailable', unavailable)}",
            f"    http-error status 502 {_error(502, 'cell_unavailable', ended)}",
            _server(cell, "check inter 1s fastinter 250ms downinter 500ms fall 2 rise 1"),
        ]
    lines += [
        "",
        "# new sessions (and requests naming none): the cells that take new sessions now",
        "backend placement",
        "    balance leastconn",
        "    option httpchk",
        "    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host localhost",
        "    http-check expect status 200",
        "    # a cell that refuses the connection: another one",
        "    option redispatch 1",
        "    retries 2",
        *(
            _server(cell, "check inter 1s fastinter 250ms downinter 500ms fall 1 rise 1")
            for cell in front.cells
        ),
        "",
        "# when no cell takes new sessions: any cell that is up answers",
        "backend any_cell",
        "    balance leastconn",
        "    option redispatch 1",
        "    retries 2",
        *(_server(cell, f"track {cell.backend}/{cell.name}") for cell in front.cells),
    ]
    if front.status is not None:
        lines += [
            "",
            "# the front's GET /healthz: every cell's state (kernel-service cluster)",
            "backend status",
            f"    server status {front.status}",
        ]
    return lines
