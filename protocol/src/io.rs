//! Writing frames: chunked (zero-copy) frames go to the socket with vectored writes.

use std::io::IoSlice;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Most buffers handed to one `writev` (the kernel's `IOV_MAX` is 1,024).
pub const IOV_MAX: usize = 512;

/// Writes every chunk, in order, with as few `writev` calls as the kernel allows, and empties
/// `bufs`. No chunk is copied: record batches go from their buffers straight to the socket.
///
/// # Errors
/// The write error; `WriteZero` if the peer stops accepting bytes. After an error it is unknown
/// how much of `bufs` reached the peer, so the connection must not be used again.
pub async fn write_all_vectored<W: AsyncWrite + Unpin>(wr: &mut W, bufs: &mut Vec<Bytes>) -> std::io::Result<()> {
    let mut start = 0;
    while start < bufs.len() {
        let end = (start + IOV_MAX).min(bufs.len());
        let mut written = {
            // In the future, not on the heap: a produce request of 1 KiB values is thousands of
            // chunks, and a fresh vector per `writev` showed up in profiles.
            let mut slices = [IoSlice::new(&[]); IOV_MAX];
            for (slot, b) in slices.iter_mut().zip(&bufs[start..end]) {
                *slot = IoSlice::new(b);
            }
            wr.write_vectored(&slices[..end - start]).await?
        };
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while written > 0 && start < bufs.len() {
            let len = bufs[start].len();
            if written >= len {
                written -= len;
                start += 1;
            } else {
                bufs[start].advance(written);
                written = 0;
            }
        }
        while start < bufs.len() && bufs[start].is_empty() {
            start += 1;
        }
    }
    bufs.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `step` bytes per call, to exercise partial writes.
    struct Trickle {
        out: Vec<u8>,
        step: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.step);
            self.out.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn every_byte_goes_out_in_order_whatever_the_partial_writes() {
        let chunks: Vec<Bytes> = (0..2000u32).map(|i| Bytes::from(vec![(i % 251) as u8; (i % 7) as usize])).collect();
        let want: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        for step in [1, 3, 64, usize::MAX] {
            let mut w = Trickle { out: Vec::new(), step };
            let mut bufs = chunks.clone();
            write_all_vectored(&mut w, &mut bufs).await.unwrap();
            assert_eq!(w.out, want, "step {step}");
            assert!(bufs.is_empty());
        }
    }
}
