#!/usr/bin/env python3
"""Helpers and the report of benches/load.sh (Python stdlib only).

  report.py freeport [N]                 N free loopback TCP ports, one per line
  report.py pgurl URL DBNAME             URL with its database replaced by DBNAME
  report.py record RESULTS k=v ...       one measured run -> a JSON line in RESULTS; prints a line
  report.py rate RESULTS DELAY_MS        the half-load offered rate: "RATE CONNECTIONS"
  report.py calibrate WRK_OUT RATE CONNS the connections that offer RATE, from a paced run
  report.py sse RESULTS k=v ...          the SSE scenario's client outputs -> a JSON line
  report.py summary RESULTS META.json    the Markdown report of everything in RESULTS
  report.py tomlmerge BASE.toml SNIPPET  BASE with SNIPPET's keys merged in (a stage's settings)
  report.py sysrecord RESULTS k=v ...    one strace -c / perf stat run -> a JSON line
  report.py syscalls RESULTS             the syscalls-per-request table
  report.py cgrecord RESULTS k=v ...     one callgrind dump -> a JSON line
  report.py callgrind RESULTS            the instructions-per-request table

A run's wrk output must contain the `WRKJSON {...}` line that benches/load.sh's wrk script prints.
"""
import json
import os
import re
import socket
import statistics
import sys
from urllib.parse import urlsplit, urlunsplit

# What the names in RESULTS mean, in the order the tables list them.
LABELS = {
    "direct": "(a) direct to upstream",
    "nginx": "(b) nginx proxy_pass",
    "bare": "(c) bare pingora",
    "hyper": "(c2) bare hyper",
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


def label(config):
    """A configuration's label; NAME+STAGE is NAME with that stage on."""
    base, _, stage = config.partition("+")
    return LABELS.get(base, base) + (" + stage `%s`" % stage if stage else "")


def ordered(configs):
    """configs in LABELS order, each stage variant right after its base."""
    present = set(configs)
    out = []
    for base in LABELS:
        if base in present:
            out.append(base)
        out.extend(sorted(c for c in present if c.startswith(base + "+")))
    return out


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
    for what in ("proxy", "upstream", "db", "proxy_user", "proxy_sys"):
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
    for k in ("direct", "gateway", "direct_seq", "gateway_seq", "bare", "bare_seq", "nginx",
              "nginx_seq", "hyper", "hyper_seq"):
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
    configs = ordered({r["config"] for r in rps_runs})
    agg = {}
    for c in configs:
        rs = [r for r in rps_runs if r["config"] == c]
        agg[c] = {
            "rounds": len(rs),
            "rps": med([r["rps"] for r in rs]),
            "rps_min": min(r["rps"] for r in rs),
            "rps_max": max(r["rps"] for r in rs),
            "rps_by_round": {r.get("round"): r["rps"] for r in rs},
            "p50": med([r["wrk"]["p50_us"] / 1e3 for r in rs]),
            "p99": med([r["wrk"]["p99_us"] / 1e3 for r in rs]),
            "cpu": med([r.get("proxy_cpu_us") for r in rs]),
            "ucpu": med([r.get("proxy_user_cpu_us") for r in rs]),
            "scpu": med([r.get("proxy_sys_cpu_us") for r in rs]),
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
          "(user / kernel) | upstream CPU µs/req | upstream connections opened | peak RSS MiB | usage rows |")
        p("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for c in configs:
            a = agg[c]
            cpu = fmt(a["cpu"])
            if a["ucpu"] is not None and a["scpu"] is not None:
                cpu += " (%s / %s)" % (fmt(a["ucpu"]), fmt(a["scpu"]))
            if a["db_cpu"] is not None:
                cpu += " (+%s in PostgreSQL)" % fmt(a["db_cpu"])
            check = "–"
            if a["checks"]:
                check = "%s (%d/%d runs)" % ("PASS" if all(a["checks"]) else "FAIL",
                                             sum(a["checks"]), len(a["checks"]))
            p("| %s | %s | %s–%s | %s | %s | %s | %s | %s | %s | %s |" % (
                label(c), fmt(a["rps"], "%.0f"), fmt(a["rps_min"], "%.0f"),
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
        # The engines against each other: what the engine alone costs.
        for a_, b_ in (("hyper", "bare"), ("hyper", "nginx"), ("bare", "nginx")):
            if a_ in agg and b_ in agg and agg[b_]["rps"]:
                cr = (agg[a_]["cpu"] / agg[b_]["cpu"]
                      if agg[a_]["cpu"] and agg[b_]["cpu"] else None)
                ratios.append("| %s / %s | %.2f× | %s |" % (
                    "bare " + a_ if a_ != "bare" else "bare pingora",
                    b_ if b_ != "bare" else "bare pingora", agg[a_]["rps"] / agg[b_]["rps"],
                    fmt(cr, "%.2f×")))
        for t in TOLLGATES:
            if t not in agg:
                continue
            for base in ("nginx", "direct", "bare", "hyper"):
                if base in agg and agg[base]["rps"]:
                    rr = agg[t]["rps"] / agg[base]["rps"]
                    cr = (agg[t]["cpu"] / agg[base]["cpu"]
                          if agg[base]["cpu"] and agg[t]["cpu"] else None)
                    ratios.append("| %s / %s | %.2f× | %s |" % (
                        t, {"bare": "bare pingora", "hyper": "bare hyper"}.get(base, base), rr, fmt(cr, "%.2f×") if base != "direct" else "–"))
        if ratios:
            p("| ratio | req/s | proxy CPU per request |")
            p("|---|---:|---:|")
            out.extend(ratios)
            p("")
        stage_table(p, agg, meta)

    lat = [r for r in rows if r["phase"] == "lat"]
    lat_agg = {}
    if lat:
        for c in ordered({r["config"] for r in lat}):
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
                label(c), fmt(a["rps"], "%.0f"), fmt(a["p50"], "%.3f"), fmt(a["p99"], "%.3f"),
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
        # (key in the SSE record, column title); the engines that did not run are left out.
        cols = [("direct", "direct")] + [
            (k, t) for k, t in (("nginx", "nginx (`proxy_buffering off`)"),
                                ("bare", "bare pingora"), ("hyper", "bare hyper"))
            if s.get(k)] + [("gateway", "tollgate")]
        p("SSE: %d streaming chat completions opened at once, directly, through %s and through "
          "tollgate (SQLite); the upstream holds each %s s (a chunk a second, then `[DONE]`, "
          "after a usage chunk when the request asked for one: tollgate adds "
          "`stream_options.include_usage` and strips that chunk again). Through tollgate: %d "
          "completed, %d errors%s.\n" % (
              g["streams"], ", ".join(t for k, t in cols[1:-1]) or "no baseline engine",
              g["hold_s"], g["ok"], g["errors"],
              " (first: %s)" % g["first_error"] if g["first_error"] else ""))

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

        def row(name, cell, bold_last=False):
            cells = ["–" if k == "direct" else cell(k) for k, _ in cols]
            if bold_last:
                cells[-1] = "**%s**" % cells[-1]
            p("| %s | %s |" % (name, " | ".join(cells)))

        p("| measure | %s |" % " | ".join(t for _, t in cols))
        p("|---|" + "---:|" * len(cols))
        row("proxy RSS before (idle, after the warm-up and one-at-a-time streams), MiB",
            lambda k: mib(s[k], "rss_before_kb"))
        row("proxy RSS with all %d streams open, MiB" % g["streams"],
            lambda k: mib(s[k], "rss_all_open_kb"))
        row("proxy peak RSS while open (sampled every 50 ms), MiB",
            lambda k: mib(s[k], "rss_peak_kb"))
        row("proxy RSS after they all ended, MiB", lambda k: mib(s[k], "rss_after_kb"))
        row("**memory per open stream** ((open − before) / %d), KiB" % g["streams"],
            lambda k: fmt(per_stream(s[k])), bold_last=True)
        p("| all %d streams had their first event after, s | %s |" % (
            g["streams"], " | ".join(str(s[k].get("all_open_after_s") or "–") for k, _ in cols)))
        p("| TTFB with %d opened at once: median / p99, ms | %s |" % (
            g["streams"], " | ".join("%s / %s" % (ttfb(s[k], "median"), ttfb(s[k], "p99"))
                                     for k, _ in cols)))
        row("**TTFB overhead**, %d at once (median − direct median), ms" % g["streams"],
            lambda k: over(s[k], "median"), bold_last=True)
        seq = {k: s.get("gateway_seq" if k == "gateway" else k + "_seq") for k, _ in cols}
        if seq["direct"] and seq["gateway"]:
            dm = seq["direct"]["ttfb_ms"]["median"]
            p("| TTFB one stream at a time (%d in a row): median, ms | %s |" % (
                seq["gateway"]["streams"], " | ".join(
                    fmt(seq[k]["ttfb_ms"]["median"], "%.3f") if seq[k] else "–" for k, _ in cols)))
            row("**TTFB overhead**, one at a time (median − direct median), ms",
                lambda k: "%+.3f" % (seq[k]["ttfb_ms"]["median"] - dm) if seq[k] else "–",
                bold_last=True)
        p("| streams completed (status 200 and [DONE]) | %s |" % " | ".join(
            "%d/%d" % (s[k]["ok"], s[k]["streams"]) for k, _ in cols))
        p("| usage rows: one per stream through tollgate, each with tokens | %s%s (%d rows, %d "
          "expected) |" % ("– | " * (len(cols) - 1), "PASS" if s["row_check"] else "FAIL",
                           s["rows"], s["expected_rows"]))
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


def criterion_ns(root, bench_id):
    """The median of a criterion bench (`group/function`) in ns, or None if it has not run."""
    if not root or not bench_id or bench_id == "-":
        return None
    path = os.path.join(root, *bench_id.split("/"), "new", "estimates.json")
    try:
        with open(path) as f:
            return json.load(f)["median"]["point_estimate"]
    except (OSError, ValueError, KeyError):
        return None


def stage_table(p, agg, meta):
    """The per-stage budget: each stage's criterion ns and its tollgate CPU on − off."""
    stages = [x.split(":", 1) for x in meta.get("stages", "").split()]
    requested = meta.get("features", "").split()
    unknown = meta.get("unknown_features", "").split()
    p("Per-stage budget (`LOAD_FEATURES`; a stage is defined by one `stage` line in "
      "benches/load.sh).\n")
    if not stages:
        p("**No stages are defined yet**, so there is nothing to compare: every tollgate run "
          "above is the all-off baseline%s.\n" % (
              " (LOAD_FEATURES named %s, not defined)" % ", ".join("`%s`" % u for u in unknown)
              if unknown else ""))
    bases = [t for t in TOLLGATES if t in agg]
    if not bases:
        p("No tollgate configuration ran (LOAD_CONFIGS), so there is no baseline to compare "
          "stages against.\n")
        return
    p("| stage | criterion bench | ns (criterion median) | %s |" % " | ".join(
        "%s: CPU µs/req off → on (added) | %s: req/s on / off (medians; per round: median, "
        "min–max)" % (t, t) for t in bases))
    p("|---|---|---:|" + "---:|---:|" * len(bases))
    p("| (all off) | – | – | %s |" % " | ".join(
        "%s | 1.00×" % fmt(agg[t]["cpu"]) for t in bases))
    for name, bench in stages:
        cells = []
        for t in bases:
            on = agg.get("%s+%s" % (t, name))
            if not on:
                cells.append("not run (not in LOAD_FEATURES) | –")
                continue
            added = on["cpu"] - agg[t]["cpu"] if on["cpu"] and agg[t]["cpu"] else None
            # Rounds interleave off and on, so a round's ratio is measured under the same
            # conditions: their median is steadier on a noisy machine than a ratio of medians.
            off_by, on_by = agg[t]["rps_by_round"], on["rps_by_round"]
            paired = sorted(on_by[k] / off_by[k] for k in on_by if off_by.get(k))
            per_round = "; %s, %s–%s" % (fmt(med(paired), "%.3f×"), fmt(paired[0], "%.2f"),
                                         fmt(paired[-1], "%.2f×")) if paired else ""
            cells.append("%s → %s (%s) | %s%s" % (
                fmt(agg[t]["cpu"]), fmt(on["cpu"]), fmt(added, "%+.1f"),
                fmt(on["rps"] / agg[t]["rps"] if agg[t]["rps"] else None, "%.2f×"), per_round))
        ns = criterion_ns(meta.get("criterion"), bench)
        p("| `%s` | %s | %s | %s |" % (
            name, "`%s`" % bench if bench != "-" else "–",
            fmt(ns, "%.0f", "– (run `cargo bench`)") if bench != "-" else "–", " | ".join(cells)))
    if requested:
        p("\nLOAD_FEATURES ran: %s." % ", ".join("`%s`" % f for f in requested))
    if unknown and stages:
        p("\nLOAD_FEATURES named stages that are not defined (ignored): %s." % ", ".join(
            "`%s`" % u for u in unknown))
    p("")


def tomlmerge(base_path, snippet):
    """BASE with SNIPPET merged in, as text: keys under a table BASE already has go to the end of
    that table; new tables (and keys before any header, which go to the top) are added."""
    with open(base_path) as f:
        base = f.read().splitlines()
    header = re.compile(r"^\s*\[([^\[\]]+)\]\s*(#.*)?$")
    parts, current = {}, None
    order = []
    for line in snippet.splitlines():
        m = header.match(line)
        if m:
            current = m.group(1).strip()
            if current not in parts:
                order.append(current)
                parts[current] = []
            continue
        if current is None and None not in parts:
            order.append(None)
            parts[None] = []
        parts[current].append(line)
    tables = {}
    current = None
    for i, line in enumerate(base):
        m = header.match(line)
        if m:
            current = m.group(1).strip()
            tables[current] = i
    out = list(base)
    # Insert from the bottom up so earlier indexes stay valid.
    inserts = []
    for t in order:
        if t is None:
            inserts.append((0, parts[None]))
        elif t in tables:
            start = tables[t]
            end = next((j for j in range(start + 1, len(base)) if header.match(base[j])), len(base))
            while end > start + 1 and not base[end - 1].strip():
                end -= 1
            inserts.append((end, parts[t]))
    for at, lines in sorted(inserts, key=lambda x: -x[0]):
        out[at:at] = lines
    for t in order:
        if t is not None and t not in tables:
            out += ["", "[%s]" % t] + parts[t]
    print("\n".join(out))


# System calls that read from or write to a socket. Plain read/write are left out: on these
# proxies they go to eventfds (a wake-up of another thread's or a parked runtime's epoll) and
# log or database files, never to sockets (tokio sends with sendto, hyper with writev, nginx
# with writev; all receive with recvfrom).
READS = ("readv", "recvfrom", "recvmsg")
WRITES = ("writev", "sendto", "sendmsg")


def sysrecord(results, args):
    """One `strace -c -f` or `perf stat` run: calls per syscall over `requests` requests."""
    r = kv(args)
    r["phase"] = "syscalls"
    r["wrk"] = wrkjson(r.pop("wrk"))
    calls, errors = {}, {}
    with open(r["file"], errors="replace") as f:
        text = f.read()
    if r["tool"] == "strace":
        # % time  seconds  usecs/call  calls  errors  syscall
        for line in text.splitlines():
            m = re.match(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(\d*)\s*([a-z_0-9]+)\s*$", line)
            if m and m.group(3) != "total":
                calls[m.group(3)] = int(m.group(1))
                errors[m.group(3)] = int(m.group(2) or 0)
    else:
        # perf stat -x,: count,unit,event,...
        for line in text.splitlines():
            f_ = line.split(",")
            if len(f_) > 2 and f_[0].strip().isdigit():
                ev = f_[2]
                name = "(all)" if ev == "raw_syscalls:sys_enter" else ev.replace(
                    "syscalls:sys_enter_", "")
                if ":" not in ev and not ev.startswith("syscalls"):
                    name = "[%s]" % ev  # a software event, not a syscall
                calls[name] = int(f_[0])
    r["calls"], r["errors"] = calls, errors
    n = max(1, r["requests"])
    total = calls.get("(all)", sum(v for k, v in calls.items() if k != "(all)"))
    print("  %-16s %-6s %7d requests: %5.2f syscalls/req, writes %4.2f, reads %4.2f" % (
        r["config"], r["tool"], r["requests"], total / n,
        sum(calls.get(k, 0) for k in WRITES) / n, sum(calls.get(k, 0) for k in READS) / n))
    with open(results, "a") as f:
        f.write(json.dumps(r) + "\n")


def syscalls(results):
    runs = [r for r in load(results) if r["phase"] == "syscalls"]
    out = []
    p = out.append
    for tool in ("strace", "perf"):
        rs = {r["config"]: r for r in runs if r["tool"] == tool}
        if not rs:
            continue
        configs = ordered(rs)
        names = set()
        for r in rs.values():
            names.update(k for k, v in r["calls"].items() if k != "(all)" and v)
        # The syscalls that matter: at least 0.01 per request somewhere, most frequent first.
        per = {c: {k: v / max(1, rs[c]["requests"]) for k, v in rs[c]["calls"].items()}
               for c in configs}
        names = sorted((k for k in names if max(per[c].get(k, 0) for c in configs) >= 0.01),
                       key=lambda k: -max(per[c].get(k, 0) for c in configs))
        if tool == "strace":
            p("`strace -c -f` attached to every thread (it slows each syscall down, so more "
              "requests wait per wake-up than in a normal run: epoll calls per request are lower "
              "bounds). Calls per request; in brackets, the calls that failed (EAGAIN). Plain "
              "`write`/`read` are eventfd wake-ups and files, not sockets.\n")
        else:
            p("`perf stat` on the syscall tracepoints (`raw_syscalls:sys_enter` for the total), "
              "a separate fresh process per proxy; little overhead. Calls per request. Plain "
              "`write`/`read` are eventfd wake-ups and files, not sockets.\n")
        p("| syscall | %s |" % " | ".join(label(c) for c in configs))
        p("|---|" + "---:|" * len(configs))
        p("| requests measured | %s |" % " | ".join(str(rs[c]["requests"]) for c in configs))
        p("| req/s while traced | %s |" % " | ".join(
            "%.0f" % (rs[c]["wrk"]["requests"] / (rs[c]["wrk"]["duration_us"] / 1e6))
            for c in configs))

        def total(c):
            if "(all)" in per[c]:
                return per[c]["(all)"]
            return sum(v for k, v in per[c].items() if not k.startswith("["))

        p("| **all syscalls** | %s |" % " | ".join("**%.2f**" % total(c) for c in configs))
        p("| **socket writes** (%s) | %s |" % ("+".join(WRITES), " | ".join(
            "**%.2f**" % sum(per[c].get(k, 0) for k in WRITES) for c in configs)))
        p("| **socket reads** (%s) | %s |" % ("+".join(READS), " | ".join(
            "**%.2f**" % sum(per[c].get(k, 0) for k in READS) for c in configs)))
        soft = sorted({k for c in configs for k in per[c] if k.startswith("[")})
        for k in soft:
            p("| %s (not a syscall) | %s |" % (k.strip("[]"), " | ".join(
                "%.2f" % per[c].get(k, 0) for c in configs)))
        names = [k for k in names if not k.startswith("[")]
        for k in names:
            cells = []
            for c in configs:
                v = per[c].get(k, 0)
                e = rs[c].get("errors", {}).get(k, 0) / max(1, rs[c]["requests"])
                cells.append(("%.2f" % v) + (" (%.2f)" % e if e >= 0.005 else ""))
            p("| `%s` | %s |" % (k, " | ".join(cells)))
        p("")
    print("\n".join(out))


def cg_totals(path):
    """The instructions (Ir) in a callgrind dump: its `totals:` line (else `summary:`)."""
    ir = None
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("totals:") or (ir is None and line.startswith("summary:")):
                ir = int(line.split()[1])
    return ir


def cgrecord(results, args):
    r = kv(args)
    r["phase"] = "callgrind"
    r["wrk"] = wrkjson(r.pop("wrk"))
    r["ir"] = cg_totals(r["file"])
    r["idle_ir"] = cg_totals(r["idle_file"]) if r.get("idle_file") else None
    n = r["requests"]
    r["ir_per_req"] = r["ir"] / n if r["ir"] and n > 0 else None
    r["idle_ir_per_s"] = (r["idle_ir"] / r["idle_secs"]
                          if r["idle_ir"] is not None and r.get("idle_secs") else None)
    r["ir_per_req_net"] = None
    if r["ir_per_req"] is not None and r["idle_ir_per_s"] is not None:
        r["ir_per_req_net"] = (r["ir"] - r["idle_ir_per_s"] * r["window_secs"]) / n
    print("  %-16s %7d requests, %s Ir: %s Ir/req (%s without the idle %s Ir/s)" % (
        r["config"], n, r["ir"], fmt(r["ir_per_req"], "%.0f"), fmt(r["ir_per_req_net"], "%.0f"),
        fmt(r["idle_ir_per_s"], "%.0f")))
    with open(results, "a") as f:
        f.write(json.dumps(r) + "\n")


def callgrind(results):
    runs = {r["config"]: r for r in load(results) if r["phase"] == "callgrind"}
    out = []
    p = out.append
    configs = ordered(runs)
    key = "ir_per_req_net"
    ref = {c: runs[c].get(key) for c in configs}
    p("| configuration | requests | req/s under callgrind | Ir (loaded window) | idle Ir/s "
      "| Ir/req (raw) | **Ir/req, idle subtracted** | vs nginx | vs bare pingora |")
    p("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in configs:
        r = runs[c]

        def vs(b):
            return fmt(r[key] / ref[b], "%.2f×") if ref.get(b) and r.get(key) else "–"

        p("| %s | %d | %.0f | %s | %s | %s | **%s** | %s | %s |" % (
            label(c), r["requests"], r["wrk"]["requests"] / (r["wrk"]["duration_us"] / 1e6),
            r["ir"], fmt(r.get("idle_ir_per_s"), "%.0f"), fmt(r["ir_per_req"], "%.0f"),
            fmt(r.get(key), "%.0f"), vs("nginx"), vs("bare")))
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
    elif cmd == "tomlmerge":
        tomlmerge(args[0], args[1])
    elif cmd == "sysrecord":
        sysrecord(args[0], args[1:])
    elif cmd == "syscalls":
        syscalls(args[0])
    elif cmd == "cgrecord":
        cgrecord(args[0], args[1:])
    elif cmd == "callgrind":
        callgrind(args[0])
    else:
        raise SystemExit("unknown command %s" % cmd)


if __name__ == "__main__":
    main()
