//! Kept-alive upstream connections: one pool per proxy thread, taken and returned without a lock,
//! a spawned task or a wake-up.
//!
//! pingora's own pool (`TransportConnector`) spawns an idle-watch task for every connection it
//! takes back and must wait for that task to let go before the next request can reuse the
//! connection. Under load that cost a spawn, a lock and a wake-up per request, and when the watch
//! task had not yet let go the request opened a new connection instead ("failed to acquire
//! reusable stream", hundreds of new upstream connections per benchmark run).
//!
//! Here an idle connection sits in a per-thread stack (most recently used first) and is checked
//! when it is taken: a non-blocking read that finds data, EOF or an error discards it, as
//! pingora does. Connections are dropped once idle longer than `idle_timeout`, and at most
//! `max_idle` are kept per peer per thread (the oldest goes first). Expired connections are swept
//! whenever the thread's pool is used; a thread that serves nothing keeps its (bounded) idle
//! connections until it does.
//!
//! Every connection the pool makes is wrapped in [`Coalesce`], so a request's header and body
//! can leave in one write: pingora's HTTP/1 client flushes the header on its own, which cost a
//! second `sendto` (and a second wake-up of the upstream) per request.
//!
//! The pool is thread-local because each pingora worker thread runs its own runtime
//! (`work_stealing = false`), so a request's task never changes thread. It is only touched
//! between awaits, so with work stealing on it stays correct (a connection may just be returned
//! to another thread's pool).

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_util::FutureExt;
use pingora::connectors::TransportConnector;
use pingora::protocols::http::client::HttpSession;
use pingora::protocols::http::v1::client::HttpSession as Http1Session;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::TlsRef;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora::upstreams::peer::{HttpPeer, Peer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
// tokio's clock, so the idle timeout can be tested on paused time.
use tokio::time::Instant;

struct Idle {
    stream: Stream,
    since: Instant,
}

#[derive(Default)]
struct ThreadPool {
    /// Per peer (`Peer::reuse_hash`): idle connections, most recently returned at the back.
    idle: HashMap<u64, VecDeque<Idle>>,
    last_sweep: Option<Instant>,
}

thread_local! {
    static POOL: RefCell<ThreadPool> = RefCell::new(ThreadPool::default());
}

/// How often a thread's whole pool is checked for expired connections.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

pub struct UpstreamPool {
    transport: TransportConnector,
    idle_timeout: Duration,
    max_idle: usize,
}

impl UpstreamPool {
    pub fn new(idle_timeout: Duration, max_idle: usize) -> UpstreamPool {
        UpstreamPool {
            transport: TransportConnector::new(None),
            idle_timeout,
            max_idle,
        }
    }

    /// An HTTP/1 session to `peer`: a pooled connection if one is usable, else a new one.
    /// The flag says whether the connection was reused (a reused one may have been closed by the
    /// upstream in the meantime, which is not the upstream's fault).
    pub async fn session(&self, peer: &HttpPeer) -> pingora::Result<(HttpSession, bool)> {
        if let Some(stream) = self.take(peer.reuse_hash()) {
            return Ok((
                HttpSession::H1(Http1Session::new_with_options(stream, peer)),
                true,
            ));
        }
        let stream: Stream = Box::new(Coalesce::new(self.transport.new_stream(peer).await?));
        Ok((
            HttpSession::H1(Http1Session::new_with_options(stream, peer)),
            false,
        ))
    }

    /// Returns a session whose response was read to the end; kept if the upstream allows it.
    pub async fn release(&self, session: HttpSession, peer: &HttpPeer) {
        let HttpSession::H1(mut session) = session else {
            return; // only HTTP/1 sessions are made here
        };
        session.respect_keepalive();
        if let Some(stream) = session.reuse().await {
            self.put(peer.reuse_hash(), stream);
        }
    }

    fn take(&self, key: u64) -> Option<Stream> {
        POOL.with(|pool| {
            let mut pool = pool.borrow_mut();
            let now = Instant::now();
            self.maybe_sweep(&mut pool, now);
            let idle = pool.idle.get_mut(&key)?;
            while let Some(mut conn) = idle.pop_back() {
                if now.duration_since(conn.since) > self.idle_timeout {
                    // The most recent one is expired, so all older ones are too.
                    idle.clear();
                    break;
                }
                if still_usable(&mut conn.stream) {
                    return Some(conn.stream);
                }
            }
            None
        })
    }

    fn put(&self, key: u64, stream: Stream) {
        if self.max_idle == 0 {
            return;
        }
        POOL.with(|pool| {
            let mut pool = pool.borrow_mut();
            let now = Instant::now();
            self.maybe_sweep(&mut pool, now);
            let idle = pool.idle.entry(key).or_default();
            while idle.len() >= self.max_idle {
                idle.pop_front();
            }
            idle.push_back(Idle { stream, since: now });
        })
    }

    /// Drops every connection of this thread idle longer than `idle_timeout`, at most once per
    /// [`SWEEP_EVERY`].
    fn maybe_sweep(&self, pool: &mut ThreadPool, now: Instant) {
        if pool
            .last_sweep
            .is_some_and(|t| now.duration_since(t) < SWEEP_EVERY)
        {
            return;
        }
        pool.last_sweep = Some(now);
        pool.idle.retain(|_, idle| {
            while idle
                .front()
                .is_some_and(|c| now.duration_since(c.since) > self.idle_timeout)
            {
                idle.pop_front();
            }
            !idle.is_empty()
        });
    }
}

/// While on, the session's writes are collected and its flushes do nothing; turning it off lets
/// the next flush send everything collected in one write. Only for sessions from this pool (on
/// any other session it does nothing).
pub fn hold_writes(session: &HttpSession, on: bool) {
    if let Some(c) = session
        .stream()
        .and_then(|s| s.as_any().downcast_ref::<Coalesce>())
    {
        c.hold.store(on, Ordering::Relaxed);
    }
}

/// An upstream connection that can hold back writes (see [`hold_writes`]); everything else is
/// passed through to the connection it wraps.
#[derive(Debug)]
pub struct Coalesce {
    inner: Stream,
    held: Vec<u8>,
    /// Bytes of `held` already passed on (a write may be partial).
    sent: usize,
    hold: AtomicBool,
}

impl Coalesce {
    pub fn new(inner: Stream) -> Coalesce {
        Coalesce {
            inner,
            held: Vec::new(),
            sent: 0,
            hold: AtomicBool::new(false),
        }
    }

    fn holding(&self) -> bool {
        self.hold.load(Ordering::Relaxed)
    }

    /// Passes on whatever is held, in order, before anything else is written.
    fn poll_release(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.sent < self.held.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.held.clear();
        self.sent = 0;
        // A pooled connection does not keep a large request's buffer.
        if self.held.capacity() > 16 * 1024 {
            self.held = Vec::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Coalesce {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.holding() {
            this.held.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        ready!(this.poll_release(cx))?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.holding() {
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_release(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl AsyncRead for Coalesce {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

#[async_trait::async_trait]
impl Shutdown for Coalesce {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for Coalesce {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Coalesce {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Coalesce {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Coalesce {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Coalesce {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait::async_trait]
impl Peek for Coalesce {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

/// An idle connection is usable if a read would block: data means the upstream broke protocol,
/// EOF or an error means it is gone.
fn still_usable(stream: &mut Stream) -> bool {
    let mut buf = [0u8; 1];
    tokio::task::unconstrained(stream.read(&mut buf))
        .now_or_never()
        .is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// A listener that accepts connections and keeps them (or closes them when asked).
    async fn listener() -> (TcpListener, HttpPeer) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = HttpPeer::new(l.local_addr().unwrap(), false, String::new());
        (l, peer)
    }

    async fn connect(pool: &UpstreamPool, peer: &HttpPeer) -> Stream {
        pool.transport.new_stream(peer).await.unwrap()
    }

    #[tokio::test]
    async fn held_writes_are_sent_together_in_order_when_released() {
        use tokio::io::AsyncWriteExt;
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        let mut c = Coalesce::new(Box::new(ours));
        let mut buf = [0u8; 256];
        c.hold.store(true, Ordering::Relaxed);
        c.write_all(b"POST / HTTP/1.1\r\ncontent-length: 4\r\n\r\n")
            .await
            .unwrap();
        c.flush().await.unwrap();
        c.write_all(b"body").await.unwrap();
        c.flush().await.unwrap();
        assert!(
            tokio::task::unconstrained(theirs.read(&mut buf))
                .now_or_never()
                .is_none(),
            "nothing leaves while held"
        );
        c.hold.store(false, Ordering::Relaxed);
        c.flush().await.unwrap();
        let n = theirs.read(&mut buf).await.unwrap();
        assert_eq!(
            &buf[..n],
            b"POST / HTTP/1.1\r\ncontent-length: 4\r\n\r\nbody"
        );
        // Not held: writes pass straight through.
        c.write_all(b"next").await.unwrap();
        c.flush().await.unwrap();
        let n = theirs.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"next");
    }

    #[tokio::test]
    async fn returned_connections_are_reused_most_recent_first() {
        let (l, peer) = listener().await;
        let pool = UpstreamPool::new(Duration::from_secs(60), 8);
        let a = connect(&pool, &peer).await;
        let b = connect(&pool, &peer).await;
        let (_sa, _) = l.accept().await.unwrap();
        let (_sb, _) = l.accept().await.unwrap();
        let (ida, idb) = (a.id(), b.id());
        pool.put(peer.reuse_hash(), a);
        pool.put(peer.reuse_hash(), b);
        assert_eq!(pool.take(peer.reuse_hash()).map(|s| s.id()), Some(idb));
        assert_eq!(pool.take(peer.reuse_hash()).map(|s| s.id()), Some(ida));
        assert!(pool.take(peer.reuse_hash()).is_none());
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_or_wrote_to_is_discarded() {
        let (l, peer) = listener().await;
        let pool = UpstreamPool::new(Duration::from_secs(60), 8);
        let mut closed = connect(&pool, &peer).await;
        let (server_closed, _) = l.accept().await.unwrap();
        let mut chatty = connect(&pool, &peer).await;
        let (mut server_chatty, _) = l.accept().await.unwrap();
        drop(server_closed);
        server_chatty
            .write_all(b"HTTP/1.1 408\r\n\r\n")
            .await
            .unwrap();
        // Wait until each connection has seen its FIN or bytes (a peek puts the byte back).
        let mut byte = [0u8; 1];
        assert!(closed.try_peek(&mut byte).await.is_err(), "EOF");
        assert!(chatty.try_peek(&mut byte).await.unwrap());
        pool.put(peer.reuse_hash(), closed);
        pool.put(peer.reuse_hash(), chatty);
        assert!(pool.take(peer.reuse_hash()).is_none(), "both discarded");
    }

    #[tokio::test]
    async fn at_most_max_idle_per_peer_oldest_dropped() {
        let (l, peer) = listener().await;
        let pool = UpstreamPool::new(Duration::from_secs(60), 2);
        let mut ids = Vec::new();
        let mut servers = Vec::new();
        for _ in 0..3 {
            let s = connect(&pool, &peer).await;
            servers.push(l.accept().await.unwrap());
            ids.push(s.id());
            pool.put(peer.reuse_hash(), s);
        }
        assert_eq!(pool.take(peer.reuse_hash()).map(|s| s.id()), Some(ids[2]));
        assert_eq!(pool.take(peer.reuse_hash()).map(|s| s.id()), Some(ids[1]));
        assert!(
            pool.take(peer.reuse_hash()).is_none(),
            "the oldest was dropped"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_longer_than_the_timeout_is_not_reused() {
        let (l, peer) = listener().await;
        let pool = UpstreamPool::new(Duration::from_secs(5), 8);
        let s = connect(&pool, &peer).await;
        let _server = l.accept().await.unwrap();
        pool.put(peer.reuse_hash(), s);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(pool.take(peer.reuse_hash()).is_none());
    }
}
