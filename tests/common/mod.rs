//! Test harness: a recording mock upstream (hyper), a real `tollgate serve` process that binds
//! port 0 and says which ports it got once it is ready, and a fresh SQLite file or PostgreSQL
//! database per test.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

pub fn fixture(name: &str) -> Bytes {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    Bytes::from(std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

// ---------------------------------------------------------------- mock upstream

/// What a mock upstream waits on before it sends the rest of a response. Once opened it stays
/// open: an `open` that comes before a `wait` is not lost (as `Notify::notify_waiters` would lose
/// it when the mock has not polled yet).
#[derive(Clone)]
pub struct Gate(Arc<watch::Sender<bool>>);

impl Default for Gate {
    fn default() -> Gate {
        Gate(Arc::new(watch::channel(false).0))
    }
}

impl Gate {
    pub fn new() -> Gate {
        Gate::default()
    }

    pub fn open(&self) {
        self.0.send_replace(true);
    }

    pub async fn wait(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|open| *open).await;
    }
}

#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

pub enum Reply {
    Json(u16, Bytes),
    /// Status with extra headers and a body.
    Status(u16, Vec<(&'static str, String)>, Bytes),
    /// `text/event-stream`: the first chunk at once, the rest after `gate` opens.
    Sse {
        first: Bytes,
        rest: Vec<Bytes>,
        gate: Gate,
    },
}

type Handler = Arc<dyn Fn(&Recorded) -> Reply + Send + Sync>;

pub struct MockUpstream {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<Recorded>>>,
    /// TCP connections accepted so far.
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl MockUpstream {
    pub async fn start(
        handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static,
    ) -> MockUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let handler: Handler = Arc::new(handler);
        let recorded = requests.clone();
        let connections: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let accepted = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let handler = handler.clone();
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let handler = handler.clone();
                        let recorded = recorded.clone();
                        async move { Ok::<_, Infallible>(serve_one(req, &handler, &recorded).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        MockUpstream {
            addr,
            requests,
            connections,
            task,
        }
    }

    /// Answers every request with the JSON fixture and status 200.
    pub async fn json_ok() -> MockUpstream {
        let body = fixture("chat_completion.json");
        MockUpstream::start(move |_| Reply::Json(200, body.clone())).await
    }

    pub async fn status(code: u16) -> MockUpstream {
        MockUpstream::start(move |_| {
            Reply::Json(
                code,
                Bytes::from_static(br#"{"error":{"message":"upstream says no"}}"#),
            )
        })
        .await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    pub fn recorded(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_one(
    req: Request<Incoming>,
    handler: &Handler,
    recorded: &Mutex<Vec<Recorded>>,
) -> Response<BoxBody<Bytes, Infallible>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let rec = Recorded {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or("/".into(), |p| p.to_string()),
        headers: parts.headers,
        body,
    };
    let reply = handler(&rec);
    recorded.lock().unwrap().push(rec);
    match reply {
        Reply::Json(status, body) => Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(body).boxed())
            .unwrap(),
        Reply::Status(status, headers, body) => {
            let mut b = Response::builder().status(status);
            for (k, v) in headers {
                b = b.header(k, v);
            }
            b.body(Full::new(body).boxed()).unwrap()
        }
        Reply::Sse { first, rest, gate } => {
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(16);
            tokio::spawn(async move {
                let _ = tx.send(Ok(Frame::data(first))).await;
                gate.wait().await;
                for chunk in rest {
                    let _ = tx.send(Ok(Frame::data(chunk))).await;
                }
            });
            sse_response(rx)
        }
    }
}

fn sse_response(
    rx: mpsc::Receiver<Result<Frame<Bytes>, Infallible>>,
) -> Response<BoxBody<Bytes, Infallible>> {
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .body(BodyExt::boxed(StreamBody::new(tokio_stream_from(rx))))
        .unwrap()
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + Sync {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

// ---------------------------------------------------------------- databases

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// `TEST_DATABASE_URL`, or None when PostgreSQL tests should be skipped. Under `CI=true` a
/// missing PostgreSQL fails the test instead.
pub fn postgres_base_url() -> Option<String> {
    match std::env::var("TEST_DATABASE_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true but TEST_DATABASE_URL is not set: PostgreSQL tests must run in CI")
        }
        _ => None,
    }
}

/// A database for one test, removed when dropped.
pub struct TestDb {
    pub url: String,
    kind: Db,
    pg_admin_url: Option<String>,
    pg_name: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    /// None: PostgreSQL requested but not configured (skip).
    pub async fn new(kind: Db) -> Option<TestDb> {
        match kind {
            Db::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}", dir.path().join("tollgate.db").display());
                Some(TestDb {
                    url,
                    kind,
                    pg_admin_url: None,
                    pg_name: None,
                    _dir: Some(dir),
                })
            }
            Db::Postgres => {
                let base = postgres_base_url()?;
                let name = format!("tollgate_t_{}", uuid::Uuid::now_v7().simple());
                let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&base)
                    .await
                    .unwrap_or_else(|e| {
                        panic!("cannot reach PostgreSQL at TEST_DATABASE_URL: {e}")
                    });
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await
                    .unwrap();
                let url = match base.rfind('/') {
                    Some(i) if base[..i].contains("://") && i > base.find("://").unwrap() + 2 => {
                        format!("{}/{name}", &base[..i])
                    }
                    _ => format!("{base}/{name}"),
                };
                Some(TestDb {
                    url,
                    kind,
                    pg_admin_url: Some(base),
                    pg_name: Some(name),
                    _dir: None,
                })
            }
        }
    }

    pub async fn exec(&self, sql: &str) {
        match self.kind {
            Db::Sqlite => {
                let mut c = <sqlx::SqliteConnection as sqlx::Connection>::connect(&self.url)
                    .await
                    .unwrap();
                sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
                    .execute(&mut c)
                    .await
                    .unwrap();
            }
            Db::Postgres => {
                let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(&self.url)
                    .await
                    .unwrap();
                sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
                    .execute(&mut c)
                    .await
                    .unwrap();
            }
        }
    }
}

impl TestDb {
    /// The first column of every row of `sql`, as text.
    pub async fn texts(&self, sql: &str) -> Vec<String> {
        let sql = sqlx::AssertSqlSafe(sql.to_string());
        match self.kind {
            Db::Sqlite => {
                let mut c = <sqlx::SqliteConnection as sqlx::Connection>::connect(&self.url)
                    .await
                    .unwrap();
                sqlx::query_scalar(sql).fetch_all(&mut c).await.unwrap()
            }
            Db::Postgres => {
                let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(&self.url)
                    .await
                    .unwrap();
                sqlx::query_scalar(sql).fetch_all(&mut c).await.unwrap()
            }
        }
    }

    /// What a dump would show: every column of every row of every table, as text.
    pub async fn dump(&self) -> String {
        let mut out = String::new();
        match self.kind {
            Db::Sqlite => {
                for table in self
                    .texts("SELECT name FROM sqlite_master WHERE type = 'table'")
                    .await
                {
                    let columns = self
                        .texts(&format!("SELECT name FROM pragma_table_info('{table}')"))
                        .await;
                    let row = columns
                        .iter()
                        .map(|c| format!("coalesce(CAST(\"{c}\" AS TEXT), '')"))
                        .collect::<Vec<_>>()
                        .join(" || '|' || ");
                    // As bytes: a BLOB column need not be UTF-8.
                    let mut c = <sqlx::SqliteConnection as sqlx::Connection>::connect(&self.url)
                        .await
                        .unwrap();
                    let sql = format!("SELECT CAST({row} AS BLOB) FROM \"{table}\"");
                    let lines: Vec<Vec<u8>> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                        .fetch_all(&mut c)
                        .await
                        .unwrap();
                    for line in lines {
                        out.push_str(&format!("{table}: {}\n", String::from_utf8_lossy(&line)));
                    }
                }
            }
            Db::Postgres => {
                for table in self
                    .texts("SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public'")
                    .await
                {
                    for line in self.texts(&format!("SELECT t::text FROM \"{table}\" t")).await {
                        out.push_str(&format!("{table}: {line}\n"));
                    }
                }
            }
        }
        out
    }
}

/// One usage row as the tests check it.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub request_id: String,
    pub api_key_id: i64,
    pub upstream_account_id: Option<i64>,
    pub model: Option<String>,
    pub status_code: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cached_tokens: i64,
    pub cache_creation_tokens: i64,
    pub tokens_used: i64,
    pub cost: rust_decimal::Decimal,
    pub error_message: Option<String>,
    pub requested_model: Option<String>,
    pub usage_source: Option<String>,
    pub upstream_error: Option<String>,
}

impl TestDb {
    pub async fn rows(&self) -> Vec<Row> {
        use sqlx::Row as _;
        let sql = "SELECT request_id, api_key_id, upstream_account_id, model, status_code, prompt_tokens, completion_tokens, \
                   cached_tokens, cache_creation_tokens, tokens_used, CAST(cost AS TEXT) AS cost, error_message, \
                   requested_model, usage_source, upstream_error FROM usage_records ORDER BY id";
        macro_rules! read {
            ($conn:expr) => {
                sqlx::query(sql)
                    .fetch_all(&mut $conn)
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| Row {
                        request_id: r.get("request_id"),
                        api_key_id: r.get("api_key_id"),
                        upstream_account_id: r.get("upstream_account_id"),
                        model: r.get("model"),
                        status_code: r.get::<i32, _>("status_code") as i64,
                        prompt_tokens: r.get("prompt_tokens"),
                        completion_tokens: r.get("completion_tokens"),
                        cached_tokens: r.get("cached_tokens"),
                        cache_creation_tokens: r.get("cache_creation_tokens"),
                        tokens_used: r.get("tokens_used"),
                        cost: r.get::<String, _>("cost").parse().unwrap(),
                        error_message: r.get("error_message"),
                        requested_model: r.get("requested_model"),
                        usage_source: r.get("usage_source"),
                        upstream_error: r.get("upstream_error"),
                    })
                    .collect()
            };
        }
        match self.kind {
            Db::Sqlite => {
                let mut c = <sqlx::SqliteConnection as sqlx::Connection>::connect(&self.url)
                    .await
                    .unwrap();
                read!(c)
            }
            Db::Postgres => {
                let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(&self.url)
                    .await
                    .unwrap();
                read!(c)
            }
        }
    }

    /// The metering invariants, through the same code `tollgate usage --check` uses.
    pub async fn invariants(&self) -> tollgate::store::InvariantReport {
        let store = tollgate::store::Store::connect(&self.url, 1).await.unwrap();
        let report = store.usage_invariants().await.unwrap();
        store.close().await;
        report
    }

    pub async fn scalar(&self, sql: &str) -> i64 {
        match self.kind {
            Db::Sqlite => {
                let mut c = <sqlx::SqliteConnection as sqlx::Connection>::connect(&self.url)
                    .await
                    .unwrap();
                sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
                    .fetch_one(&mut c)
                    .await
                    .unwrap()
            }
            Db::Postgres => {
                let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(&self.url)
                    .await
                    .unwrap();
                sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
                    .fetch_one(&mut c)
                    .await
                    .unwrap()
            }
        }
    }
}

impl TestDb {
    /// The same database, for a second instance; only the original drops it.
    pub fn share(&self) -> TestDb {
        TestDb {
            url: self.url.clone(),
            kind: self.kind,
            pg_admin_url: None,
            pg_name: None,
            _dir: None,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let (Some(admin), Some(name)) = (self.pg_admin_url.take(), self.pg_name.take()) {
            // A separate thread: Drop may run inside a runtime.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    if let Ok(mut c) =
                        <sqlx::PgConnection as sqlx::Connection>::connect(&admin).await
                    {
                        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                        )))
                        .execute(&mut c)
                        .await;
                    }
                });
            })
            .join();
        }
    }
}

// ---------------------------------------------------------------- the gateway

pub const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// A config directory plus, once started, a running `tollgate serve`.
pub struct Gateway {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub addr: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub metrics_addr: SocketAddr,
    /// The admin API (on when `admin_token` is set).
    pub admin_addr: SocketAddr,
    pub admin_token: Option<String>,
    /// `RUST_LOG` of `tollgate serve` (default `info`).
    pub rust_log: String,
    pub db: TestDb,
    /// Extra environment of every `tollgate` this runs (`cli` and `start`), e.g.
    /// `TOLLGATE_MASTER_KEY`; the master key variables are otherwise removed.
    pub env: Vec<(&'static str, String)>,
    child: Option<Child>,
}

/// Removes what the test's own environment might pass down about master keys, then sets `env`.
fn with_env<'a>(cmd: &'a mut Command, env: &[(&'static str, String)]) -> &'a mut Command {
    cmd.env_remove("TOLLGATE_MASTER_KEY")
        .env_remove("TOLLGATE_OLD_MASTER_KEY")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
}

/// Before `start`: every listener binds port 0; `start` learns the ports tollgate got.
const UNBOUND: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

impl Gateway {
    /// Writes the config (`extra` is appended: more sections or `[[upstream_accounts]]`).
    pub async fn new(kind: Db, server_extra: &str, extra: &str) -> Option<Gateway> {
        let db = TestDb::new(kind).await?;
        let dir = tempfile::tempdir().unwrap();
        let (addr, metrics_addr, admin_addr) = (UNBOUND, UNBOUND, UNBOUND);
        let config = dir.path().join("config.toml");
        let text = format!(
            "[server]\nlisten = \"{addr}\"\nthreads = 2\ngrace_period_secs = 10\n{server_extra}\n\n[database]\nurl = \"{}\"\n\n[upstream]\nconnect_timeout_ms = 1000\nread_timeout_secs = 10\n\n[writer]\nspool_dir = \"{}\"\nflush_interval_ms = 50\n\n[metrics]\nlisten = \"{metrics_addr}\"\n\n[admin]\nlisten = \"{admin_addr}\"\n\n{extra}\n",
            db.url,
            dir.path().join("spool").display()
        );
        std::fs::write(&config, text).unwrap();
        Some(Gateway {
            dir,
            config,
            addr,
            metrics_addr,
            admin_addr,
            admin_token: None,
            rust_log: "info".into(),
            db,
            env: Vec::new(),
            child: None,
        })
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        with_env(&mut Command::new(BIN), &self.env)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env_remove("TOLLGATE_DATABASE_URL")
            .output()
            .unwrap()
    }

    /// Grants `amount` of credit to `email` (`tollgate credits grant`): prepaid from then on.
    /// Returns stdout's last line (the new balance).
    pub fn grant(&self, email: &str, amount: &str) -> String {
        self.cli_ok(&["credits", "grant", "--user", email, "--amount", amount])
    }

    /// Runs a CLI command that must succeed and print JSON; returns the whole of stdout, parsed.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `tollgate usage --check` passes: every metering and spend invariant holds.
    pub fn assert_invariants(&self) {
        let check = self.cli(&["usage", "--check"]);
        assert!(
            check.status.success(),
            "usage --check: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
    }

    /// Runs a CLI command that must succeed; returns stdout's last line.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "tollgate {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .last()
            .unwrap_or("")
            .to_string()
    }

    pub fn add_user(&self, email: &str) {
        let username = email.split('@').next().unwrap();
        self.cli_ok(&["users", "add", "--email", email, "--username", username]);
    }

    pub fn create_key(&self, email: &str, extra: &[&str]) -> String {
        let mut args = vec!["keys", "create", "--user", email, "--name", "test"];
        args.extend_from_slice(extra);
        self.cli_ok(&args)
    }

    pub fn add_account(
        &self,
        name: &str,
        kind: &str,
        url: &str,
        secret: &str,
        priority: i32,
        weight: i32,
    ) -> i64 {
        let w = weight.to_string();
        self.add_account_with(name, kind, url, secret, priority, &["--weight", &w])
    }

    /// `accounts add` with more flags (`--weight`, limits); returns the account's id.
    pub fn add_account_with(
        &self,
        name: &str,
        kind: &str,
        url: &str,
        secret: &str,
        priority: i32,
        extra: &[&str],
    ) -> i64 {
        let p = priority.to_string();
        let mut args = vec![
            "accounts",
            "add",
            "--name",
            name,
            "--type",
            kind,
            "--base-url",
            url,
            "--api-key",
            secret,
            "--priority",
            &p,
        ];
        args.extend_from_slice(extra);
        self.cli_ok(&args).parse().unwrap()
    }

    /// Starts `tollgate serve` and waits for its ready line, which names the ports it bound
    /// (`tollgate ready proxy=… metrics=… admin=…`). Its log goes to `serve.log`.
    pub async fn start(&mut self) {
        use std::io::{BufRead, Write};
        let log_path = self.dir.path().join("serve.log");
        let mut log = std::fs::File::create(&log_path).unwrap();
        let mut child = with_env(&mut Command::new(BIN), &self.env)
            .arg("--config")
            .arg(&self.config)
            .arg("serve")
            .env_remove("TOLLGATE_DATABASE_URL")
            .env(
                "TOLLGATE_ADMIN_TOKEN",
                self.admin_token.as_deref().unwrap_or(""),
            )
            .env("RUST_LOG", &self.rust_log)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        self.child = Some(child);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<String>();
        std::thread::spawn(move || {
            let mut ready_tx = Some(ready_tx);
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(log, "{line}");
                if let Some(at) = line.find("tollgate ready ") {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(line[at..].to_string());
                    }
                }
            }
            // Dropping an unsent `ready_tx` tells `start` the process ended first.
        });
        let line = match tokio::time::timeout(Duration::from_secs(60), ready_rx).await {
            Ok(Ok(line)) => line,
            Ok(Err(_)) => panic!("tollgate exited before it was ready: {}", self.log()),
            Err(_) => panic!("tollgate was not ready within 60 s: {}", self.log()),
        };
        let field = |name: &str| -> Option<SocketAddr> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
        };
        self.addr = field("proxy").unwrap_or_else(|| panic!("no proxy address in {line:?}"));
        self.metrics_addr =
            field("metrics").unwrap_or_else(|| panic!("no metrics address in {line:?}"));
        if let Some(admin) = field("admin") {
            self.admin_addr = admin;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap();
        child.wait().unwrap()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Declares a test body once and instantiates it for SQLite and PostgreSQL.
#[macro_export]
macro_rules! both_dbs {
    ($name:ident, $body:ident) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                $body(common::Db::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if common::postgres_base_url().is_none() {
                    eprintln!("skipped: TEST_DATABASE_URL is not set");
                    return;
                }
                $body(common::Db::Postgres).await
            }
        }
    };
}

// ---------------------------------------------------------------- a database outage on demand

/// A TCP relay in front of PostgreSQL that the test can cut (existing connections dropped, new
/// ones refused) and restore: the test's own database becomes unreachable without touching the
/// shared server.
pub struct TcpCutter {
    pub addr: SocketAddr,
    up: Arc<std::sync::atomic::AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpCutter {
    pub async fn start(target: SocketAddr) -> TcpCutter {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (u, c) = (up.clone(), conns.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !u.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let h = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                c.lock().unwrap().push(h.abort_handle());
            }
        });
        TcpCutter {
            addr,
            up,
            conns,
            task,
        }
    }

    pub fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }

    pub fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for TcpCutter {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

/// Host and port of a postgres URL (`postgres://user@host:port/db`).
pub fn pg_socket(url: &str) -> SocketAddr {
    let rest = url.split("://").nth(1).unwrap();
    let hostport = rest.split('/').next().unwrap().rsplit('@').next().unwrap();
    let hostport = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:5432")
    };
    std::net::ToSocketAddrs::to_socket_addrs(&hostport)
        .unwrap()
        .next()
        .unwrap()
}

/// Request ids of the records in the spool directory.
pub fn spooled_ids(dir: &std::path::Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".spool"))
        .filter_map(|e| tollgate::spool::Spool::read_segment(&e.path()).ok())
        .flat_map(|s| s.records)
        .map(|r| {
            serde_json::from_slice::<tollgate::record::UsageRecord>(&r)
                .unwrap()
                .request_id
        })
        .collect()
}

/// Records in the spool directory (closed and open segments), read with tollgate's own reader.
pub fn spooled_records(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".spool"))
        .map(|e| {
            tollgate::spool::Spool::read_segment(&e.path())
                .map(|s| s.records.len())
                .unwrap_or(0)
        })
        .sum()
}

impl Gateway {
    /// Rewrites the config's database URL (e.g. to go through a [`TcpCutter`]).
    pub fn set_database_url(&self, url: &str) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let text = text.replace(
            &format!("url = \"{}\"", self.db.url),
            &format!("url = \"{url}\""),
        );
        std::fs::write(&self.config, text).unwrap();
    }

    /// Puts a [`TcpCutter`] between the gateway and its PostgreSQL database (before `start`): the
    /// test can then cut the database off and restore it.
    pub async fn through_cutter(&self) -> TcpCutter {
        let cutter = TcpCutter::start(pg_socket(&self.db.url)).await;
        let via_cutter = self
            .db
            .url
            .replace(
                &pg_socket(&self.db.url).to_string(),
                &cutter.addr.to_string(),
            )
            .replace("localhost:5432", &cutter.addr.to_string());
        self.set_database_url(&via_cutter);
        cutter
    }

    /// Status of one chat completion sent with `key` (a fixed small body).
    pub async fn chat_status(&self, key: &str) -> u16 {
        reqwest::Client::new()
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(key)
            .body(r#"{"model":"gpt-4o-mini"}"#)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// Sends `request` (bytes as given: clients would normalise what some tests must send as is)
    /// on a new connection and returns everything read until the gateway closes it.
    pub async fn raw_exchange(&self, request: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        conn.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        let _ = conn.read_to_end(&mut response).await;
        String::from_utf8_lossy(&response).into_owned()
    }

    /// Adds a setting to the config's `[admin]` section (before `start`).
    pub fn set_admin(&self, line: &str) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        std::fs::write(
            &self.config,
            text.replacen("[admin]\n", &format!("[admin]\n{line}\n"), 1),
        )
        .unwrap();
    }

    /// A second instance on the same database, with its own ports and spool.
    pub async fn sibling(&self) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let (addr, metrics_addr, admin_addr) = (UNBOUND, UNBOUND, UNBOUND);
        let text = std::fs::read_to_string(&self.config).unwrap().replace(
            &self.spool_dir().display().to_string(),
            &dir.path().join("spool").display().to_string(),
        );
        let config = dir.path().join("config.toml");
        std::fs::write(&config, text).unwrap();
        // The instances share the master key (on PostgreSQL its default file is beside the config).
        let key = self.dir.path().join("tollgate.key");
        if key.exists() {
            std::fs::copy(&key, dir.path().join("tollgate.key")).unwrap();
        }
        Gateway {
            dir,
            config,
            addr,
            metrics_addr,
            admin_addr,
            admin_token: self.admin_token.clone(),
            rust_log: self.rust_log.clone(),
            db: self.db.share(),
            env: self.env.clone(),
            child: None,
        }
    }

    /// GET on the metrics listener.
    pub async fn scrape(&self, path: &str) -> (u16, String) {
        let r = reqwest::get(format!("http://{}{}", self.metrics_addr, path))
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// The value of one sample in a Prometheus text exposition (0 when absent).
    pub fn sample(exposition: &str, series: &str) -> f64 {
        exposition
            .lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }

    /// A request to the admin API.
    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r =
            reqwest::Client::new().request(method, format!("http://{}{}", self.admin_addr, path));
        match &self.admin_token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    pub fn signal(&self, sig: &str) {
        Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
    }

    /// Adds `key = value` lines to the config's `[writer]` section.
    pub fn set_writer(&self, lines: &str) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let text = text.replacen(
            "flush_interval_ms = 50\n",
            &format!("flush_interval_ms = 50\n{lines}\n"),
            1,
        );
        std::fs::write(&self.config, text).unwrap();
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.dir.path().join("spool")
    }

    /// SIGKILL: no shutdown steps run.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

// ---------------------------------------------------------------- streams that end early

/// A raw-TCP SSE upstream for streams that end badly. Each request gets `first` at once; after
/// `gate` opens, a request whose body contains `cut` has its connection dropped mid-body,
/// any other gets `chunk` every 10 ms until the gateway stops reading.
pub struct RawSseUpstream {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl RawSseUpstream {
    pub async fn start(first: Bytes, chunk: Bytes, gate: Gate) -> RawSseUpstream {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let (first, chunk, gate) = (first.clone(), chunk.clone(), gate.clone());
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 4096];
                    // Headers, then the body by content-length.
                    let body_start = loop {
                        let Ok(n) = sock.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        req.extend_from_slice(&buf[..n]);
                        if let Some(i) = req.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                    };
                    let head = String::from_utf8_lossy(&req[..body_start]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while req.len() < body_start + len {
                        let Ok(n) = sock.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        req.extend_from_slice(&buf[..n]);
                    }
                    let cut = String::from_utf8_lossy(&req[body_start..]).contains("cut");
                    let frame = |b: &[u8]| {
                        let mut f = format!("{:x}\r\n", b.len()).into_bytes();
                        f.extend_from_slice(b);
                        f.extend_from_slice(b"\r\n");
                        f
                    };
                    let mut out = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
                    out.extend(frame(&first));
                    if sock.write_all(&out).await.is_err() {
                        return;
                    }
                    gate.wait().await;
                    if cut {
                        return; // dropped mid-body: no terminating chunk
                    }
                    loop {
                        if sock.write_all(&frame(&chunk)).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                });
            }
        });
        RawSseUpstream { addr, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for RawSseUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------- requests of the limit tests

/// A chat completion body of a few tokens.
pub const BODY: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;

/// A client whose requests give up after 30 s (a hung gateway fails the test, not CI).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// POSTs `body` to `/v1/chat/completions` with `key`.
pub async fn post(gw: &Gateway, c: &reqwest::Client, key: &str, body: &str) -> reqwest::Response {
    c.post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

/// A response header as text.
pub fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

/// A response header that must be there, as a number.
pub fn num(r: &reqwest::Response, name: &str) -> u64 {
    header(r, name)
        .unwrap_or_else(|| panic!("no {name} in {:?}", r.headers()))
        .parse()
        .unwrap()
}

/// Waits until the database holds `n` usage rows (the writer flushes every 50 ms in tests).
pub async fn rows(gw: &Gateway, n: usize) -> Vec<Row> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let rows = gw.db.rows().await;
        if rows.len() >= n || std::time::Instant::now() > deadline {
            assert_eq!(rows.len(), n, "usage rows");
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// POSTs a streaming chat request whose prompt is `tag` (a gated mock holds it on that tag).
pub async fn stream(gw: &Gateway, c: &reqwest::Client, key: &str, tag: &str) -> reqwest::Response {
    let body = format!(
        r#"{{"model":"gpt-4o-mini","stream":true,"stream_options":{{"include_usage":true}},"messages":[{{"role":"user","content":"{tag}"}}]}}"#
    );
    post(gw, c, key, &body).await
}

impl MockUpstream {
    /// Streams SSE; a request whose prompt is `gN` sends its first chunk at once and the rest
    /// when `gates[N]` opens (any other prompt waits on `gates[0]`).
    pub async fn gated_sse(gates: Vec<Gate>) -> MockUpstream {
        MockUpstream::start(move |req| {
            let body = String::from_utf8_lossy(&req.body);
            let i: usize = body
                .split("\"content\":\"g")
                .nth(1)
                .and_then(|s| s.split('"').next())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            Reply::Sse {
                first: fixture("chat_stream_1.sse"),
                rest: vec![fixture("chat_stream_2.sse")],
                gate: gates[i].clone(),
            }
        })
        .await
    }
}

/// An exact decimal from its text (amounts in tests are written as the CLI takes them).
pub fn dec(s: &str) -> rust_decimal::Decimal {
    <rust_decimal::Decimal as std::str::FromStr>::from_str(s).unwrap()
}

/// A served chat row of `tokens` prompt tokens at cost 0, for store-level spend tests that write
/// usage themselves on an injected clock (`created_at`).
pub fn usage_row(
    id: &str,
    key: i64,
    user: i64,
    tokens: i64,
    created_at: chrono::DateTime<chrono::Utc>,
) -> tollgate::record::UsageRecord {
    tollgate::record::UsageRecord {
        request_id: id.into(),
        user_id: user,
        api_key_id: key,
        upstream_account_id: None,
        method: "POST".into(),
        endpoint: "/v1/chat/completions".into(),
        model: Some("gpt-4o-mini".into()),
        status_code: 200,
        response_time: 5,
        prompt_tokens: tokens,
        completion_tokens: 0,
        cached_tokens: 0,
        cache_creation_tokens: 0,
        tokens_used: tokens,
        cost: rust_decimal::Decimal::ZERO,
        error_message: None,
        created_at,
        requested_model: None,
        usage_source: Some(tollgate::record::UsageSource::Provider),
        upstream_error: None,
        charges: Vec::new(),
    }
}
