//! Connections: what a client may hold and for how long, before any route sees a request.
//!
//! - Headers must arrive within `header_timeout` (a socket that sends nothing is closed after it
//!   too), and a kept-alive connection waiting for its next request is held no longer than that
//!   either (hyper's header-read timer runs from the moment a connection waits for a request
//!   head): slow-header and idle sockets are closed.
//! - A request body must make progress: no frame for `body_stall` ends it with an error, so a
//!   stalled chunked body or half-sent upload releases its handler and staging file.
//! - At most `max_connections` at once. At the cap, the oldest connection with no request in
//!   progress (idle, or still sending headers) is closed to make room; if every connection is
//!   busy, the new one is closed. A normal client is therefore served while idle sockets pile up.
//! - On `stop`, no connection is taken any more and every open one finishes its request in
//!   progress (hyper's graceful shutdown), then `serve` returns.
use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// How long and how many connections clients may hold.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub header_timeout: Duration,
    pub body_stall: Duration,
    pub max_connections: usize,
}

struct Entry {
    started: Instant,
    /// Requests of this connection being handled.
    busy: Arc<AtomicUsize>,
    close: Arc<Notify>,
}

#[derive(Default)]
struct Table {
    next: u64,
    conns: HashMap<u64, Entry>,
}

impl Table {
    /// Registers a new connection, closing the oldest idle one at the cap; `None` when every
    /// connection is busy and the cap is reached.
    fn admit(&mut self, max: usize) -> Option<(u64, Arc<AtomicUsize>, Arc<Notify>)> {
        if self.conns.len() >= max {
            let victim = self
                .conns
                .iter()
                .filter(|(_, e)| e.busy.load(Ordering::Acquire) == 0)
                .min_by_key(|(_, e)| e.started)
                .map(|(id, _)| *id)?;
            if let Some(e) = self.conns.remove(&victim) {
                e.close.notify_one();
            }
        }
        self.next += 1;
        let entry = Entry {
            started: Instant::now(),
            busy: Arc::new(AtomicUsize::new(0)),
            close: Arc::new(Notify::new()),
        };
        let out = (self.next, entry.busy.clone(), entry.close.clone());
        self.conns.insert(self.next, entry);
        Some(out)
    }
}

/// Counts a request as in progress on its connection until dropped.
struct Busy(Arc<AtomicUsize>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves `router` on `listener` within `limits` until `stop` resolves and the connections
/// open then have finished.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    stop: impl Future<Output = ()>,
) {
    let table = Arc::new(Mutex::new(Table::default()));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(limits.header_timeout))
        .keep_alive_timeout(limits.header_timeout);
    let mut refused_logged = Instant::now() - Duration::from_secs(60);
    tokio::pin!(stop);
    loop {
        let stream = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let admitted = table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(limits.max_connections);
        let Some((id, busy, close)) = admitted else {
            if refused_logged.elapsed() > Duration::from_secs(10) {
                refused_logged = Instant::now();
                tracing::warn!(
                    max = limits.max_connections,
                    "connection refused: every connection is busy at the cap (--max-connections)"
                );
            }
            drop(stream);
            continue;
        };
        let stall = limits.body_stall;
        let router = router.clone();
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let mut router = router.clone();
            busy.fetch_add(1, Ordering::AcqRel);
            let guard = Busy(busy.clone());
            let req = req.map(|b| Body::new(StallBody::new(b, stall)));
            async move {
                let _busy = guard;
                tower_service::Service::call(&mut router, req).await
            }
        });
        let (builder, watcher, table) = (builder.clone(), graceful.watcher(), table.clone());
        let header_timeout = limits.header_timeout;
        tokio::spawn(async move {
            let serve = async move {
                // The first bytes, within the header timeout: a socket that sends nothing is
                // closed (hyper starts its own header timer only once it knows the protocol).
                let mut first = [0u8; 1];
                match tokio::time::timeout(header_timeout, stream.peek(&mut first)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return,
                }
                let conn = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .into_owned();
                let _ = watcher.watch(conn).await;
            };
            tokio::select! {
                _ = serve => {}
                _ = close.notified() => {}
            }
            table
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .conns
                .remove(&id);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// A request body that fails when no frame arrives for `stall`.
struct StallBody {
    inner: Incoming,
    stall: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl StallBody {
    fn new(inner: Incoming, stall: Duration) -> StallBody {
        StallBody {
            inner,
            stall,
            timer: Box::pin(tokio::time::sleep(stall)),
        }
    }
}

/// The error a stalled body ends with.
#[derive(Debug, thiserror::Error)]
#[error("the request body stalled: nothing arrived for {0:?}")]
pub struct Stalled(Duration);

impl hyper::body::Body for StallBody {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = tokio::time::Instant::now() + this.stall;
                this.timer.as_mut().reset(deadline);
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(Stalled(this.stall))))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Raises this process's soft limit on open files to its hard limit (systemd's usual soft
/// limit, 1024, is what a few hundred idle sockets exhaust); returns the soft limit now.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain out-pointer to a local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above; raising the soft limit up to the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    lim.rlim_cur
}

/// The default connection cap: what the file limit leaves after a reserve for model files,
/// pipes and the check process (256), at most 10 000 per listener.
pub fn default_max_connections(fd_limit: u64) -> usize {
    (fd_limit.saturating_sub(256).max(32) as usize).min(10_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_closes_the_oldest_idle_connection_first() {
        let mut t = Table::default();
        let (a, _busy_a, close_a) = t.admit(2).unwrap();
        let (b, busy_b, _close_b) = t.admit(2).unwrap();
        busy_b.fetch_add(1, Ordering::AcqRel);
        // Full: the idle one (a) goes, the busy one stays.
        let (c, busy_c, _) = t.admit(2).unwrap();
        assert!(!t.conns.contains_key(&a) && t.conns.contains_key(&b) && t.conns.contains_key(&c));
        // a was told to close (a permit waits for its task).
        let notified = close_a.notified();
        tokio::pin!(notified);
        let waker = futures_noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(notified.as_mut().poll(&mut cx).is_ready());
        // Everyone busy: the new connection is refused.
        busy_c.fetch_add(1, Ordering::AcqRel);
        assert!(t.admit(2).is_none());
        assert_eq!(default_max_connections(1024), 768);
        assert_eq!(default_max_connections(100), 32);
        assert_eq!(default_max_connections(1 << 20), 10_000);
    }

    fn futures_noop_waker() -> std::task::Waker {
        std::task::Waker::noop().clone()
    }
}
