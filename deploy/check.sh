#!/usr/bin/env bash
# Validates everything under deploy/ that can be validated without a container engine or cluster:
#
#   bash deploy/check.sh
#
# One line per check ("ok" or "FAIL" plus the tool's output); exits non-zero at the first failure.
# Missing tools are installed with apt-get (Debian/Ubuntu, as root): prometheus (promtool),
# docker-compose, systemd (systemd-analyze), python3-yaml, shellcheck, curl. Running it again
# installs nothing new.
#
# Metric names used by the dashboard and the alert rules are checked against deploy/metrics.txt,
# or, when TOLLGATE_METRICS_URL is set (e.g. http://127.0.0.1:9090/metrics of a running
# tollgate), against the metric families that endpoint reports ("# TYPE name ...").
#
# Set CHECK_DOCKER_BUILD=1 to also build the image when a Docker engine is reachable (slow: a
# release build with fat LTO).
set -euo pipefail

DEPLOY="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$DEPLOY")"
cd "$ROOT"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

export DEBIAN_FRONTEND=noninteractive

# ------------------------------------------------------------------------------------------------
# Tools
# ------------------------------------------------------------------------------------------------
apt_updated=0
apt_install() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "FAIL install $*: not root; install these packages and run again" >&2
    exit 1
  fi
  if [ "$apt_updated" -eq 0 ]; then
    apt-get update -qq >"$WORK/apt.log" 2>&1 || { cat "$WORK/apt.log" >&2; exit 1; }
    apt_updated=1
  fi
  echo "installing: $*"
  apt-get install -y -qq --no-install-recommends "$@" >"$WORK/apt.log" 2>&1 \
    || { cat "$WORK/apt.log" >&2; exit 1; }
}

# need COMMAND PACKAGE: install PACKAGE when COMMAND is not on PATH.
need() {
  command -v "$1" >/dev/null 2>&1 || apt_install "$2"
}

need promtool prometheus
need docker-compose docker-compose
need systemd-analyze systemd
need shellcheck shellcheck
if [ -n "${TOLLGATE_METRICS_URL:-}" ]; then need curl curl; fi

# A Python 3.11+ (tomllib) that can import yaml: the one on PATH, else Debian's with python3-yaml.
PY=""
for cand in python3 /usr/bin/python3; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import yaml, tomllib' >/dev/null 2>&1; then
    PY="$cand"
    break
  fi
done
if [ -z "$PY" ]; then
  apt_install python3 python3-yaml
  PY=/usr/bin/python3
  "$PY" -c 'import yaml, tomllib' || { echo "FAIL python: need Python >= 3.11 with PyYAML" >&2; exit 1; }
fi

# ------------------------------------------------------------------------------------------------
# Runner: check NAME COMMAND... prints "ok   NAME" or "FAIL NAME" and the output, then exits 1.
# ------------------------------------------------------------------------------------------------
checks=0
check() {
  local name="$1"
  shift
  if "$@" >"$WORK/out" 2>&1; then
    checks=$((checks + 1))
    if [ -s "$WORK/out" ] && grep -q '^info:' "$WORK/out"; then
      printf 'ok   %s (%s)\n' "$name" "$(grep '^info:' "$WORK/out" | sed 's/^info: //' | paste -sd ';' -)"
    else
      printf 'ok   %s\n' "$name"
    fi
  else
    printf 'FAIL %s\n' "$name"
    sed 's/^/     /' "$WORK/out"
    exit 1
  fi
}

# Python checks, one per subcommand (see the end of this file for the code).
pycheck() {
  "$PY" - "$ROOT" "$WORK" "$@" <<'PYEOF'
import json, os, re, sys, tomllib
import yaml

root, work, cmd = sys.argv[1], sys.argv[2], sys.argv[3]
args = sys.argv[4:]
deploy = os.path.join(root, "deploy")

def die(msg):
    print(msg)
    sys.exit(1)

class UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that rejects duplicate mapping keys (PyYAML silently keeps the last one)."""

def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)

UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

def load_yaml_all(path):
    with open(path) as f:
        return [d for d in yaml.load_all(f, Loader=UniqueKeyLoader) if d is not None]

def rel(path):
    return os.path.relpath(path, root)

# ---- metric names -----------------------------------------------------------------------------
METRIC_RE = re.compile(r"\btollgate_[a-z0-9_]+")
SUFFIXES = ("_bucket", "_sum", "_count")

def known_metrics(path):
    names = set()
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                names.add(line)
    if not names:
        die(f"no metric names in {path}")
    return names

def unknown_names(exprs, known):
    used, bad = set(), set()
    for e in exprs:
        for name in METRIC_RE.findall(e):
            base = name
            if name not in known:
                for s in SUFFIXES:
                    if name.endswith(s) and name[: -len(s)] in known:
                        base = name[: -len(s)]
                        break
            used.add(base)
            if base not in known:
                bad.add(name)
    return used, bad

def dashboard_exprs(d):
    """Every PromQL string of the dashboard: panel targets, annotations, variable queries."""
    out = []
    def walk(o):
        if isinstance(o, dict):
            for k, v in o.items():
                if k in ("expr", "definition") and isinstance(v, str):
                    out.append(v)
                elif k == "query" and isinstance(v, str) and o.get("type") != "datasource":
                    out.append(v)
                elif k == "query" and isinstance(v, dict) and isinstance(v.get("query"), str):
                    out.append(v["query"])
                else:
                    walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)
    walk(d)
    return out

def alert_exprs(path):
    exprs = []
    for doc in load_yaml_all(path):
        for g in doc.get("groups", []):
            for r in g.get("rules", []):
                exprs.append(r["expr"])
    return exprs

# ---- config key sets --------------------------------------------------------------------------
# Keys a deployment config may have beyond the repository's config.toml: the metrics and admin
# listeners, and upstream accounts (only an example comment in config.toml).
EXTRA_KEYS = {"metrics.listen", "admin.listen"} | {
    f"upstream_accounts[].{k}" for k in
    ("name", "type", "base_url", "api_key", "header", "priority", "weight", "is_active", "email")}

def flatten(d, prefix=""):
    keys = set()
    for k, v in d.items():
        p = f"{prefix}{k}"
        if isinstance(v, dict):
            keys |= flatten(v, p + ".")
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for x in v:
                keys |= flatten(x, p + "[].")
        else:
            keys.add(p)
    return keys

def check_config(name, text, base):
    try:
        cfg = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        die(f"{name}: {e}")
    keys = flatten(cfg)
    missing = sorted(base - keys)
    unknown = sorted(k for k in keys - base - EXTRA_KEYS
                     if not k.startswith(("prices.", "default_prices.")))
    if missing:
        die(f"{name}: keys of config.toml missing here: {', '.join(missing)}")
    if unknown:
        die(f"{name}: keys unknown to config.toml (tollgate rejects unknown fields): {', '.join(unknown)}")
    for sect in ("server", "metrics", "admin"):
        listen = cfg.get(sect, {}).get("listen", "")
        if not listen.startswith("0.0.0.0:"):
            die(f"{name}: [{sect}] listen = {listen!r}: a container must listen on 0.0.0.0")
    spool = cfg["writer"]["spool_dir"]
    if not spool.startswith("/var/lib/tollgate/"):
        die(f"{name}: [writer] spool_dir = {spool!r}: expected under /var/lib/tollgate/")
    return cfg

def configmap_toml():
    for doc in load_yaml_all(os.path.join(deploy, "k8s", "configmap.yaml")):
        if doc.get("kind") == "ConfigMap":
            return doc["data"]["config.toml"]
    die("k8s/configmap.yaml: no ConfigMap with data.config.toml")

# ---- subcommands ------------------------------------------------------------------------------
if cmd == "configs":
    with open(os.path.join(root, "config.toml"), "rb") as f:
        base = flatten(tomllib.load(f))
    with open(os.path.join(deploy, "config.docker.toml")) as f:
        docker = check_config("deploy/config.docker.toml", f.read(), base)
    k8s = check_config("deploy/k8s/configmap.yaml config.toml", configmap_toml(), base)
    if docker["server"]["grace_period_secs"] != k8s["server"]["grace_period_secs"]:
        die("grace_period_secs differs between config.docker.toml and the ConfigMap")
    print(f"info: {len(base)} keys of config.toml present in both")

elif cmd == "yaml":
    # Everything YAML outside k8s/ (which has its own check): parses, no duplicate keys.
    n = 0
    for dirpath, _, files in os.walk(deploy):
        if os.path.join(deploy, "k8s") in dirpath:
            continue
        for fn in sorted(files):
            if fn.endswith((".yml", ".yaml")):
                p = os.path.join(dirpath, fn)
                try:
                    load_yaml_all(p)
                except yaml.YAMLError as e:
                    die(f"{rel(p)}: {e}")
                n += 1
    print(f"info: {n} files")

elif cmd == "k8s":
    kdir = os.path.join(deploy, "k8s")
    objs = {}
    n = 0
    for fn in sorted(os.listdir(kdir)):
        if not fn.endswith((".yml", ".yaml")):
            continue
        p = os.path.join(kdir, fn)
        try:
            docs = load_yaml_all(p)
        except yaml.YAMLError as e:
            die(f"{rel(p)}: {e}")
        if not docs:
            die(f"{rel(p)}: no documents")
        for i, d in enumerate(docs):
            if not isinstance(d, dict) or not d.get("apiVersion") or not d.get("kind"):
                die(f"{rel(p)} document {i + 1}: missing apiVersion or kind")
            if d["kind"] != "Kustomization":
                md = d.get("metadata") or {}
                if not md.get("name"):
                    die(f"{rel(p)} document {i + 1}: missing metadata.name")
                if "namespace" in md:
                    die(f"{rel(p)} {d['kind']}/{md['name']}: manifests are namespace-less")
                objs[(d["kind"], md["name"])] = (fn, d)
            else:
                objs[("Kustomization", fn)] = (fn, d)
            n += 1
    # Cross-references.
    dep = objs.get(("Deployment", "tollgate"))
    if not dep:
        die("no Deployment tollgate")
    spec = dep[1]["spec"]["template"]["spec"]
    c = spec["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    if ports != {"proxy": 8080, "metrics": 9090, "admin": 9091}:
        die(f"deployment ports: {ports}")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        g = c[probe]["httpGet"]
        if g["path"] != path or ports.get(g["port"], g["port"]) != 9090:
            die(f"{probe}: expected GET {path} on 9090, got {g}")
    sec = objs.get(("Secret", "tollgate-secrets"))
    if not sec:
        die("no Secret tollgate-secrets (secret.example.yaml)")
    sec_keys = set(sec[1].get("stringData", {})) | set(sec[1].get("data", {}))
    for e in c.get("env", []):
        ref = (e.get("valueFrom") or {}).get("secretKeyRef")
        if ref:
            if ref["name"] != "tollgate-secrets" or ref["key"] not in sec_keys:
                die(f"env {e['name']}: secretKeyRef {ref} not in secret.example.yaml")
    for v in spec["volumes"]:
        if "configMap" in v and ("ConfigMap", v["configMap"]["name"]) not in objs:
            die(f"volume {v['name']}: ConfigMap {v['configMap']['name']} not defined")
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    if "/var/lib/tollgate/spool" not in mounts or "/etc/tollgate" not in mounts:
        die(f"volume mounts: {sorted(mounts)}")
    sc = c["securityContext"]
    if not (sc.get("readOnlyRootFilesystem") and spec["securityContext"].get("runAsNonRoot")):
        die("expected readOnlyRootFilesystem and runAsNonRoot")
    labels = dep[1]["spec"]["template"]["metadata"]["labels"]
    for (kind, name), (fn, d) in objs.items():
        if kind == "Service":
            sel = d["spec"]["selector"]
            if any(labels.get(k) != v for k, v in sel.items()):
                die(f"Service {name}: selector {sel} does not match the pod labels")
            for p in d["spec"]["ports"]:
                if p["targetPort"] not in ports and p["targetPort"] not in ports.values():
                    die(f"Service {name}: targetPort {p['targetPort']} is no container port")
            if d["spec"].get("type", "ClusterIP") != "ClusterIP" and any(
                    ports.get(p["targetPort"], p["targetPort"]) == 9091 for p in d["spec"]["ports"]):
                die(f"Service {name}: the admin port must stay ClusterIP")
        if kind == "Kustomization":
            for r in d.get("resources", []):
                if not os.path.exists(os.path.join(kdir, r)):
                    die(f"{fn}: resource {r} does not exist")
            if "secret.example.yaml" in d.get("resources", []):
                die(f"{fn}: must not include the placeholder Secret")
    print(f"info: {n} documents")

elif cmd == "grace":
    # SIGKILL must come after tollgate's own drain: grace_period_secs (+ preStop in k8s).
    with open(os.path.join(deploy, "config.docker.toml"), "rb") as f:
        grace = tomllib.load(f)["server"]["grace_period_secs"]
    unit = open(os.path.join(deploy, "tollgate.service")).read()
    m = re.search(r"^TimeoutStopSec=(\d+)$", unit, re.M)
    if not m or int(m.group(1)) <= grace:
        die(f"tollgate.service TimeoutStopSec must exceed grace_period_secs={grace}")
    compose = load_yaml_all(os.path.join(deploy, "docker-compose.yml"))[0]
    sgp = compose["services"]["tollgate"].get("stop_grace_period", "10s")
    if not sgp.endswith("s") or int(sgp[:-1]) <= grace:
        die(f"docker-compose.yml stop_grace_period {sgp} must exceed {grace}s")
    dep = [d for d in load_yaml_all(os.path.join(deploy, "k8s", "deployment.yaml"))
           if d["kind"] == "Deployment"][0]["spec"]["template"]["spec"]
    pre = 0
    cmdline = (dep["containers"][0].get("lifecycle", {}).get("preStop", {})
               .get("exec", {}).get("command", []))
    if cmdline[:1] == ["/bin/sleep"]:
        pre = int(cmdline[1])
    if dep["terminationGracePeriodSeconds"] <= grace + pre:
        die(f"terminationGracePeriodSeconds must exceed grace {grace}s + preStop {pre}s")
    print(f"info: drain {grace}s; systemd {m.group(1)}s, compose {sgp}, k8s {dep['terminationGracePeriodSeconds']}s")

elif cmd == "dashboard":
    known = known_metrics(args[0])
    p = os.path.join(deploy, "grafana", "tollgate-dashboard.json")
    try:
        with open(p) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        die(f"{rel(p)}: {e}")
    for k in ("uid", "title", "panels", "schemaVersion"):
        if k not in d:
            die(f"dashboard: missing {k}")
    ids = [pn["id"] for pn in d["panels"]]
    if len(ids) != len(set(ids)):
        die("dashboard: duplicate panel ids")
    # The datasource variable must default to the provisioned datasource's uid.
    prov = load_yaml_all(os.path.join(deploy, "grafana", "provisioning", "datasources", "prometheus.yml"))[0]
    uids = {ds["uid"] for ds in prov["datasources"]}
    var = [v for v in d["templating"]["list"] if v["type"] == "datasource"]
    if not var or var[0]["current"]["value"] not in uids:
        die(f"dashboard datasource variable must default to a provisioned uid {sorted(uids)}")
    for pn in d["panels"]:
        if pn["type"] == "row":
            continue
        if not pn.get("targets"):
            die(f"panel {pn['title']!r}: no queries")
        for ds in [pn.get("datasource")] + [t.get("datasource") for t in pn["targets"]]:
            if ds != {"type": "prometheus", "uid": "${datasource}"}:
                die(f"panel {pn['title']!r}: datasource {ds} is not the ${{datasource}} variable")
    exprs = dashboard_exprs(d)
    used, bad = unknown_names(exprs, known)
    if not used:
        die("dashboard: no tollgate_* metric found in its queries")
    if bad:
        die(f"dashboard: unknown metrics {sorted(bad)} (not in {args[1]})")
    # PromQL of every query, Grafana's variables replaced, for promtool to parse.
    rules = []
    for i, e in enumerate(exprs):
        if e.startswith("label_values("):
            continue
        e = (e.replace("$__rate_interval", "1m").replace("$__range", "1h")
              .replace("$__interval", "1m").replace("$instance", ".*"))
        rules.append({"record": f"dashboard:query_{i}", "expr": e})
    with open(os.path.join(work, "dashboard_rules.yml"), "w") as f:
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
    print(f"info: {len(d['panels'])} panels, {len(used)} metrics, all known")

elif cmd == "alerts":
    known = known_metrics(args[0])
    exprs = alert_exprs(os.path.join(deploy, "alerts.yml"))
    used, bad = unknown_names(exprs, known)
    if not used:
        die("alerts.yml: no tollgate_* metric found")
    if bad:
        die(f"alerts.yml: unknown metrics {sorted(bad)} (not in {args[1]})")
    print(f"info: {len(exprs)} rules, {len(used)} metrics, all known")

elif cmd == "dockerfile":
    # Every COPY source (other than --from=stage) exists in the build context (the repo root) and
    # is let in by the allowlist in Dockerfile.dockerignore.
    text = open(os.path.join(deploy, "Dockerfile")).read()
    allow = [l[1:].strip().rstrip("/") for l in open(os.path.join(deploy, "Dockerfile.dockerignore"))
             if l.startswith("!")]
    n = 0
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0] != "COPY" or any(p.startswith("--from") for p in parts):
            continue
        srcs = [p for p in parts[1:-1] if not p.startswith("--")]
        for s in srcs:
            s = s.rstrip("/")
            if not os.path.exists(os.path.join(root, s)):
                die(f"Dockerfile: COPY source {s} does not exist in the repository")
            if not any(s == a or s.startswith(a + "/") for a in allow):
                die(f"Dockerfile: COPY source {s} is excluded by Dockerfile.dockerignore")
            n += 1
    # Cargo refuses a manifest whose declared [[bench]] files are missing: they must be copied.
    with open(os.path.join(root, "Cargo.toml"), "rb") as f:
        cargo = tomllib.load(f)
    for b in cargo.get("bench", []):
        path = b.get("path", f"benches/{b['name']}.rs")
        if not path.startswith("benches/") or "COPY benches" not in text:
            die(f"Dockerfile: bench {b['name']} ({path}) is not copied into the builder")
    for k in ("USER 10001", "EXPOSE 8080 9090 9091", 'ENTRYPOINT ["tollgate"]', 'CMD ["serve"]',
              "ENV TOLLGATE_CONFIG=/etc/tollgate/config.toml", "STOPSIGNAL SIGTERM",
              "cargo build --release --locked"):
        if k not in text:
            die(f"Dockerfile: expected {k!r}")
    print(f"info: {n} COPY sources present and allowed")

else:
    die(f"unknown check {cmd}")
PYEOF
}

# ------------------------------------------------------------------------------------------------
# Metric list: live /metrics when TOLLGATE_METRICS_URL is set, else deploy/metrics.txt.
# ------------------------------------------------------------------------------------------------
if [ -n "${TOLLGATE_METRICS_URL:-}" ]; then
  METRICS_FILE="$WORK/metrics.live"
  metrics_source="$TOLLGATE_METRICS_URL"
  fetch_metrics() {
    curl -fsS --max-time 10 "$TOLLGATE_METRICS_URL" >"$WORK/metrics.raw"
    awk '$1 == "#" && $2 == "TYPE" { print $3 }' "$WORK/metrics.raw" | sort -u >"$METRICS_FILE"
    [ -s "$METRICS_FILE" ] || { echo "no '# TYPE' lines in $TOLLGATE_METRICS_URL"; return 1; }
    echo "info: $(wc -l <"$METRICS_FILE") metric families"
  }
  check "fetch metric names from $TOLLGATE_METRICS_URL" fetch_metrics
else
  METRICS_FILE="$DEPLOY/metrics.txt"
  metrics_source="deploy/metrics.txt"
fi

# ------------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------------
check "shellcheck deploy/check.sh" shellcheck -x "$DEPLOY/check.sh"

check "promtool check config deploy/prometheus.yml (with its rule_files)" \
  promtool check config "$DEPLOY/prometheus.yml"
check "promtool check rules deploy/alerts.yml" promtool check rules "$DEPLOY/alerts.yml"
check "alerts.yml metric names known ($metrics_source)" pycheck alerts "$METRICS_FILE" "$metrics_source"
check "promtool test rules deploy/alerts_test.yml (alerts fire as intended)" \
  promtool test rules "$DEPLOY/alerts_test.yml"

check "dashboard JSON, datasource uid, metric names known ($metrics_source)" \
  pycheck dashboard "$METRICS_FILE" "$metrics_source"
check "dashboard queries are valid PromQL (promtool)" \
  promtool check rules "$WORK/dashboard_rules.yml"

check "YAML files parse without duplicate keys (compose, prometheus, grafana)" pycheck yaml

# Placeholder secrets only for rendering; compose's own .env handling is tested separately.
compose_env=(TOLLGATE_ADMIN_TOKEN=check TOLLGATE_MASTER_KEY=check OPENAI_API_KEY=check POSTGRES_PASSWORD=check
             GRAFANA_ADMIN_PASSWORD=check)
compose_ok() {
  env "${compose_env[@]}" docker-compose -f "$DEPLOY/docker-compose.yml" config -q
}
check "docker-compose -f deploy/docker-compose.yml config -q" compose_ok
compose_requires_secrets() {
  : >"$WORK/empty.env"
  if env -u TOLLGATE_ADMIN_TOKEN -u TOLLGATE_MASTER_KEY -u OPENAI_API_KEY -u POSTGRES_PASSWORD -u GRAFANA_ADMIN_PASSWORD \
      docker-compose --env-file "$WORK/empty.env" -f "$DEPLOY/docker-compose.yml" config -q \
      >"$WORK/compose.out" 2>&1; then
    echo "docker-compose rendered the file without any secret set"
    return 1
  fi
  grep -q "in deploy/.env" "$WORK/compose.out" || { cat "$WORK/compose.out"; return 1; }
}
check "docker-compose refuses to start without the secrets in deploy/.env" compose_requires_secrets

# systemd-analyze verify fails when ExecStart's binary is missing, and tollgate is not installed
# here: verify a copy whose ExecStart runs /bin/true instead, everything else unchanged.
unit_copy() {
  mkdir -p "$WORK/unit"
  sed 's#^ExecStart=/usr/local/bin/tollgate #ExecStart=/bin/true #' \
    "$DEPLOY/tollgate.service" >"$WORK/unit/tollgate.service"
  grep -q '^ExecStart=/bin/true ' "$WORK/unit/tollgate.service" \
    || { echo "ExecStart=/usr/local/bin/tollgate ... not found in tollgate.service"; return 1; }
}
# verify exits 0 even for unknown directives and unparsable values (it only logs "ignoring"), so
# any output at all counts as a failure.
unit_verify() {
  unit_copy
  systemd-analyze verify "$WORK/unit/tollgate.service" >"$WORK/verify.out" 2>&1 \
    || { cat "$WORK/verify.out"; return 1; }
  if [ -s "$WORK/verify.out" ]; then cat "$WORK/verify.out"; return 1; fi
}
check "systemd-analyze verify deploy/tollgate.service" unit_verify
unit_security() {
  unit_copy
  # Overall exposure, 0 (locked down) .. 10 (unprotected); threshold is in tenths.
  systemd-analyze security --offline=yes --threshold=20 "$WORK/unit/tollgate.service" \
    >"$WORK/security.out" 2>&1 || { cat "$WORK/security.out"; return 1; }
  echo "info: $(grep -o 'exposure level for [^:]*: .*' "$WORK/security.out" | sed 's/.*: //')"
}
if systemd-analyze security --help 2>/dev/null | grep -q -- '--offline'; then
  check "systemd-analyze security: exposure <= 2.0" unit_security
else
  echo "skip systemd-analyze security --offline (systemd < 250)"
fi

check "tollgate configs (config.docker.toml, k8s ConfigMap) parse, keys match config.toml" \
  pycheck configs
check "k8s manifests parse (apiVersion/kind) and cross-reference" pycheck k8s
check "stop timeouts exceed the drain grace period (systemd, compose, k8s)" pycheck grace
check "Dockerfile COPY sources exist and pass Dockerfile.dockerignore" pycheck dockerfile

if [ "${CHECK_DOCKER_BUILD:-0}" = 1 ] && command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  check "docker build -f deploy/Dockerfile ." \
    env DOCKER_BUILDKIT=1 docker build -f "$DEPLOY/Dockerfile" -t tollgate:check "$ROOT"
else
  echo "skip docker build (needs a Docker engine and CHECK_DOCKER_BUILD=1)"
fi

echo "$checks checks passed"
