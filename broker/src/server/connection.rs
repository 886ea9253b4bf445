//! One client connection: a reader that decodes and dispatches requests, and a writer that sends
//! responses in request order with vectored writes.
//!
//! The two halves are joined by a bounded queue of pending responses
//! (`connection_in_flight_max`): when a client pipelines faster than the broker answers, or
//! stops reading its socket, the queue fills and the reader stops reading — backpressure through
//! TCP instead of buffering without bound.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;

use cairn_protocol::io::{write_all_vectored, IOV_MAX};
use cairn_protocol::{decode_request_header, encode_error_response, ApiKey, ErrorCode, FrameError};

use super::dispatch::{dispatch, LaterReply, Reply};
use super::frames::{Incoming, RequestCodec};
use super::stall::StallGuard;
use super::Broker;
use crate::handlers::produce::auto_create_topics;

/// A response that is ready now or will be later.
pub(crate) enum Pending {
    Ready(Vec<Bytes>),
    Later(LaterReply),
}

/// Initial read buffer per connection; it grows only as large frames actually arrive.
const READ_BUFFER_BYTES: usize = 8 * 1024;

/// Stop gathering more ready responses into one write past this many bytes.
const WRITE_GATHER_BYTES: usize = 4 * 1024 * 1024;

pub(crate) async fn run(broker: Arc<Broker>, stream: TcpStream, peer: SocketAddr) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%peer, error = %e, "set_nodelay failed");
    }
    let (rd, wr) = stream.into_split();
    let mut frames = FramedRead::with_capacity(rd, RequestCodec::new(broker.config.frame_bytes_max), READ_BUFFER_BYTES);
    let (tx, rx) = mpsc::channel::<Pending>(broker.config.connection_in_flight_max);
    let idle = Duration::from_millis(broker.config.idle_timeout_ms);
    let frame_timeout = Duration::from_millis(broker.config.frame_timeout_ms);
    let mut writer = tokio::spawn(write_loop(StallGuard::new(wr, frame_timeout), rx, peer));
    // Wake at least this often to check the idle and frame timeouts.
    let tick = frame_timeout.min(idle).min(Duration::from_millis(500)).max(Duration::from_millis(10));
    let mut last_frame = Instant::now();
    let mut partial_since: Option<Instant> = None;
    tracing::debug!(%peer, "connection opened");
    loop {
        let next = tokio::select! {
            _ = broker.shutdown.cancelled() => break,
            // The writer gave up (a client that stopped reading): stop reading too.
            _ = tx.closed() => break,
            r = frames.next() => Some(r),
            _ = tokio::time::sleep(tick) => None,
        };
        let Some(next) = next else {
            // Between requests the idle timeout applies; once part of a frame has arrived, the
            // rest must follow within frame_timeout_ms (a client trickling bytes is cut off).
            if frames.read_buffer().is_empty() && !frames.decoder().discarding() {
                partial_since = None;
                if last_frame.elapsed() >= idle {
                    tracing::info!(%peer, idle_ms = broker.config.idle_timeout_ms, "closing idle connection");
                    break;
                }
            } else if partial_since.get_or_insert_with(Instant::now).elapsed() >= frame_timeout {
                tracing::warn!(%peer, frame_timeout_ms = broker.config.frame_timeout_ms, "closing connection: request frame incomplete in time");
                metrics::counter!("cairn_requests_total", "api" => "unknown", "result" => "FRAME_TIMEOUT").increment(1);
                break;
            }
            continue;
        };
        last_frame = Instant::now();
        partial_since = (!frames.read_buffer().is_empty() || frames.decoder().discarding()).then(Instant::now);
        let reply = match next {
            None => break,
            Some(Err(FrameError::TooLarge { len, max })) => {
                tracing::warn!(%peer, len, max, "closing connection: frame exceeds frame_bytes_max");
                metrics::counter!("cairn_requests_total", "api" => "unknown", "result" => "FRAME_TOO_LARGE")
                    .increment(1);
                break;
            }
            Some(Err(FrameError::Io(e))) => {
                tracing::debug!(%peer, error = %e, "connection read failed");
                break;
            }
            Some(Ok(Incoming::Oversized { len, max, head })) => oversized(head, len, max, peer),
            Some(Ok(Incoming::Request(frame))) => serve(&broker, frame, peer).await,
        };
        let pending = match reply {
            Reply::Now(chunks) => Pending::Ready(chunks),
            Reply::Later(rx) | Reply::InOrder(rx) => Pending::Later(rx),
            Reply::Nothing => continue,
            Reply::Close => break,
            Reply::CreateTopics(_) => {
                tracing::error!(%peer, "a request asked again to create topics; closing the connection");
                break;
            }
        };
        let pending = match tx.try_send(pending) {
            Ok(()) => continue,
            Err(mpsc::error::TrySendError::Closed(_)) => break, // the writer is gone
            Err(mpsc::error::TrySendError::Full(pending)) => pending,
        };
        // A full queue (`connection_in_flight_max` responses owed) stops reading until one is
        // written; the idle timeout still runs meanwhile, from the last request read, so that
        // responses that may wait long (parked fetches) cannot hold the connection past it.
        // The request was carried out, so its response is never dropped: on idle or shutdown
        // it still waits its turn (up to frame_timeout_ms), and then reading stops.
        let (slot, go_on) = tokio::select! {
            slot = tx.reserve() => (slot.ok(), true),
            _ = broker.shutdown.cancelled() => (None, false),
            _ = tokio::time::sleep_until((last_frame + idle).into()) => {
                tracing::info!(%peer, idle_ms = broker.config.idle_timeout_ms,
                    "closing idle connection: no request read while its responses were owed");
                (None, false)
            }
        };
        let slot = match slot {
            Some(slot) => Some(slot),
            None if !go_on => tokio::time::timeout(frame_timeout, tx.reserve()).await.ok().and_then(Result::ok),
            None => break, // the writer is gone: the client stopped reading
        };
        let Some(slot) = slot else {
            tracing::info!(%peer, frame_timeout_ms = broker.config.frame_timeout_ms,
                "closing connection: a response could not be queued in time");
            break;
        };
        slot.send(pending);
        if !go_on {
            break;
        }
    }
    drop(tx);
    // The writer drains every response already owed, then closes the socket. A client that has
    // gone away cannot take them, and a parked fetch may wait as long as its client asked: the
    // connection (its slot, its queued responses, its parked fetches) is given up after
    // frame_timeout_ms.
    match tokio::time::timeout(frame_timeout, &mut writer).await {
        Ok(Ok(Err(e))) => tracing::debug!(%peer, error = %e, "connection write failed"),
        Ok(_) => {}
        Err(_) => {
            writer.abort();
            tracing::info!(%peer, frame_timeout_ms = broker.config.frame_timeout_ms,
                "closing connection: responses still owed after the client stopped sending");
        }
    }
    tracing::debug!(%peer, "connection closed");
}

/// Dispatches a request, creating the topics it names first where auto-creation asks for it.
async fn serve(broker: &Arc<Broker>, frame: Bytes, peer: SocketAddr) -> Reply {
    let received = Instant::now();
    // Kept only where it may have to be dispatched again (auto-creation is off by default).
    let again = broker.config.auto_create_topics.then(|| frame.clone());
    let mut reply = dispatch(broker, frame, peer, again.is_some(), received);
    if let (Reply::CreateTopics(names), Some(frame)) = (&mut reply, again) {
        let (creator, names) = (Arc::clone(broker), std::mem::take(names));
        if let Err(e) = tokio::task::spawn_blocking(move || auto_create_topics(&creator, &names)).await {
            tracing::error!(%peer, error = %e, "auto-creating topics panicked");
        }
        reply = dispatch(broker, frame, peer, false, received);
    }
    match reply {
        // Done before the next request is read, so that requests take effect in their order.
        Reply::InOrder(work) => work.await.map_or(Reply::Close, Reply::Now),
        reply => reply,
    }
}

/// Answers a request over `frame_bytes_max`, whose bytes are being dropped: `BATCH_TOO_LARGE`
/// with the limit in the message, or nothing for a Produce with `acks = 0`, which expects no
/// answer.
fn oversized(head: Bytes, len: u64, max: u32, peer: SocketAddr) -> Reply {
    metrics::counter!("cairn_requests_total", "api" => "unknown", "result" => "FRAME_TOO_LARGE").increment(1);
    let (api_key, correlation_id, acks) = match decode_request_header(head) {
        Ok((h, mut body)) => (h.api_key, h.correlation_id, body.u8().ok()),
        Err(cairn_protocol::HeaderError::Invalid { correlation_id, .. }) => (u16::MAX, correlation_id, None),
        Err(cairn_protocol::HeaderError::Unreadable(_)) => {
            tracing::warn!(%peer, len, max, "closing connection: frame exceeds frame_bytes_max");
            return Reply::Close;
        }
    };
    let api = ApiKey::from_u16(api_key).map_or("unknown", ApiKey::name);
    tracing::warn!(%peer, api, len, max, "request exceeds frame_bytes_max: answered BATCH_TOO_LARGE, its bytes dropped");
    if api_key == ApiKey::Produce as u16 && acks == Some(0) {
        return Reply::Nothing;
    }
    let message = format!("request of {len} bytes is over the broker's frame_bytes_max of {max} bytes");
    Reply::Now(encode_error_response(correlation_id, ErrorCode::BatchTooLarge, &message))
}

async fn write_loop(
    mut wr: StallGuard<OwnedWriteHalf>,
    mut rx: mpsc::Receiver<Pending>,
    peer: SocketAddr,
) -> std::io::Result<()> {
    let mut out: Vec<Bytes> = Vec::with_capacity(64);
    // A later response found unfinished while gathering: it heads the next write.
    let mut carried: Option<Pending> = None;
    loop {
        let first = match carried.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => break,
            },
        };
        let Some(mut gathered) = resolve(first, &mut out).await else {
            return broken(wr, peer).await;
        };
        // Gather more responses that are ready now into the same write; stop at one that is
        // not (a parked fetch may wait for seconds, and what is gathered must not wait with it).
        while gathered < WRITE_GATHER_BYTES && out.len() < IOV_MAX {
            let chunks = match rx.try_recv() {
                Ok(Pending::Ready(c)) => c,
                Ok(Pending::Later(mut f)) => match (&mut f).now_or_never() {
                    Some(Some(c)) => c,
                    Some(None) => {
                        write_all_vectored(&mut wr, &mut out).await?;
                        return broken(wr, peer).await;
                    }
                    None => {
                        carried = Some(Pending::Later(f));
                        break;
                    }
                },
                Err(_) => break,
            };
            gathered += append(&mut out, chunks);
        }
        write_all_vectored(&mut wr, &mut out).await?;
    }
    let _ = wr.shutdown().await;
    tracing::trace!(%peer, "writer finished");
    Ok(())
}

/// Appends a response's chunks to `out`, waiting for it if needed; returns its size, or `None`
/// if the handler failed without answering.
async fn resolve(p: Pending, out: &mut Vec<Bytes>) -> Option<usize> {
    let chunks = match p {
        Pending::Ready(c) => c,
        Pending::Later(f) => f.await?,
    };
    Some(append(out, chunks))
}

/// Appends a response's chunks to `out`; returns its size.
fn append(out: &mut Vec<Bytes>, chunks: Vec<Bytes>) -> usize {
    let n = chunks.iter().map(Bytes::len).sum();
    out.extend(chunks);
    n
}

/// A handler died without answering: responses after it would be misattributed by a client that
/// matches them in order, so the connection is closed and the client retries on a new one.
async fn broken(mut wr: StallGuard<OwnedWriteHalf>, peer: SocketAddr) -> std::io::Result<()> {
    tracing::error!(%peer, "a request handler failed without answering; closing the connection");
    let _ = wr.shutdown().await;
    Ok(())
}
