//! One pipelined connection to a broker, and a handle that reconnects transparently.
//!
//! Requests are written in order by a writer task; responses are matched to requests by
//! correlation id by a reader task. Many requests may be in flight at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio_util::codec::FramedRead;

use cairn_protocol::api::response_correlation_id;
use cairn_protocol::io::{write_all_vectored, IOV_MAX};
use cairn_protocol::{decode_response, encode_request, FrameCodec, Request};

use crate::error::{Error, Result};

/// Stop gathering queued requests into one write past this many bytes.
const WRITE_GATHER_BYTES: usize = 1 << 20;

type Waiters = Arc<Mutex<HashMap<u32, oneshot::Sender<Result<Bytes>>>>>;

/// Connection settings.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    /// `host:port` of the broker.
    pub broker: String,
    /// Sent in every request header; shows up in broker logs.
    pub client_id: String,
    /// How long to wait for a TCP connection.
    pub connect_timeout: Duration,
    /// How long to wait for any one response (long-poll fetches add their `max_wait`).
    pub request_timeout: Duration,
    /// Largest response frame accepted.
    pub frame_bytes_max: u32,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            broker: "127.0.0.1:7070".into(),
            client_id: "cairn-client".into(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            frame_bytes_max: 64 * 1024 * 1024,
        }
    }
}

/// A request frame for the writer, and who to tell once it is written (requests that get no
/// response: their sender's only sign that the bytes left).
type Outgoing = (Vec<Bytes>, Option<oneshot::Sender<()>>);

/// A live connection.
#[derive(Debug)]
struct Live {
    tx: mpsc::UnboundedSender<Outgoing>,
    waiters: Waiters,
    dead: Arc<AtomicBool>,
    /// The writer and reader tasks; they own the socket's halves.
    tasks: [AbortHandle; 2],
}

impl Live {
    /// Ends the connection now: its tasks stop, which closes the socket, and the requests still
    /// waiting on it fail with `detail`. For a peer that stopped answering: the kernel would keep
    /// the socket for minutes, and every retry sent on it would time out too.
    fn close(&self, addr: &str, detail: &str) {
        for task in &self.tasks {
            task.abort();
        }
        fail_all(&self.dead, &self.waiters, addr, detail);
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        // Nothing waits on it any more (requests hold the `Live` until they finish); without
        // this, the reader of a silent peer's socket would outlive it.
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The current connection, and how the last attempt to make one failed.
#[derive(Debug, Default)]
struct Slot {
    live: Option<Arc<Live>>,
    /// The failed attempt's number (see [`Connection::failures`]) and its error.
    failed: Option<(u64, Error)>,
}

/// A connection handle that reconnects on the next request after a failure.
#[derive(Debug, Clone)]
pub struct Connection {
    config: Arc<ConnectionConfig>,
    slot: Arc<tokio::sync::Mutex<Slot>>,
    /// Failed connection attempts so far. A request that finds an attempt failed after it began
    /// to wait for the slot shares that failure instead of making its own attempt: concurrent
    /// requests to a dead broker wait out one `connect_timeout`, not one each in turn.
    failures: Arc<AtomicU64>,
    next_id: Arc<AtomicU32>,
    /// The last number given to a numbered request. Held while one takes its number and is
    /// queued for the writer, so that numbered requests go out in the order of their numbers.
    /// Numbers are counted apart from correlation ids: every request takes an id, and ids of
    /// 2^31 produce requests in between would make a later number compare as earlier.
    numbered: Arc<Mutex<u32>>,
}

impl Connection {
    /// A handle; the TCP connection is made on first use (see [`Connection::connect`]).
    pub fn new(config: ConnectionConfig) -> Connection {
        Connection {
            config: Arc::new(config),
            slot: Arc::new(tokio::sync::Mutex::new(Slot::default())),
            failures: Arc::new(AtomicU64::new(0)),
            next_id: Arc::new(AtomicU32::new(1)),
            numbered: Arc::new(Mutex::new(0)),
        }
    }

    /// Connects now, to surface an unreachable broker early.
    ///
    /// # Errors
    /// [`Error::Connect`] or [`Error::Timeout`].
    pub async fn connect(config: ConnectionConfig) -> Result<Connection> {
        let c = Connection::new(config);
        c.live().await?;
        Ok(c)
    }

    /// The settings.
    pub fn config(&self) -> &ConnectionConfig {
        &self.config
    }

    async fn live(&self) -> Result<Arc<Live>> {
        let failures_seen = self.failures.load(Ordering::Acquire);
        let mut slot = self.slot.lock().await;
        if let Some(l) = slot.live.as_ref() {
            if !l.dead.load(Ordering::Acquire) {
                return Ok(Arc::clone(l));
            }
        }
        if let Some((attempt, error)) = &slot.failed {
            if *attempt > failures_seen {
                return Err(error.duplicate());
            }
        }
        match self.open().await {
            Ok(l) => {
                let l = Arc::new(l);
                slot.live = Some(Arc::clone(&l));
                slot.failed = None;
                Ok(l)
            }
            Err(e) => {
                slot.live = None;
                let attempt = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
                slot.failed = Some((attempt, e.duplicate()));
                Err(e)
            }
        }
    }

    async fn open(&self) -> Result<Live> {
        let addr = self.config.broker.clone();
        let connect = TcpStream::connect(&addr);
        let stream = match tokio::time::timeout(self.config.connect_timeout, connect).await {
            Err(_) => {
                return Err(Error::Timeout { operation: "connect", ms: self.config.connect_timeout.as_millis() as u64 })
            }
            Ok(Err(source)) => return Err(Error::Connect { addr, source }),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        let (rd, mut wr) = stream.into_split();
        let waiters: Waiters = Arc::new(Mutex::new(HashMap::new()));
        let dead = Arc::new(AtomicBool::new(false));
        let (tx, mut rx) = mpsc::unbounded_channel::<Outgoing>();
        // Writer: gathers queued frames into one vectored write; record batches are not copied.
        let wdead = Arc::clone(&dead);
        let wwaiters = Arc::clone(&waiters);
        let waddr = addr.clone();
        let writer = tokio::spawn(async move {
            let mut out: Vec<Bytes> = Vec::with_capacity(64);
            let mut written: Vec<oneshot::Sender<()>> = Vec::new();
            while let Some((first, tell)) = rx.recv().await {
                let mut gathered: usize = first.iter().map(Bytes::len).sum();
                out.extend(first);
                written.extend(tell);
                while gathered < WRITE_GATHER_BYTES && out.len() < IOV_MAX {
                    match rx.try_recv() {
                        Ok((more, tell)) => {
                            gathered += more.iter().map(Bytes::len).sum::<usize>();
                            out.extend(more);
                            written.extend(tell);
                        }
                        Err(_) => break,
                    }
                }
                if let Err(e) = write_all_vectored(&mut wr, &mut out).await {
                    // Dropping `written` tells those senders their requests were not written.
                    fail_all(&wdead, &wwaiters, &waddr, &e.to_string());
                    return;
                }
                for tell in written.drain(..) {
                    let _ = tell.send(());
                }
            }
            let _ = wr.shutdown().await;
        });
        // Reader: matches responses to waiters.
        let rdead = Arc::clone(&dead);
        let rwaiters = Arc::clone(&waiters);
        let mut frames = FramedRead::with_capacity(rd, FrameCodec::new(self.config.frame_bytes_max), 256 * 1024);
        let reader = tokio::spawn(async move {
            loop {
                match frames.next().await {
                    Some(Ok(frame)) => {
                        let Ok(id) = response_correlation_id(&frame) else {
                            fail_all(&rdead, &rwaiters, &addr, "unreadable response");
                            return;
                        };
                        let waiter = rwaiters.lock().expect("waiters lock").remove(&id);
                        if let Some(w) = waiter {
                            let _ = w.send(Ok(frame));
                        }
                    }
                    Some(Err(e)) => {
                        fail_all(&rdead, &rwaiters, &addr, &e.to_string());
                        return;
                    }
                    None => {
                        fail_all(&rdead, &rwaiters, &addr, "closed by the broker");
                        return;
                    }
                }
            }
        });
        Ok(Live { tx, waiters, dead, tasks: [writer.abort_handle(), reader.abort_handle()] })
    }

    /// Sends a request and waits for its response, up to the request timeout plus `extra`.
    ///
    /// # Errors
    /// Connection failures, timeouts, response-level broker errors, or undecodable responses.
    pub async fn request_with<R: Request>(&self, request: &R, extra: Duration) -> Result<R::Response> {
        self.round_trip(request, extra, false).await.map(|(_, response)| response)
    }

    /// As [`Connection::request`], with the request's number. Numbered requests are written in
    /// the order of their numbers and the broker answers a connection's requests in order, so
    /// of two answers, the one with the later number ([`is_later`]) describes the later state.
    pub(crate) async fn request_numbered<R: Request>(&self, request: &R) -> Result<(u32, R::Response)> {
        let (number, response) = self.round_trip(request, Duration::ZERO, true).await?;
        Ok((number.expect("numbered"), response))
    }

    /// Sends `request` and waits for its answer; a `numbered` request also gets its number.
    async fn round_trip<R: Request>(
        &self,
        request: &R,
        extra: Duration,
        numbered: bool,
    ) -> Result<(Option<u32>, R::Response)> {
        let live = self.live().await?;
        let (tx, rx) = oneshot::channel();
        let (number, id, queued) = {
            let mut order = numbered.then(|| self.numbered.lock().expect("numbering lock"));
            let number = order.as_deref_mut().map(|last| {
                *last = last.wrapping_add(1);
                *last
            });
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            live.waiters.lock().expect("waiters lock").insert(id, tx);
            let queued = !live.dead.load(Ordering::Acquire)
                && live.tx.send((encode_request(id, &self.config.client_id, request), None)).is_ok();
            (number, id, queued)
        };
        if !queued {
            live.waiters.lock().expect("waiters lock").remove(&id);
            live.dead.store(true, Ordering::Release);
            return Err(Error::Disconnected { addr: self.config.broker.clone(), detail: "connection closed".into() });
        }
        let timeout = self.config.request_timeout + extra;
        let frame = match tokio::time::timeout(timeout, rx).await {
            Err(_) => {
                live.waiters.lock().expect("waiters lock").remove(&id);
                // As Kafka's clients do: a broker that does not answer in time is treated as
                // gone, and the next request (a retry, say) gets a fresh connection.
                let operation = R::API_KEY.name();
                live.close(&self.config.broker, &format!("closed after a {operation} request timed out"));
                return Err(Error::Timeout { operation, ms: timeout.as_millis() as u64 });
            }
            Ok(Err(_)) => {
                return Err(Error::Disconnected {
                    addr: self.config.broker.clone(),
                    detail: "connection closed".into(),
                })
            }
            Ok(Ok(r)) => r?,
        };
        let (_, body) = decode_response::<R::Response>(frame)?;
        body.map(|response| (number, response)).map_err(|e| Error::broker(e.code, Some(e.message)))
    }

    /// Sends a request and waits for its response.
    ///
    /// # Errors
    /// As [`Connection::request_with`].
    pub async fn request<R: Request>(&self, request: &R) -> Result<R::Response> {
        self.request_with(request, Duration::ZERO).await
    }

    /// Sends a request that gets no response (produce with acks = none), and returns once it is
    /// written to the socket: what a caller holds for it (a producer's buffer) is bounded by
    /// what the broker reads, and nothing is still queued in this process when it returns.
    ///
    /// # Errors
    /// Connection failures; [`Error::Timeout`] if the broker takes in none of it within the
    /// request timeout (the connection is dropped then, as a half-written request cannot be
    /// taken back).
    pub async fn send_only<R: Request>(&self, request: &R) -> Result<()> {
        let live = self.live().await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let closed = || Error::Disconnected { addr: self.config.broker.clone(), detail: "connection closed".into() };
        let (tell, written) = oneshot::channel();
        live.tx.send((encode_request(id, &self.config.client_id, request), Some(tell))).map_err(|_| closed())?;
        match tokio::time::timeout(self.config.request_timeout, written).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(closed()),
            Err(_) => {
                let operation = R::API_KEY.name();
                live.close(&self.config.broker, &format!("closed after a {operation} request timed out"));
                Err(Error::Timeout { operation, ms: self.config.request_timeout.as_millis() as u64 })
            }
        }
    }
}

/// Whether request number `a` was written after `b` (numbers wrap around).
pub(crate) fn is_later(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

fn fail_all(dead: &AtomicBool, waiters: &Waiters, addr: &str, detail: &str) {
    dead.store(true, Ordering::Release);
    let drained: Vec<_> = waiters.lock().expect("waiters lock").drain().collect();
    for (_, w) in drained {
        let _ = w.send(Err(Error::Disconnected { addr: addr.to_owned(), detail: detail.to_owned() }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_protocol::messages::metadata::MetadataRequest;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpSocket};

    #[test]
    fn request_numbers_compare_across_the_wrap() {
        assert!(is_later(2, 1) && !is_later(1, 2) && !is_later(1, 1));
        assert!(is_later(0, u32::MAX) && is_later(3, u32::MAX - 3));
    }

    #[tokio::test]
    async fn numbered_requests_stay_in_order_after_two_billion_others() {
        let dir = tempfile::tempdir().unwrap();
        let broker = cairn_broker::EmbeddedBroker::start(dir.path()).unwrap();
        let conn = Connection::new(config(broker.addr()));
        let request = MetadataRequest { topics: None };
        let (first, _) = conn.request_numbered(&request).await.unwrap();
        // As if 2^31 produce requests had gone out on the connection since.
        conn.next_id.fetch_add(1 << 31, Ordering::Relaxed);
        let (second, _) = conn.request_numbered(&request).await.unwrap();
        assert!(is_later(second, first), "{second} after {first}");
    }

    fn config(addr: std::net::SocketAddr) -> ConnectionConfig {
        ConnectionConfig { broker: addr.to_string(), ..ConnectionConfig::default() }
    }

    #[tokio::test]
    async fn a_request_that_times_out_closes_its_connection_and_the_next_one_reconnects() {
        // A broker that reads everything and answers nothing, and says when a connection ends.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU32::new(0));
        let (ended_tx, mut ended) = mpsc::unbounded_channel::<()>();
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let ended_tx = ended_tx.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while matches!(socket.read(&mut buf).await, Ok(n) if n > 0) {}
                    let _ = ended_tx.send(());
                });
            }
        });
        let conn = Connection::new(ConnectionConfig { request_timeout: Duration::from_millis(100), ..config(addr) });
        let request = MetadataRequest { topics: None };
        // A long poll on the same connection, still within its own wait: it fails with the
        // connection rather than waiting on a socket nobody reads any more.
        let polling = {
            let conn = conn.clone();
            tokio::spawn(
                async move { conn.request_with(&MetadataRequest { topics: None }, Duration::from_secs(30)).await },
            )
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let err = conn.request(&request).await.unwrap_err();
        assert!(matches!(err, Error::Timeout { operation: "metadata", .. }), "{err:?}");
        tokio::time::timeout(Duration::from_secs(5), ended.recv())
            .await
            .expect("the connection of the timed-out request was closed")
            .unwrap();
        let err = tokio::time::timeout(Duration::from_secs(5), polling).await.expect("the long poll ended").unwrap();
        assert!(matches!(err, Err(Error::Disconnected { .. })), "{err:?}");
        let err = conn.request(&request).await.unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "the second request reconnected");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_to_an_unreachable_broker_share_one_connect_timeout() {
        // A listen backlog of 0 queues one connection; the kernel then ignores further SYNs, so
        // connecting hangs as it does to a host that is down.
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let _queued = TcpStream::connect(addr).await.unwrap();
        let conn = Connection::new(ConnectionConfig { connect_timeout: Duration::from_secs(1), ..config(addr) });
        let started = tokio::time::Instant::now();
        let request = MetadataRequest { topics: None };
        let results = futures::future::join_all((0..4).map(|_| conn.request(&request))).await;
        for r in results {
            assert!(matches!(r, Err(Error::Timeout { operation: "connect", .. })), "{r:?}");
        }
        // The paused clock advances only by the timeouts waited out: one, not four in turn.
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        // A later request tries again rather than reusing an old failure.
        let later = conn.request(&request).await;
        assert!(matches!(later, Err(Error::Timeout { operation: "connect", .. })), "{later:?}");
        drop(listener);
    }
}
