"""HTTP requests aiohttp's parser rejects get one log line each, not a traceback (issue 12, fault 9)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from vallexd.server.http_api import _PARSER_FILTER


async def test_parser_rejections_log_one_line_each(caplog: Any) -> None:
    server_log = logging.getLogger("aiohttp.server")
    server_log.addFilter(_PARSER_FILTER)
    caplog.set_level(logging.DEBUG, logger="aiohttp.server")
    runner = web.AppRunner(web.Application(), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        junk = [b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
                b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"]
        for payload in junk:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(payload)
            await writer.drain()
            assert (await asyncio.wait_for(reader.read(100), 5)).startswith(b"HTTP/1.")
            writer.close()
    finally:
        await runner.cleanup()
        server_log.removeFilter(_PARSER_FILTER)
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert len(records) == len(junk)
    for record in records:
        assert record.exc_info is None and record.levelno == logging.INFO
        assert "rejected malformed request" in record.getMessage() and "\n" not in record.getMessage()
