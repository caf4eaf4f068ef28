#!/usr/bin/env python3
"""Helpers and the report of benches/load.sh (Python stdlib only).

  report.py freeport [N]                 N free loopback TCP ports, one per line
  report.py pgurl URL DBNAME             URL with its database replaced by DBNAME
  report.py record RESULTS k=v ...       one measured run -> a JSON line in RESULTS; prints a line
  report.py rate RESULTS DELAY_MS        the half-load offered rate: "RATE CONNECTIONS"
  report.py calibrate WRK_OUT RATE CONNS the connections that offer RATE, from a paced run
  report.py sse RESULTS k=v ...          the SSE scenario's client outputs -> a JSON line
  report.py summary RESULTS META.json    the Markdown report of everything in RESULTS

A run's wrk output must contain the `WRKJSON {...}` line that benches/load.sh's wrk script prints.
"""
import json
import socket
import statistics
import sys
from urllib.parse import urlsplit, urlunsplit

# What the names in RESULTS mean, in the order the tables list them.
LABELS = {
    "direct": "(a) direct to upstream",
    "nginx": "(b) nginx proxy_pass",
    "bare": "(c) bare pingora",
    "tollgate-sqlite": "(d) tollgate, SQLite",
    "tollgate-pg": "(e) tollgate, PostgreSQL",
}
TOLLGATES = ("tollgate-sqlite", "tollgate-pg")

# The goals.
GOAL_RATIO_NGINX = 1.0
GOAL_OVER_BARE = 0.10
GOAL_P99_ADDED_MS = 1.0
GOAL_STREAM_KIB = 64
GOAL_RSS_MIB = 64


def freeport(n=1):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def pgurl(url, db):
    u = urlsplit(url)
    return urlunsplit((u.scheme, u.netloc, "/" + db, u.query, u.fragment))


def wrkjson(path):
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("WRKJSON "):
                return json.loads(line[len("WRKJSON "):])
    raise SystemExit("no WRKJSON line in %s (did wrk fail?)" % path)


def kv(args):
    out = {}
    for a in args:
        k, _, v = a.partition("=")
        try:
            out[k] = int(v)
        except ValueError:
            try:
                out[k] = float(v)
            except ValueError:
                out[k] = v
    return out


def record(results, args):
    r = kv(args)
    w = wrkjson(r.pop("wrk"))
    r["wrk"] = w
    secs = w["duration_us"] / 1e6
    r["rps"] = w["requests"] / secs if secs else 0.0
    r["ok_2xx"] = w["requests"] - w["status"]
    tick_us = 1e6 / r.get("hz", 100)
    n = max(1, w["requests"])
    for what in ("proxy", "upstream", "db"):
        if "%s_ticks" % what in r:
            r["%s_cpu_us" % what] = r["%s_ticks" % what] * tick_us / n
    line = "  %-16s round %s: %9.0f req/s  p50 %7.3f ms  p99 %7.3f ms" % (
        r["config"], r.get("round", "-"), r["rps"], w["p50_us"] / 1e3, w["p99_us"] / 1e3)
    if "proxy_cpu_us" in r:
        line += "  cpu %6.1f us/req" % r["proxy_cpu_us"]
    if r.get("hwm_kb"):
        line += "  peak RSS %5.1f MiB" % (r["hwm_kb"] / 1024)
    errs = {k: w[k] for k in ("connect", "read", "write", "timeout", "status") if w[k]}
    if errs:
        line += "  wrk errors %s" % errs
    print(line)
    if "rows" in r:
        warm = wrkjson(r.pop("warm")) if "warm" in r else None
        seen = r["ok_2xx"] + (warm["requests"] - warm["status"] if warm else 0)
        conns = r.get("conns", 0) * (2 if warm else 1)
        served = r.get("upstream_served") if r["config"].startswith("tollgate") else None
        checks = [seen <= r["rows"] <= seen + conns, r.get("metered", 0) >= seen]
        if served is not None:
            checks.append(r["rows"] == served)
        r["row_check"] = all(checks) and r.get("stopped_cleanly", 1) == 1
        print("    usage rows: %s  (%d rows; wrk saw %d 2xx, so %d..%d expected -- up to one extra per"
              " connection in flight when wrk stopped; %s rows with tokens; upstream served %s;"
              " gateway stopped %s)" % (
                  "PASS" if r["row_check"] else "FAIL", r["rows"], seen, seen, seen + conns,
                  r.get("metered"), served if served is not None else "?",
                  "cleanly" if r.get("stopped_cleanly", 1) == 1 else "NOT cleanly"))
    with open(results, "a") as f:
        f.write(json.dumps(r) + "\n")


def load(results):
    with open(results) as f:
        return [json.loads(line) for line in f if line.strip()]


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def rate(results, delay_ms):
    """Half of the lowest tollgate median throughput, and the connections that offer it when each
    connection waits delay_ms between requests (plus about 0.5 ms of latency)."""
    runs = [r for r in load(results) if r["phase"] == "rps"]
    best = [med([r["rps"] for r in runs if r["config"] == c]) for c in TOLLGATES]
    best = [b for b in best if b]
    if not best:
        best = [med([r["rps"] for r in runs])]
    target = 0.5 * min(best)
    conns = max(1, round(target * (delay_ms + 0.5) / 1000.0))
    print("%d %d" % (target, conns))


def calibrate(wrk_out, target, conns):
    """The connections that offer `target` req/s, from a paced run that offered `conns`."""
    w = wrkjson(wrk_out)
    achieved = w["requests"] / (w["duration_us"] / 1e6)
    print(max(1, round(conns * target / achieved)) if achieved else conns)


def sse(results, args):
    r = kv(args)
    r["phase"] = "sse"
    for k in ("direct", "gateway", "direct_seq", "gateway_seq", "bare", "bare_seq"):
        if k in r:
            with open(r[k]) as f:
                r[k] = json.loads(f.read().strip().splitlines()[-1])
    g = r["gateway"]
    seen = g["ok"]
    r["row_check"] = r["rows"] == r["expected_rows"] and r.get("metered", 0) == r["rows"] \
        and seen == g["streams"]
    print("  SSE usage rows: %s  (%d rows, %d expected, %s with tokens; %d/%d streams completed)" % (
        "PASS" if r["row_check"] else "FAIL", r["rows"], r["expected_rows"], r.get("metered"),
        seen, g["streams"]))
    with open(results, "a") as f:
        f.write(json.dumps(r) + "\n")


def fmt(v, spec="%.1f", none="–"):
    return none if v is None else spec % v


def summary(results, meta_path):
    rows = load(results)
    with open(meta_path) as f:
        meta = json.load(f)
    out = []
    p = out.append
    rps_runs = [r for r in rows if r["phase"] == "rps"]
    configs = [c for c in LABELS if any(r["config"] == c for r in rps_runs)]
    agg = {}
    for c in configs:
        rs = [r for r in rps_runs if r["config"] == c]
        agg[c] = {
            "rounds": len(rs),
            "rps": med([r["rps"] for r in rs]),
            "rps_min": min(r["rps"] for r in rs),
            "rps_max": max(r["rps"] for r in rs),
            "p50": med([r["wrk"]["p50_us"] / 1e3 for r in rs]),
            "p99": med([r["wrk"]["p99_us"] / 1e3 for r in rs]),
            "cpu": med([r.get("proxy_cpu_us") for r in rs]),
            "up_cpu": med([r.get("upstream_cpu_us") for r in rs]),
            "db_cpu": med([r.get("db_cpu_us") for r in rs]),
            "hwm": max([r.get("hwm_kb") or 0 for r in rs]) / 1024 or None,
            "up_conns": med([r.get("upstream_conns") for r in rs]),
            "log_problems": med([r.get("log_problems", 0) for r in rs]),
            "errors": sum(r["wrk"][k] for r in rs for k in ("connect", "read", "write", "timeout")),
            "non2xx": sum(r["wrk"]["status"] for r in rs),
            "checks": [r["row_check"] for r in rs if "row_check" in r],
        }
    if configs:
        p("Throughput: %s rounds, interleaved, %s s each (after %s s of warm-up), wrk -t%s -c%s, "
          "one fresh proxy process per run.\n" % (meta["rounds"], meta["duration"], meta["warmup"],
                                                  meta["wrk_threads"], meta["connections"]))
        p("| configuration | req/s (median) | min–max | p50 ms | p99 ms | proxy CPU µs/req "
          "| upstream CPU µs/req | upstream connections opened | peak RSS MiB | usage rows |")
        p("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for c in configs:
            a = agg[c]
            cpu = fmt(a["cpu"])
            if a["db_cpu"] is not None:
                cpu += " (+%s in PostgreSQL)" % fmt(a["db_cpu"])
            check = "–"
            if a["checks"]:
                check = "%s (%d/%d runs)" % ("PASS" if all(a["checks"]) else "FAIL",
                                             sum(a["checks"]), len(a["checks"]))
            p("| %s | %s | %s–%s | %s | %s | %s | %s | %s | %s | %s |" % (
                LABELS[c], fmt(a["rps"], "%.0f"), fmt(a["rps_min"], "%.0f"),
                fmt(a["rps_max"], "%.0f"), fmt(a["p50"], "%.3f"), fmt(a["p99"], "%.3f"),
                cpu if c != "direct" else "– (no proxy)", fmt(a["up_cpu"]),
                fmt(a["up_conns"], "%.0f"), fmt(a["hwm"]) if c != "direct" else "–", check))
        errs = {c: (agg[c]["errors"], agg[c]["non2xx"]) for c in configs
                if agg[c]["errors"] or agg[c]["non2xx"]}
        if errs:
            p("\nwrk errors (socket errors, non-2xx): %s" % errs)
        probs = {c: agg[c]["log_problems"] for c in configs if agg[c]["log_problems"]}
        if probs:
            p("\nERROR/WARN lines in the gateway's log per run (median): %s" % ", ".join(
                "%s %.0f" % kv_ for kv_ in probs.items()))
        p("\nUpstream connections opened: new TCP connections the upstream accepted during a run "
          "(warm-up included); wrk opens %s per invocation, and the warm-up is a second one." % meta["connections"])
        p("")
        ratios = []
        for t in TOLLGATES:
            if t not in agg:
                continue
            for base in ("nginx", "direct", "bare"):
                if base in agg and agg[base]["rps"]:
                    rr = agg[t]["rps"] / agg[base]["rps"]
                    cr = (agg[t]["cpu"] / agg[base]["cpu"]
                          if agg[base]["cpu"] and agg[t]["cpu"] else None)
                    ratios.append("| %s / %s | %.2f× | %s |" % (
                        t, base, rr, fmt(cr, "%.2f×") if base != "direct" else "–"))
        if ratios:
            p("| ratio | req/s | proxy CPU per request |")
            p("|---|---:|---:|")
            out.extend(ratios)
            p("")

    lat = [r for r in rows if r["phase"] == "lat"]
    lat_agg = {}
    if lat:
        for c in LABELS:
            rs = [r for r in lat if r["config"] == c]
            if rs:
                lat_agg[c] = {"rps": med([r["rps"] for r in rs]),
                              "p50": med([r["wrk"]["p50_us"] / 1e3 for r in rs]),
                              "p99": med([r["wrk"]["p99_us"] / 1e3 for r in rs]),
                              "cpu": med([r.get("proxy_cpu_us") for r in rs])}
        first = lat[0]
        p("Latency at half load: offered about %s req/s (half the lowest tollgate median above) by "
          "wrk -c%s with a %s ms pause per connection between requests, %s s per configuration."
          "\n" % (first.get("target"), first.get("conns"), first.get("delay_ms"), meta["duration"]))
        p("| configuration | achieved req/s | p50 ms | p99 ms | p99 added over direct ms "
          "| proxy CPU µs/req |")
        p("|---|---:|---:|---:|---:|---:|")
        d = lat_agg.get("direct")
        for c, a in lat_agg.items():
            added = a["p99"] - d["p99"] if d and c != "direct" else None
            p("| %s | %s | %s | %s | %s | %s |" % (
                LABELS[c], fmt(a["rps"], "%.0f"), fmt(a["p50"], "%.3f"), fmt(a["p99"], "%.3f"),
                fmt(added, "%+.3f"), fmt(a["cpu"]) if c != "direct" else "–"))
        p("")

    sse_runs = [r for r in rows if r["phase"] == "sse"]
    s = sse_runs[-1] if sse_runs else None
    per_stream_kib = None
    if s:
        g, d = s["gateway"], s["direct"]
        before, during = g.get("rss_before_kb"), g.get("rss_all_open_kb")
        if before and during:
            per_stream_kib = (during - before) / g["streams"]
        p("SSE: %d streaming chat completions opened at once, directly, through the bare pingora "
          "proxy and through tollgate (SQLite); the upstream holds each %s s (a chunk a second, "
          "then `[DONE]`, after a usage chunk when the request asked for one: tollgate adds "
          "`stream_options.include_usage` and strips that chunk again). Through tollgate: %d "
          "completed, %d errors%s.\n" % (
              g["streams"], g["hold_s"], g["ok"], g["errors"],
              " (first: %s)" % g["first_error"] if g["first_error"] else ""))
        b = s.get("bare")
        bs, ds, gs = s.get("bare_seq"), s.get("direct_seq"), s.get("gateway_seq")

        def per_stream(x):
            if x and x.get("rss_before_kb") and x.get("rss_all_open_kb"):
                return (x["rss_all_open_kb"] - x["rss_before_kb"]) / x["streams"]
            return None

        def mib(x, k):
            return fmt(x.get(k) and x[k] / 1024, "%.1f") if x else "–"

        def ttfb(x, k):
            return fmt(x["ttfb_ms"][k], "%.2f") if x else "–"

        def over(x, k):
            if not x or x["ttfb_ms"][k] is None or d["ttfb_ms"][k] is None:
                return "–"
            return "%+.2f" % (x["ttfb_ms"][k] - d["ttfb_ms"][k])

        p("| measure | direct | bare pingora | tollgate |")
        p("|---|---:|---:|---:|")
        p("| proxy RSS before (idle, after %d warm-up and one-at-a-time streams), MiB | – | %s | %s |"
          % (s["expected_rows"] - g["streams"], mib(b, "rss_before_kb"), mib(g, "rss_before_kb")))
        p("| proxy RSS with all %d streams open, MiB | – | %s | %s |" % (
            g["streams"], mib(b, "rss_all_open_kb"), mib(g, "rss_all_open_kb")))
        p("| proxy peak RSS while open (sampled every 50 ms), MiB | – | %s | %s |" % (
            mib(b, "rss_peak_kb"), mib(g, "rss_peak_kb")))
        p("| proxy RSS after they all ended, MiB | – | %s | %s |" % (
            mib(b, "rss_after_kb"), mib(g, "rss_after_kb")))
        p("| **memory per open stream** ((open − before) / %d), KiB | – | %s | **%s** |" % (
            g["streams"], fmt(per_stream(b)), fmt(per_stream_kib)))
        p("| all %d streams had their first event after, s | %s | %s | %s |" % (
            g["streams"], d.get("all_open_after_s", "–") if d.get("all_open_after_s") else "–",
            b.get("all_open_after_s", "–") if b else "–", g.get("all_open_after_s", "–")))
        p("| TTFB with %d opened at once: median / p99, ms | %s / %s | %s / %s | %s / %s |" % (
            g["streams"], ttfb(d, "median"), ttfb(d, "p99"), ttfb(b, "median"), ttfb(b, "p99"),
            ttfb(g, "median"), ttfb(g, "p99")))
        p("| **TTFB overhead**, %d at once (median − direct median), ms | – | %s | **%s** |" % (
            g["streams"], over(b, "median"), over(g, "median")))
        if ds and gs:
            p("| TTFB one stream at a time (%d in a row): median, ms | %s | %s | %s |" % (
                gs["streams"], fmt(ds["ttfb_ms"]["median"], "%.3f"),
                fmt(bs["ttfb_ms"]["median"], "%.3f") if bs else "–",
                fmt(gs["ttfb_ms"]["median"], "%.3f")))
            p("| **TTFB overhead**, one at a time (median − direct median), ms | – | %s | **%s** |" % (
                "%+.3f" % (bs["ttfb_ms"]["median"] - ds["ttfb_ms"]["median"]) if bs else "–",
                "%+.3f" % (gs["ttfb_ms"]["median"] - ds["ttfb_ms"]["median"])))
        p("| streams completed (status 200 and [DONE]) | %d/%d | %s | %d/%d |" % (
            d["ok"], d["streams"], "%d/%d" % (b["ok"], b["streams"]) if b else "–",
            g["ok"], g["streams"]))
        p("| usage rows: one per stream through tollgate, each with tokens | – | – | %s (%d rows, %d "
          "expected) |" % ("PASS" if s["row_check"] else "FAIL", s["rows"], s["expected_rows"]))
        p("")

    # The goals, from whatever this run measured.
    goals = []
    main_t = next((t for t in ("tollgate-pg", "tollgate-sqlite") if t in agg), None)
    if main_t and "nginx" in agg:
        r = agg[main_t]["rps"] / agg["nginx"]["rps"]
        goals.append(("tollgate ≥ 1.0× nginx req/s with full metering on PostgreSQL",
                      r >= GOAL_RATIO_NGINX if main_t == "tollgate-pg" else None,
                      "%s / nginx = %.2f×%s" % (main_t, r, "" if main_t == "tollgate-pg" else
                                                " (PostgreSQL not run: TEST_DATABASE_URL unset)")))
    if main_t and "bare" in agg:
        for t in TOLLGATES:
            if t in agg:
                rr = agg["bare"]["rps"] / agg[t]["rps"] - 1
                cr = (agg[t]["cpu"] / agg["bare"]["cpu"] - 1
                      if agg[t]["cpu"] and agg["bare"]["cpu"] else None)
                goals.append(("tollgate adds ≤ 10%% over bare pingora (%s)" % t,
                              rr <= GOAL_OVER_BARE and (cr is None or cr <= GOAL_OVER_BARE),
                              "time per request +%.0f%% (req/s %.2f× bare), CPU per request %s" % (
                                  rr * 100, agg[t]["rps"] / agg["bare"]["rps"],
                                  "+%.0f%%" % (cr * 100) if cr is not None else "?")))
    if lat_agg and "direct" in lat_agg:
        for t in TOLLGATES:
            if t in lat_agg:
                added = lat_agg[t]["p99"] - lat_agg["direct"]["p99"]
                goals.append(("p99 added latency ≤ 1 ms at half max throughput (%s)" % t,
                              added <= GOAL_P99_ADDED_MS, "%+.3f ms" % added))
    if per_stream_kib is not None:
        goals.append(("≤ 64 KiB per open stream", per_stream_kib <= GOAL_STREAM_KIB,
                      "%.1f KiB" % per_stream_kib))
    peaks = [agg[t]["hwm"] for t in TOLLGATES if t in agg and agg[t]["hwm"]]
    if s and s["gateway"].get("rss_peak_kb"):
        peaks.append(s["gateway"]["rss_peak_kb"] / 1024)
    if peaks:
        goals.append(("gateway RSS ≤ 64 MiB", max(peaks) <= GOAL_RSS_MIB,
                      "peak %.1f MiB%s" % (max(peaks), " (incl. the SSE run)" if s else "")))
    checks = [r["row_check"] for r in rows if "row_check" in r]
    if checks:
        goals.append(("one usage row per 2xx response (every run)", all(checks),
                      "%d/%d runs pass" % (sum(checks), len(checks))))
    if goals:
        p("| goal | met? | measured |")
        p("|---|---|---|")
        for name, ok, what in goals:
            p("| %s | %s | %s |" % (name, {True: "yes", False: "**no**", None: "not measured"}[ok],
                                    what))
    print("\n".join(out))


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "freeport":
        print("\n".join(str(p) for p in freeport(int(args[0]) if args else 1)))
    elif cmd == "pgurl":
        print(pgurl(args[0], args[1]))
    elif cmd == "record":
        record(args[0], args[1:])
    elif cmd == "rate":
        rate(args[0], float(args[1]))
    elif cmd == "calibrate":
        calibrate(args[0], float(args[1]), int(args[2]))
    elif cmd == "sse":
        sse(args[0], args[1:])
    elif cmd == "summary":
        summary(args[0], args[1])
    else:
        raise SystemExit("unknown command %s" % cmd)


if __name__ == "__main__":
    main()
