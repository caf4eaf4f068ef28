#!/usr/bin/env python3
"""Opens streaming chat completions for benches/load.sh and measures them (stdlib only).

  sse_client.py --url http://127.0.0.1:P/v1/chat/completions --key K --streams 500 \
                [--hold 10] [--pid GATEWAY_PID] [--sequential]

Opens --streams streams at once (or one after another with --sequential), each a POST with
"stream": true; reads each chunked SSE body to its end. Time to first byte (TTFB) is the time from
sending the request to receiving the first `data:` event. With --pid, samples that process's
VmRSS: before the first request, once every stream has its first event (all open at once), the
peak while they are open, and after they all ended. Prints one JSON object.
"""
import argparse
import asyncio
import json
import statistics
import time
from urllib.parse import urlsplit


def rss_kb(pid):
    if not pid:
        return None
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def pct(values, p):
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(p / 100.0 * len(s) + 0.5)) - 1))]


class Shared:
    def __init__(self, n):
        self.n = n
        self.first = 0
        self.all_open = asyncio.Event()


async def one(url, key, hold, shared, timeout):
    u = urlsplit(url)
    path = (u.path or "/") + "?hold=%g" % hold
    body = json.dumps({"model": "gpt-4o-mini", "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    req = ("POST %s HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\n"
           "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
           "Content-Length: %d\r\nConnection: close\r\n\r\n" % (path, u.netloc, key, len(body)))
    result = {"ok": False, "ttfb": None, "done": False, "status": None, "error": None}
    writer = None
    counted = False
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(u.hostname, u.port), timeout)
        t0 = time.perf_counter()
        writer.write(req.encode() + body)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status_line = head.split(b"\r\n", 1)[0].decode()
        result["status"] = int(status_line.split()[1])
        chunked = b"transfer-encoding: chunked" in head.lower()
        buf = b""
        while True:
            if chunked:
                line = await asyncio.wait_for(reader.readuntil(b"\r\n"), timeout)
                size = int(line.split(b";")[0], 16)
                data = await asyncio.wait_for(reader.readexactly(size + 2), timeout)
                data = data[:-2]
                if size == 0:
                    break
            else:
                data = await asyncio.wait_for(reader.read(65536), timeout)
                if not data:
                    break
            buf += data
            if result["ttfb"] is None and b"data:" in buf:
                result["ttfb"] = time.perf_counter() - t0
                shared.first += 1
                counted = True
                if shared.first >= shared.n:
                    shared.all_open.set()
            if b"data: [DONE]" in buf:
                result["done"] = True
            buf = buf[-64:]
        result["ok"] = result["status"] == 200 and result["done"]
    except Exception as e:  # noqa: BLE001 - reported, not raised
        result["error"] = "%s: %s" % (type(e).__name__, e)
    finally:
        if not counted:
            # A failed stream never counts as open; don't make the sampler wait for it.
            shared.n -= 1
            if shared.first >= shared.n:
                shared.all_open.set()
        if writer is not None:
            writer.close()
    return result


async def sampler(pid, shared, out, stop):
    peak = 0
    while not stop.is_set():
        r = rss_kb(pid)
        if r:
            peak = max(peak, r)
        if shared.all_open.is_set() and out.get("rss_all_open_kb") is None:
            out["rss_all_open_kb"] = rss_kb(pid)
            out["t_all_open"] = time.perf_counter()
        await asyncio.sleep(0.05)
    out["rss_peak_kb"] = peak or None


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--key", default="none")
    p.add_argument("--streams", type=int, default=500)
    p.add_argument("--hold", type=float, default=10.0)
    p.add_argument("--pid", type=int, default=0)
    p.add_argument("--sequential", action="store_true")
    p.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args()

    out = {"streams": args.streams, "hold_s": args.hold, "sequential": args.sequential,
           "rss_before_kb": rss_kb(args.pid), "rss_all_open_kb": None}
    shared = Shared(args.streams)
    stop = asyncio.Event()
    sample = asyncio.create_task(sampler(args.pid, shared, out, stop)) if args.pid else None
    t0 = time.perf_counter()
    if args.sequential:
        results = []
        for _ in range(args.streams):
            results.append(await one(args.url, args.key, args.hold, shared, args.timeout))
    else:
        results = await asyncio.gather(*[one(args.url, args.key, args.hold, shared, args.timeout)
                                         for _ in range(args.streams)])
    out["elapsed_s"] = round(time.perf_counter() - t0, 3)
    stop.set()
    if sample:
        await sample
    await asyncio.sleep(0.5)
    out["rss_after_kb"] = rss_kb(args.pid)
    if out.get("t_all_open"):
        out["all_open_after_s"] = round(out.pop("t_all_open") - t0, 3)
    ttfb = [r["ttfb"] * 1000 for r in results if r["ttfb"] is not None]
    out.update({
        "ok": sum(1 for r in results if r["ok"]),
        "done": sum(1 for r in results if r["done"]),
        "non_200": sum(1 for r in results if r["status"] not in (None, 200)),
        "errors": sum(1 for r in results if r["error"]),
        "first_error": next((r["error"] for r in results if r["error"]), None),
        "ttfb_ms": {
            "median": round(statistics.median(ttfb), 3) if ttfb else None,
            "p90": round(pct(ttfb, 90), 3) if ttfb else None,
            "p99": round(pct(ttfb, 99), 3) if ttfb else None,
            "max": round(max(ttfb), 3) if ttfb else None,
        },
    })
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
