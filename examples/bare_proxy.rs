//! A bare pingora reverse proxy: every request goes to one fixed upstream, nothing else happens.
//! It exists for `benches/load.sh`, to measure the engine tollgate is built on without any of
//! tollgate's own work (no auth, routing, body buffering, metering, database or logging).
//!
//! It runs pingora the way `tollgate serve` does (`src/server.rs`, `src/upstream.rs`): the same
//! `ServerConf` (`threads`, `work_stealing = false`, `graceful_shutdown_timeout_seconds = 1`), the
//! same allocator (mimalloc), the same peer options (connect 5 s, total connect 10 s, read/write
//! 600 s, pooled connections kept 90 s) and a kept-alive client connection (75 s idle). Unlike
//! tollgate it uses pingora's own proxy loop (`upstream_peer`), which is what a plain pingora
//! proxy does.
//!
//! ```text
//! cargo run --release --example bare_proxy -- [LISTEN] [UPSTREAM]
//! BARE_LISTEN=127.0.0.1:8081 BARE_UPSTREAM=127.0.0.1:8000 BARE_THREADS=2 cargo run ...
//! ```
//! Arguments win over the environment; defaults: listen 127.0.0.1:8081, upstream 127.0.0.1:8000,
//! threads 2. SIGTERM or Ctrl-C stops it (in-flight requests get `BARE_GRACE_SECS`, default 0).

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use pingora::http::RequestHeader;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Bare {
    upstream: SocketAddr,
    host: String,
    idle_timeout_secs: u64,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> Result<bool> {
        // tollgate does the same at the start of every request.
        session.set_keepalive(Some(self.idle_timeout_secs));
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let mut peer = HttpPeer::new(self.upstream, false, String::new());
        peer.options.connection_timeout = Some(Duration::from_secs(5));
        peer.options.total_connection_timeout = Some(Duration::from_secs(10));
        peer.options.read_timeout = Some(Duration::from_secs(600));
        peer.options.write_timeout = Some(Duration::from_secs(600));
        peer.options.idle_timeout = Some(Duration::from_secs(90));
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut (),
    ) -> Result<()> {
        upstream_request.insert_header(http::header::HOST, self.host.as_str())?;
        Ok(())
    }
}

fn setting(arg: Option<String>, env: &str, default: &str) -> String {
    arg.or_else(|| std::env::var(env).ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| default.to_string())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if matches!(args.first().map(String::as_str), Some("-h" | "--help")) {
        eprintln!("usage: bare_proxy [LISTEN] [UPSTREAM]   (or BARE_LISTEN, BARE_UPSTREAM, BARE_THREADS, BARE_GRACE_SECS)");
        return;
    }
    let mut args = args.into_iter();
    let listen = setting(args.next(), "BARE_LISTEN", "127.0.0.1:8081");
    let upstream = setting(args.next(), "BARE_UPSTREAM", "127.0.0.1:8000");
    let threads: usize = setting(None, "BARE_THREADS", "2")
        .parse()
        .expect("BARE_THREADS must be a number");
    let grace: u64 = setting(None, "BARE_GRACE_SECS", "0")
        .parse()
        .expect("BARE_GRACE_SECS must be a number");
    let upstream: SocketAddr = upstream
        .parse()
        .expect("the upstream must be an IP:PORT address");

    let conf = ServerConf {
        threads,
        work_stealing: false,
        grace_period_seconds: Some(grace),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let bare = Bare {
        upstream,
        host: upstream.to_string(),
        idle_timeout_secs: 75,
    };
    let mut proxy =
        pingora::proxy::http_proxy_service_with_name(&server.configuration, bare, "bare");
    proxy.add_tcp(&listen);
    server.add_service(proxy);
    eprintln!("bare_proxy listening on {listen}, forwarding to {upstream}, {threads} threads");
    server.run_forever();
}
