//! Client connections, below HTTP: the proxy listener's accept loop, the cap on open connections,
//! and the header phase of each request held to a deadline and a byte budget while its bytes
//! arrive — before pingora buffers (up to 1 MiB) or parses them.
//!
//! pingora's own listener has neither: its header read is only bounded per `read()` (a client
//! trickling a byte every few seconds holds the connection for ever) and by a 1 MiB buffer. So
//! tollgate accepts on its own socket and hands pingora a [`ClientStream`] that watches the header
//! bytes go by:
//! - the header phase starts at accept (first request) or at the first byte after the previous
//!   request ended ([`request_done`], called from `logging`); the time between requests on a
//!   kept-alive connection is pingora's keep-alive timeout, not this deadline;
//! - it ends at the blank line that closes the header section ([`HeaderEnd`]);
//! - past `header_timeout` or `header_budget` bytes before that line, the client gets a short
//!   408 or 431 and the connection closes.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use metrics::Counter;
use pingora::apps::ServerApp;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::SslDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora::server::{ListenFds, ShutdownWatch};
use pingora::services::Service;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// What pingora's listener would buffer writes in (one segment): a response header and a small
/// body leave in one `write`.
const WRITE_BUFFER: usize = pingora::listeners::DEFAULT_L4_WRITE_BUFFER_SIZE;

/// The limits every client connection is held to (`[server]` settings).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most client connections open at once; over it, new ones get 503 and are closed.
    pub max_connections: usize,
    /// Longest a request's header section may take to arrive, from its first byte (from accept
    /// for a connection's first request).
    pub header_timeout: Duration,
    /// Most bytes read before the end of a header section: the request line and the raw header
    /// lines. (The parsed names and values are checked against `max_header_bytes` afterwards.)
    pub header_budget: usize,
}

/// Counters of what this module refuses; registered once at start (`metrics.rs`).
#[derive(Clone)]
pub struct Counters {
    /// Connections answered 503 because `max_connections` were open.
    pub refused: Counter,
    /// Header sections not complete within `header_timeout`.
    pub header_timeouts: Counter,
    /// Header sections larger than `header_budget`.
    pub header_too_large: Counter,
}

/// The open connections, for `/metrics`.
#[derive(Clone)]
pub struct Gauge(Arc<Semaphore>, usize);

impl Gauge {
    pub fn open(&self) -> usize {
        self.1 - self.0.available_permits()
    }
}

/// pingora service that accepts on the proxy listener and runs each connection through `app`.
pub struct ProxyService<A> {
    listener: Option<std::net::TcpListener>,
    app: Option<A>,
    limits: Limits,
    counters: Counters,
    slots: Arc<Semaphore>,
}

impl<A> ProxyService<A> {
    /// `listener` is already bound (and non-blocking), so a taken port fails at start, not here.
    pub fn new(
        listener: std::net::TcpListener,
        app: A,
        limits: Limits,
        counters: Counters,
    ) -> ProxyService<A> {
        ProxyService {
            listener: Some(listener),
            app: Some(app),
            limits,
            counters,
            slots: Arc::new(Semaphore::new(limits.max_connections)),
        }
    }

    pub fn gauge(&self) -> Gauge {
        Gauge(self.slots.clone(), self.limits.max_connections)
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> Service for ProxyService<A> {
    async fn start_service(
        &mut self,
        _fds: Option<ListenFds>,
        mut shutdown: ShutdownWatch,
        _listeners_per_fd: usize,
    ) {
        let (Some(listener), Some(app)) = (self.listener.take(), self.app.take()) else {
            return;
        };
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("proxy listener: {e}");
                return;
            }
        };
        let app = Arc::new(app);
        let limits = Arc::new(self.limits);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                    continue;
                }
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE/ENFILE: accept fails at once until a descriptor is freed; back off
                    // instead of spinning.
                    tracing::error!("accepting a client connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                self.counters.refused.increment(1);
                pingora_runtime::current_handle().spawn(refuse(tcp, peer));
                continue;
            };
            let stream = ClientStream::new(tcp, limits.clone(), self.counters.clone(), permit);
            let (app, shutdown) = (app.clone(), shutdown.clone());
            pingora_runtime::current_handle().spawn(async move {
                let mut next = app.process_new(Box::new(stream), &shutdown).await;
                while let Some(stream) = next {
                    next = app.process_new(stream, &shutdown).await;
                }
            });
        }
        app.cleanup().await;
    }

    fn name(&self) -> &str {
        "tollgate"
    }
}

/// The body of the answer to a connection over the cap (OpenAI's error shape).
const TOO_MANY_BODY: &str = r#"{"error":{"type":"service_unavailable","code":"too_many_connections","message":"too many client connections"}}"#;

/// The whole answer to a connection over the cap, its length taken from the body.
fn too_many() -> String {
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{TOO_MANY_BODY}",
        TOO_MANY_BODY.len()
    )
}

/// Answers and closes a connection over the cap. What the client sent meanwhile is read and
/// dropped (≤ 1 s, ≤ 64 KiB) after our side is shut, so the close is not a reset that would
/// destroy the answer before the client reads it.
async fn refuse(mut tcp: tokio::net::TcpStream, peer: SocketAddr) {
    use tokio::io::AsyncReadExt;
    tracing::debug!(%peer, "connection refused: max_connections open");
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        tcp.write_all(too_many().as_bytes()).await?;
        tcp.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut read = 0;
        while read < 64 * 1024 {
            match tcp.read(&mut sink).await? {
                0 => break,
                n => read += n,
            }
        }
        Ok::<_, io::Error>(())
    })
    .await;
}

/// What the proxy last told a connection ([`ClientStream::signal`]).
const NO_SIGNAL: u8 = 0;
const REQUEST_DONE: u8 = 1;
const HEADER_RECEIVED: u8 = 2;

/// Marks the end of a request on its connection: the next byte read starts a new header phase.
/// Called once per request, from `logging`. A no-op for streams that are not a [`ClientStream`].
pub fn request_done(stream: Option<&pingora::protocols::Stream>) {
    signal(stream, REQUEST_DONE);
}

/// Marks a request's header as parsed, from `request_filter`: whatever is read next (its body)
/// is not header. Needed for pipelined requests, whose header pingora may have read during the
/// previous request.
pub fn header_received(stream: Option<&pingora::protocols::Stream>) {
    signal(stream, HEADER_RECEIVED);
}

fn signal(stream: Option<&pingora::protocols::Stream>, what: u8) {
    if let Some(s) = stream.and_then(|s| s.as_any().downcast_ref::<ClientStream>()) {
        s.signal.store(what, Ordering::Relaxed);
    }
}

/// Finds the blank line that ends a header section in bytes that arrive in pieces: a line feed,
/// an optional carriage return, a line feed. (Bare line feeds are let through here and refused
/// after parsing, with a 400, by `header.rs`.) Pure.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HeaderEnd {
    /// 0: mid-line; 1: just after `\n`; 2: just after `\n\r`.
    state: u8,
}

impl HeaderEnd {
    /// Feeds the next bytes; `Some(n)` when the section ends after `n` of them.
    pub fn feed(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < bytes.len() {
            match (self.state, bytes[i]) {
                (1 | 2, b'\n') => {
                    self.state = 0;
                    return Some(i + 1);
                }
                (1, b'\r') => self.state = 2,
                (_, b'\n') => self.state = 1,
                (0, _) => match memchr::memchr(b'\n', &bytes[i..]) {
                    Some(at) => {
                        i += at;
                        continue;
                    }
                    None => return None,
                },
                _ => self.state = 0,
            }
            i += 1;
        }
        None
    }
}

/// Where a connection is in its current request.
enum Phase {
    /// Receiving a header section: since `started`, `read` bytes, ending at `end`.
    Header {
        deadline: Instant,
        read: usize,
        end: HeaderEnd,
    },
    /// The header section is complete: body, response, and whatever pingora reads until the
    /// request is done.
    Request,
    /// The request is done; the next byte read starts a header phase. (Idle time between
    /// requests is bounded by pingora's keep-alive timeout.)
    Between,
}

/// A client connection as pingora sees it: the TCP stream with a write buffer, the header
/// watch, and the connection's slot under `max_connections` (freed when pingora drops it).
pub struct ClientStream {
    io: BufWriter<L4Stream>,
    phase: Phase,
    /// Set by [`request_done`] and [`header_received`] (through `&self`, from the proxy's
    /// phases), taken by the next read: start a header phase at the next byte, or end it.
    signal: AtomicU8,
    /// Armed only while a header phase waits for more bytes (a client that sends its header at
    /// once never registers a timer).
    timer: Option<Pin<Box<Sleep>>>,
    limits: Arc<Limits>,
    counters: Counters,
    _slot: OwnedSemaphorePermit,
}

impl std::fmt::Debug for ClientStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientStream")
            .field("io", self.io.get_ref())
            .finish()
    }
}

impl ClientStream {
    fn new(
        tcp: tokio::net::TcpStream,
        limits: Arc<Limits>,
        counters: Counters,
        slot: OwnedSemaphorePermit,
    ) -> ClientStream {
        use std::os::fd::AsRawFd;
        let fd = tcp.as_raw_fd();
        let mut l4 = L4Stream::from(tcp);
        // Small responses leave in one segment, as pingora's own listener does.
        if let Err(e) = l4.set_nodelay() {
            tracing::debug!("TCP_NODELAY on a client connection: {e}");
        }
        l4.set_socket_digest(SocketDigest::from_raw_fd(fd));
        ClientStream {
            io: BufWriter::with_capacity(WRITE_BUFFER, l4),
            phase: Phase::Header {
                deadline: Instant::now() + limits.header_timeout,
                read: 0,
                end: HeaderEnd::default(),
            },
            signal: AtomicU8::new(NO_SIGNAL),
            timer: None,
            limits,
            counters,
            _slot: slot,
        }
    }

    /// Answers a header phase that broke a limit, as well as a socket with nothing else queued
    /// allows (one non-blocking write), and fails the read so pingora closes the connection.
    fn refuse(&mut self, cx: &mut Context<'_>, answer: &'static [u8], why: String) -> io::Error {
        let _ = Pin::new(self.io.get_mut()).poll_write(cx, answer);
        let _ = Pin::new(self.io.get_mut()).poll_flush(cx);
        io::Error::new(io::ErrorKind::InvalidData, why)
    }
}

const TIMED_OUT: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
const TOO_LARGE: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.signal.load(Ordering::Relaxed) {
            NO_SIGNAL => {}
            what => {
                this.signal.store(NO_SIGNAL, Ordering::Relaxed);
                this.phase = if what == REQUEST_DONE {
                    Phase::Between
                } else {
                    Phase::Request
                };
            }
        }
        if let Phase::Header { deadline, .. } = this.phase {
            if Instant::now() >= deadline {
                this.counters.header_timeouts.increment(1);
                let why = format!(
                    "request header not complete within {:?}",
                    this.limits.header_timeout
                );
                return Poll::Ready(Err(this.refuse(cx, TIMED_OUT, why)));
            }
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if polled.is_pending() {
            if let Phase::Header { deadline, .. } = this.phase {
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                ready!(timer.as_mut().poll(cx));
                // The deadline passed while waiting: the next poll answers it.
                cx.waker().wake_by_ref();
            }
            return Poll::Pending;
        }
        let new = &buf.filled()[before..];
        if new.is_empty() {
            return polled;
        }
        if matches!(this.phase, Phase::Between) {
            this.phase = Phase::Header {
                deadline: Instant::now() + this.limits.header_timeout,
                read: 0,
                end: HeaderEnd::default(),
            };
        }
        if let Phase::Header { read, end, .. } = &mut this.phase {
            match end.feed(new) {
                Some(n) if *read + n <= this.limits.header_budget => this.phase = Phase::Request,
                _ => {
                    *read += new.len();
                    if *read > this.limits.header_budget {
                        this.counters.header_too_large.increment(1);
                        let why = format!(
                            "request header larger than {} bytes",
                            this.limits.header_budget
                        );
                        return Poll::Ready(Err(this.refuse(cx, TOO_LARGE, why)));
                    }
                }
            }
        }
        polled
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for ClientStream {
    async fn shutdown(&mut self) {
        if let Err(e) = AsyncWriteExt::shutdown(&mut self.io).await {
            tracing::debug!("closing a client connection: {e}");
        }
    }
}

impl UniqueID for ClientStream {
    fn id(&self) -> UniqueIDType {
        self.io.get_ref().id()
    }
}

impl Ssl for ClientStream {
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        None
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        None
    }
}

impl GetTimingDigest for ClientStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.io.get_ref().get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.io.get_ref().get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.io.get_ref().get_write_pending_time()
    }
}

impl GetProxyDigest for ClientStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.io.get_ref().get_proxy_digest()
    }
}

impl GetSocketDigest for ClientStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.io.get_ref().get_socket_digest()
    }
}

/// h2c is off, so pingora never peeks; the stream says it cannot.
#[async_trait]
impl Peek for ClientStream {}

#[cfg(test)]
mod tests {
    use super::HeaderEnd;

    /// Feeds `pieces` in order; the piece index and offset where the section ended.
    fn check(pieces: &[&str], expected: Option<(usize, usize)>) {
        let mut end = HeaderEnd::default();
        let got = pieces
            .iter()
            .enumerate()
            .find_map(|(i, p)| end.feed(p.as_bytes()).map(|n| (i, n)));
        assert_eq!(got, expected, "{pieces:?}");
    }

    #[test]
    fn the_refusal_over_the_cap_is_framed_by_its_length() {
        let answer = super::too_many();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(
            head.ends_with(&format!("content-length: {}", body.len())),
            "{head}"
        );
        assert!(serde_json::from_str::<serde_json::Value>(body).is_ok());
    }

    #[test]
    fn header_end() {
        check(&["GET / HTTP/1.1\r\nhost: a\r\n\r\n"], Some((0, 27)));
        check(&["GET / HTTP/1.1\r\nhost: a\r\n\r\nbody"], Some((0, 27)));
        check(&["GET / HTTP/1.1\r\nhost: a\r\n"], None);
        check(
            &["GET / HTTP/1.1\r\nhost: a\r", "\n", "\r", "\n"],
            Some((3, 1)),
        );
        check(&["GET / HTTP/1.1\r\nhost: a\r\n\r", "\nx"], Some((1, 1)));
        check(&["GET / HTTP/1.1\nhost: a\n\n"], Some((0, 24)));
        check(&["a\n", "\n"], Some((1, 1)));
        check(&["a\r\n", "x\r\n", "\r\n"], Some((2, 2)));
        // A carriage return alone does not end a line.
        check(&["a\r\r\n"], None);
        check(&["a\n\rb\n"], None);
        check(&[""], None);
        check(&["\n\n"], Some((0, 2)));
    }
}
