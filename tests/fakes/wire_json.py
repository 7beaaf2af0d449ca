"""JSON as the fake upstreams write it: orjson, and for what orjson cannot write (an integer
past 64 bits, as a hostile upstream may send in its usage) the standard library, so a test
can put any count on the wire.

`raw_answer` is a fake's other escape hatch: the exact bytes of a 200 answer (a body) or of
a stream (its pieces, written as they are), for upstreams that do not speak the wire format
at all (a non-JSON body, an array, malformed SSE lines, a stream without its end)."""

from __future__ import annotations

import json
from typing import Any

import orjson
from aiohttp import web

RawAnswer = bytes | list[bytes]


def dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # an int beyond 64 bits: write it anyway, as a faulty upstream would
        return json.dumps(value, separators=(",", ":")).encode()


async def send_raw(request: web.Request, raw: RawAnswer) -> web.StreamResponse:
    """A 200 with `raw` as its JSON body, or (a list) as an event stream's pieces."""
    if isinstance(raw, bytes):
        return web.Response(body=raw, content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for piece in raw:
        await response.write(piece)
    await response.write_eof()
    return response
