//! One pipelined connection to a broker, and a handle that reconnects transparently.
//!
//! Requests are written in order by a writer task; responses are matched to requests by
//! correlation id by a reader task. Many requests may be in flight at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
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
}

/// A connection handle that reconnects on the next request after a failure.
#[derive(Debug, Clone)]
pub struct Connection {
    config: Arc<ConnectionConfig>,
    live: Arc<tokio::sync::Mutex<Option<Arc<Live>>>>,
    next_id: Arc<AtomicU32>,
}

impl Connection {
    /// A handle; the TCP connection is made on first use (see [`Connection::connect`]).
    pub fn new(config: ConnectionConfig) -> Connection {
        Connection {
            config: Arc::new(config),
            live: Arc::new(tokio::sync::Mutex::new(None)),
            next_id: Arc::new(AtomicU32::new(1)),
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
        let mut slot = self.live.lock().await;
        if let Some(l) = slot.as_ref() {
            if !l.dead.load(Ordering::Acquire) {
                return Ok(Arc::clone(l));
            }
        }
        let l = Arc::new(self.open().await?);
        *slot = Some(Arc::clone(&l));
        Ok(l)
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
        tokio::spawn(async move {
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
        tokio::spawn(async move {
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
        Ok(Live { tx, waiters, dead })
    }

    /// Sends a request and waits for its response, up to the request timeout plus `extra`.
    ///
    /// # Errors
    /// Connection failures, timeouts, response-level broker errors, or undecodable responses.
    pub async fn request_with<R: Request>(&self, request: &R, extra: Duration) -> Result<R::Response> {
        let live = self.live().await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        live.waiters.lock().expect("waiters lock").insert(id, tx);
        if live.dead.load(Ordering::Acquire)
            || live.tx.send((encode_request(id, &self.config.client_id, request), None)).is_err()
        {
            live.waiters.lock().expect("waiters lock").remove(&id);
            live.dead.store(true, Ordering::Release);
            return Err(Error::Disconnected { addr: self.config.broker.clone(), detail: "connection closed".into() });
        }
        let timeout = self.config.request_timeout + extra;
        let frame = match tokio::time::timeout(timeout, rx).await {
            Err(_) => {
                live.waiters.lock().expect("waiters lock").remove(&id);
                return Err(Error::Timeout { operation: R::API_KEY.name(), ms: timeout.as_millis() as u64 });
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
        body.map_err(|e| Error::broker(e.code, Some(e.message)))
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
                live.dead.store(true, Ordering::Release);
                Err(Error::Timeout { operation: R::API_KEY.name(), ms: self.config.request_timeout.as_millis() as u64 })
            }
        }
    }
}

fn fail_all(dead: &AtomicBool, waiters: &Waiters, addr: &str, detail: &str) {
    dead.store(true, Ordering::Release);
    let drained: Vec<_> = waiters.lock().expect("waiters lock").drain().collect();
    for (_, w) in drained {
        let _ = w.send(Err(Error::Disconnected { addr: addr.to_owned(), detail: detail.to_owned() }));
    }
}
