#!/usr/bin/env python3
"""A static OpenAI-style upstream for benches/load.sh (Python stdlib only, loopback only).

  upstream.py --port P --mode json   every request gets a fixed chat completion (with a usage
                                     block); only used when nginx is not installed (it is slow)
  upstream.py --port P --mode sse    every request gets a chat completion *stream*: the header and
                                     a first chunk at once, then one chunk per --interval seconds
                                     for --hold seconds (a `hold=S` query parameter overrides it),
                                     a finish chunk, the usage chunk (only when the request asked
                                     for it with stream_options.include_usage, as OpenAI does) and
                                     `data: [DONE]`

GET /__stats answers {"requests": N, "open": M, "conns": C}: requests served so far (this one
excluded), streams open now, connections accepted so far (this one included). HTTP/1.1 keep-alive, Content-Length or chunked request bodies.
"""
import argparse
import asyncio
import json
import os
import time
from urllib.parse import parse_qs, urlsplit

HERE = os.path.dirname(os.path.abspath(__file__))
STATS = {"requests": 0, "open": 0, "conns": 0}


def completion_body():
    with open(os.path.join(HERE, "response.json"), "rb") as f:
        return f.read().strip()


def chunk(obj):
    data = obj if isinstance(obj, bytes) else json.dumps(obj, separators=(",", ":")).encode()
    event = b"data: " + data + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


async def read_request(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    body = b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            body += data[:-2]
            if size == 0:
                break
    return method, target, headers, body


async def handle(reader, writer, args, fixed):
    STATS["conns"] += 1
    try:
        while True:
            try:
                method, target, headers, body = await read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError, ValueError):
                return
            url = urlsplit(target)
            close = headers.get("connection", "").lower() == "close"
            if url.path == "/__stats":
                payload = json.dumps(STATS).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
                await writer.drain()
            elif args.mode == "json":
                STATS["requests"] += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(fixed), fixed))
                await writer.drain()
            else:
                STATS["requests"] += 1
                STATS["open"] += 1
                try:
                    hold = float(parse_qs(url.query).get("hold", [args.hold])[0])
                    await stream(writer, hold, args.interval, body)
                finally:
                    STATS["open"] -= 1
            if close:
                return
    except (ConnectionError, asyncio.CancelledError):
        return
    finally:
        writer.close()


async def stream(writer, hold, interval, request_body):
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": "gpt-4o-mini-2024-07-18", "system_fingerprint": "fp_bench"}
    compact = request_body.replace(b" ", b"")
    want_usage = b'"include_usage":true' in compact
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    first = dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                 "finish_reason": None}])
    if want_usage:
        first["usage"] = None
    writer.write(chunk(first))
    await writer.drain()
    sent = 0
    deadline = time.monotonic() + hold
    while time.monotonic() < deadline:
        await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))
        sent += 1
        writer.write(chunk(dict(base, choices=[{"index": 0, "delta": {"content": "tok%d " % sent},
                                               "finish_reason": None}])))
        await writer.drain()
    writer.write(chunk(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}])))
    if want_usage:
        writer.write(chunk(dict(base, choices=[], usage={
            "prompt_tokens": 12, "completion_tokens": sent + 1, "total_tokens": 13 + sent})))
    writer.write(chunk(b"[DONE]"))
    writer.write(b"0\r\n\r\n")
    await writer.drain()


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=["json", "sse"], default="json")
    p.add_argument("--hold", type=float, default=10.0)
    p.add_argument("--interval", type=float, default=1.0)
    args = p.parse_args()
    fixed = completion_body()
    server = await asyncio.start_server(lambda r, w: handle(r, w, args, fixed), "127.0.0.1",
                                        args.port, backlog=4096, limit=1 << 20)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
