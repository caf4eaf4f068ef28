//! A bare hyper reverse proxy: the twin of `examples/bare_proxy.rs` on hyper 1's HTTP/1 server and
//! client instead of pingora. Every request goes to one fixed upstream, nothing else happens. It
//! exists for `benches/load.sh`, to measure what tollgate's request path would cost on hyper.
//!
//! Shape, chosen to match `bare_proxy` and `tollgate serve`:
//! - **Runtimes.** `BARE_THREADS` OS threads, each with its own current-thread tokio runtime
//!   (pingora's `work_stealing = false`) and its own `SO_REUSEPORT` listener on the same address,
//!   so a connection lives on one thread from accept to close. `HYPER_RUNTIME=multi` runs one
//!   multi-thread runtime with `BARE_THREADS` workers and one listener instead.
//! - **Upstream pool.** Kept-alive HTTP/1 client connections in a per-thread stack, taken and
//!   returned without a lock (as tollgate's `src/pool.rs` does): a connection goes back when the
//!   response body has been read to its end, and is dropped after 90 s idle; at most 128 idle
//!   connections per thread. A connection the upstream closed is found by `ready()` and dropped.
//! - **Forwarding.** The request (its header with `Host` set to the upstream, and its body,
//!   streamed) is sent upstream; the response header and body are streamed back frame by frame.
//!   An upstream that cannot be reached or fails before its response header gives a 502.
//! - **Settings.** mimalloc, `TCP_NODELAY` on both legs, keep-alive on, 75 s to read a request
//!   header (`BARE_HEADER_TIMEOUT_SECS`, 0 = no timer), connect timeout 5 s, vectored writes
//!   (hyper's default: the header and the first body chunk leave in one `writev`).
//!   `HYPER_READ_BUF=N` fixes the client connections' read buffer at N bytes (hyper's default:
//!   adaptive, starting at 8 KiB) and caps the server connections' buffer at N (min 8 KiB).
//!
//! ```text
//! cargo run --release --example bare_hyper -- [LISTEN] [UPSTREAM]
//! BARE_LISTEN=127.0.0.1:8082 BARE_UPSTREAM=127.0.0.1:8000 BARE_THREADS=2 cargo run ...
//! ```
//! Arguments win over the environment; defaults: listen 127.0.0.1:8082, upstream 127.0.0.1:8000,
//! threads 2. SIGTERM or Ctrl-C stops it at once (as `bare_proxy` with its default grace of 0).

use std::cell::RefCell;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, HOST};
use http::{Request, Response, StatusCode};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Idle upstream connections are dropped after this long (tollgate's `pool_idle_timeout_secs`).
const POOL_IDLE: Duration = Duration::from_secs(90);
/// At most this many idle upstream connections per thread (tollgate's `pool_max_idle`).
const POOL_MAX_IDLE: usize = 128;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

type Sender = SendRequest<Incoming>;

struct Idle {
    sender: Sender,
    since: Instant,
}

thread_local! {
    /// This thread's idle upstream connections, most recently returned at the back.
    static POOL: RefCell<Vec<Idle>> = const { RefCell::new(Vec::new()) };
}

fn put_back(sender: Sender) {
    if sender.is_closed() {
        return;
    }
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() >= POOL_MAX_IDLE {
            pool.remove(0);
        }
        pool.push(Idle {
            sender,
            since: Instant::now(),
        });
    });
}

fn take() -> Option<Sender> {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let idle = pool.pop()?;
        if idle.since.elapsed() > POOL_IDLE {
            // The most recent one is expired, so all older ones are too.
            pool.clear();
            return None;
        }
        Some(idle.sender)
    })
}

struct Upstream {
    addr: SocketAddr,
    host: HeaderValue,
    read_buf: Option<usize>,
}

impl Upstream {
    /// A kept-alive connection of this thread that is ready for a request, or a new one.
    async fn sender(&self) -> Result<Sender, String> {
        while let Some(mut sender) = take() {
            // Ready at once unless the upstream closed it while it was idle.
            if sender.ready().await.is_ok() {
                return Ok(sender);
            }
        }
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.addr))
            .await
            .map_err(|_| format!("connect to {} timed out", self.addr))?
            .map_err(|e| format!("connect to {}: {e}", self.addr))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut builder = hyper::client::conn::http1::Builder::new();
        if let Some(n) = self.read_buf {
            builder.read_buf_exact_size(Some(n));
        }
        let (sender, conn) = builder
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        // hyper's client drives each connection in a task of its own.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }
}

/// The upstream's response body, streamed to the client; its connection goes back to the pool
/// when the body has been read to the end.
struct PooledBody {
    inner: Option<Incoming>,
    sender: Option<Sender>,
    done: bool,
}

impl PooledBody {
    fn empty() -> PooledBody {
        PooledBody {
            inner: None,
            sender: None,
            done: true,
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = std::task::ready!(Pin::new(inner).poll_frame(cx));
        if frame.is_none() {
            this.done = true;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        let finished = self.done || self.inner.as_ref().is_some_and(Body::is_end_stream);
        if let (true, Some(sender)) = (finished, self.sender.take()) {
            put_back(sender);
        }
    }
}

fn bad_gateway() -> Response<PooledBody> {
    let mut response = Response::new(PooledBody::empty());
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
}

async fn proxy(
    mut req: Request<Incoming>,
    upstream: Arc<Upstream>,
) -> Result<Response<PooledBody>, Infallible> {
    req.headers_mut().insert(HOST, upstream.host.clone());
    let mut sender = match upstream.sender().await {
        Ok(sender) => sender,
        Err(e) => {
            eprintln!("bare_hyper: {e}");
            return Ok(bad_gateway());
        }
    };
    match sender.send_request(req).await {
        Ok(response) => {
            let (parts, body) = response.into_parts();
            Ok(Response::from_parts(
                parts,
                PooledBody {
                    inner: Some(body),
                    sender: Some(sender),
                    done: false,
                },
            ))
        }
        Err(e) => {
            eprintln!("bare_hyper: upstream request failed: {e}");
            Ok(bad_gateway())
        }
    }
}

struct Settings {
    listen: SocketAddr,
    upstream: Arc<Upstream>,
    header_timeout: Option<Duration>,
    server_buf: Option<usize>,
}

async fn serve(listener: TcpListener, settings: Arc<Settings>) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.keep_alive(true);
    if let Some(t) = settings.header_timeout {
        builder.timer(TokioTimer::new()).header_read_timeout(t);
    } else {
        builder.header_read_timeout(None);
    }
    if let Some(n) = settings.server_buf {
        builder.max_buf_size(n.max(8192));
    }
    let builder = Arc::new(builder);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("bare_hyper: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let upstream = settings.upstream.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| proxy(req, upstream.clone()));
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn listener(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(4096)
}

fn setting(arg: Option<String>, env: &str, default: &str) -> String {
    arg.or_else(|| std::env::var(env).ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| default.to_string())
}

fn number(env: &str, default: &str) -> usize {
    setting(None, env, default)
        .parse()
        .unwrap_or_else(|_| panic!("{env} must be a number"))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if matches!(args.first().map(String::as_str), Some("-h" | "--help")) {
        eprintln!(
            "usage: bare_hyper [LISTEN] [UPSTREAM]   (or BARE_LISTEN, BARE_UPSTREAM, BARE_THREADS, \
             BARE_HEADER_TIMEOUT_SECS, HYPER_RUNTIME=current|multi, HYPER_READ_BUF)"
        );
        return;
    }
    let mut args = args.into_iter();
    let listen: SocketAddr = setting(args.next(), "BARE_LISTEN", "127.0.0.1:8082")
        .parse()
        .expect("the listen address must be IP:PORT");
    let upstream: SocketAddr = setting(args.next(), "BARE_UPSTREAM", "127.0.0.1:8000")
        .parse()
        .expect("the upstream must be an IP:PORT address");
    let threads = number("BARE_THREADS", "2").max(1);
    let header_timeout = match number("BARE_HEADER_TIMEOUT_SECS", "75") {
        0 => None,
        s => Some(Duration::from_secs(s as u64)),
    };
    let read_buf = match number("HYPER_READ_BUF", "0") {
        0 => None,
        n => Some(n),
    };
    let multi = setting(None, "HYPER_RUNTIME", "current") == "multi";
    let settings = Arc::new(Settings {
        listen,
        upstream: Arc::new(Upstream {
            addr: upstream,
            host: HeaderValue::from_str(&upstream.to_string()).expect("an address is a header"),
            read_buf,
        }),
        header_timeout,
        server_buf: read_buf,
    });
    eprintln!(
        "bare_hyper listening on {listen}, forwarding to {upstream}, {threads} threads ({})",
        if multi {
            "one multi-thread runtime"
        } else {
            "a current-thread runtime each"
        }
    );

    if multi {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("bare-hyper")
            .enable_all()
            .build()
            .expect("a tokio runtime");
        rt.block_on(async {
            let l = listener(settings.listen, false).expect("cannot listen");
            serve(l, settings).await;
        });
        return;
    }

    // Bind every thread's listener before any accepts, so a failure stops the start.
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let settings = settings.clone();
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let handle = std::thread::Builder::new()
                .name(format!("bare-hyper-{i}"))
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("a tokio runtime");
                    rt.block_on(async {
                        let l = match listener(settings.listen, true) {
                            Ok(l) => l,
                            Err(e) => {
                                let _ = ready_tx.send(Err(e));
                                return;
                            }
                        };
                        let _ = ready_tx.send(Ok(()));
                        serve(l, settings).await;
                    });
                })
                .expect("cannot start a thread");
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("cannot listen on {listen}: {e}"),
                Err(_) => panic!("thread {i} ended before it listened"),
            }
            handle
        })
        .collect();
    for handle in handles {
        let _ = handle.join();
    }
}
