//! A connection's writes gathered into fewer, larger socket writes.
//!
//! The HTTP/2 layer writes each DATA frame with a write of its own and
//! flushes after each. Frames are as large as the client accepts, and gRPC
//! clients accept 16 KiB: a 1 GB result would be 65 000 writes through the
//! kernel, each a trip through the TCP stack of both ends. [`Coalescing`]
//! keeps what is written in a buffer and writes it out when the buffer is
//! full, or when a flush comes with nothing written since the flush before:
//! the HTTP/2 layer flushes after every frame it sends and once more when it
//! has nothing left to send, so a burst of frames leaves in one write.
//!
//! A flush that is put off wakes the connection's task, and the task's next
//! poll either flushes again (which writes) or reads (and a read first writes
//! what is gathered): nothing that was flushed waits on the peer's next move.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// What is gathered before it is written, at most. Each write wakes the
/// client to read it: a client that reads faster than the rows are made
/// wakes once a write, and a wake-up costs a Go client (ADBC's) about as
/// much as copying a few hundred kilobytes. Writes of a mebibyte rather
/// than 256 KiB took a stream to ADBC 0.96 of the time.
const CAPACITY: usize = 1024 * 1024;

/// `inner` with its writes gathered (see the module's documentation).
pub(super) struct Coalescing<T> {
    inner: T,
    /// What is gathered and not yet written to `inner`.
    buffer: BytesMut,
    /// Whether anything was written since the last flush.
    wrote_since_flush: bool,
}

impl<T: std::fmt::Debug> std::fmt::Debug for Coalescing<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescing")
            .field("inner", &self.inner)
            .field("gathered", &self.buffer.len())
            .finish_non_exhaustive()
    }
}

impl<T> Coalescing<T> {
    pub(super) fn new(inner: T) -> Self {
        Coalescing {
            inner,
            buffer: BytesMut::new(),
            wrote_since_flush: false,
        }
    }
}

impl<T: AsyncWrite + Unpin> Coalescing<T> {
    /// Writes what the buffer holds to `inner`.
    fn poll_write_buffer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.buffer.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buffer))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.buffer.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalescing<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        slices: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len: usize = slices.iter().map(|slice| slice.len()).sum();
        if this.buffer.len() + len > CAPACITY {
            ready!(this.poll_write_buffer(cx))?;
        }
        this.wrote_since_flush = true;
        if len >= CAPACITY {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, slices);
        }
        // The buffer grows to what the connection gathers (a connection
        // that answers small queries keeps a small one); once written out,
        // its space is taken back from the front, not allocated anew.
        this.buffer.reserve(len);
        for slice in slices {
            this.buffer.extend_from_slice(slice);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if std::mem::take(&mut this.wrote_since_flush) && !this.buffer.is_empty() {
            cx.waker().wake_by_ref();
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_write_buffer(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_buffer(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Coalescing<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Poll::Ready(Err(error)) = this.poll_write_buffer(cx) {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: Connected> Connected for Coalescing<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Waker;

    use futures::task::{ArcWake, waker};

    use super::*;

    /// A socket that records each write and flush; it takes at most
    /// `accepts` bytes a write, and refuses every other write at first.
    #[derive(Default)]
    struct Socket {
        writes: Vec<Vec<u8>>,
        flushes: usize,
        accepts: Option<usize>,
        refuse_next: bool,
    }

    impl Socket {
        fn bytes(&self) -> Vec<u8> {
            self.writes.concat()
        }
    }

    impl AsyncWrite for Socket {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            if this.accepts.is_some() {
                this.refuse_next = !this.refuse_next;
                if this.refuse_next {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
            }
            let n = data.len().min(this.accepts.unwrap_or(usize::MAX));
            this.writes.push(data[..n].to_vec());
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().flushes += 1;
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncRead for Socket {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl ArcWake for Wakes {
        fn wake_by_ref(arc_self: &Arc<Self>) {
            arc_self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A frame as the HTTP/2 layer writes it: a 9-byte header and a payload.
    fn frame(number: usize, len: usize) -> (Vec<u8>, Vec<u8>) {
        let header = vec![number as u8; 9];
        let payload = (0..len).map(|i| (i + number) as u8).collect();
        (header, payload)
    }

    /// Writes `frame` in as many calls as the writer takes, retrying
    /// refused writes.
    fn write_frame(
        writer: &mut Coalescing<Socket>,
        cx: &mut Context<'_>,
        (header, payload): &(Vec<u8>, Vec<u8>),
    ) {
        let whole = [header.as_slice(), payload.as_slice()].concat();
        let mut sent = 0;
        while sent < whole.len() {
            let slices = [IoSlice::new(&whole[sent..])];
            match Pin::new(&mut *writer).poll_write_vectored(cx, &slices) {
                Poll::Ready(Ok(n)) => sent += n,
                Poll::Ready(Err(error)) => panic!("write failed: {error}"),
                Poll::Pending => {}
            }
        }
    }

    fn flush(writer: &mut Coalescing<Socket>, cx: &mut Context<'_>) {
        loop {
            match Pin::new(&mut *writer).poll_flush(cx) {
                Poll::Ready(Ok(())) => return,
                Poll::Ready(Err(error)) => panic!("flush failed: {error}"),
                Poll::Pending => {}
            }
        }
    }

    #[test]
    fn frames_flushed_one_by_one_leave_in_one_write() {
        let wakes = Arc::new(Wakes::default());
        let waker = waker(Arc::clone(&wakes));
        let mut cx = Context::from_waker(&waker);
        let mut writer = Coalescing::new(Socket::default());
        let frames: Vec<_> = (0..10).map(|n| frame(n, 16 * 1024)).collect();
        for f in &frames {
            write_frame(&mut writer, &mut cx, f);
            flush(&mut writer, &mut cx);
        }
        assert!(writer.inner.writes.is_empty(), "nothing is written yet");
        assert_eq!(writer.inner.flushes, 0);
        assert!(
            wakes.0.load(Ordering::SeqCst) >= 1,
            "a flush put off wakes the task"
        );

        // The flush with nothing written since writes all of it.
        flush(&mut writer, &mut cx);
        assert_eq!(writer.inner.writes.len(), 1);
        assert_eq!(writer.inner.flushes, 1);
        let expected: Vec<u8> = frames
            .iter()
            .flat_map(|(h, p)| [h, p])
            .flatten()
            .copied()
            .collect();
        assert_eq!(writer.inner.bytes(), expected);

        // Flushing again writes nothing more.
        flush(&mut writer, &mut cx);
        assert_eq!(writer.inner.writes.len(), 1);
    }

    #[test]
    fn a_full_buffer_is_written_before_it_overflows() {
        let mut cx = Context::from_waker(Waker::noop());
        let mut writer = Coalescing::new(Socket::default());
        let frames: Vec<_> = (0..40).map(|n| frame(n, 16 * 1024)).collect();
        for f in &frames {
            write_frame(&mut writer, &mut cx, f);
            flush(&mut writer, &mut cx);
            assert!(writer.buffer.len() <= CAPACITY);
        }
        flush(&mut writer, &mut cx);
        let frame_len = 9 + 16 * 1024;
        assert_eq!(writer.inner.bytes().len(), 40 * frame_len);
        // As many whole frames as the buffer holds go in each write.
        assert_eq!(
            writer.inner.writes.len(),
            40_usize.div_ceil(CAPACITY / frame_len)
        );
        assert!(writer.inner.writes.iter().all(|w| w.len() <= CAPACITY));
    }

    #[test]
    fn a_socket_that_takes_little_at_a_time_gets_every_byte_in_order() {
        let mut cx = Context::from_waker(Waker::noop());
        let mut writer = Coalescing::new(Socket {
            accepts: Some(7_000),
            ..Socket::default()
        });
        let frames: Vec<_> = (0..30).map(|n| frame(n, 10_000 + n)).collect();
        for f in &frames {
            write_frame(&mut writer, &mut cx, f);
            flush(&mut writer, &mut cx);
        }
        // A write larger than the buffer goes to the socket as it is.
        let large = frame(99, CAPACITY + 1);
        write_frame(&mut writer, &mut cx, &large);
        flush(&mut writer, &mut cx);
        flush(&mut writer, &mut cx);
        let expected: Vec<u8> = frames
            .iter()
            .chain([&large])
            .flat_map(|(h, p)| [h, p])
            .flatten()
            .copied()
            .collect();
        assert_eq!(writer.inner.bytes(), expected);
    }

    #[test]
    fn a_read_or_a_shutdown_writes_what_a_flush_put_off() {
        let mut cx = Context::from_waker(Waker::noop());
        let mut writer = Coalescing::new(Socket::default());
        let f = frame(1, 100);
        write_frame(&mut writer, &mut cx, &f);
        flush(&mut writer, &mut cx);
        assert!(writer.inner.writes.is_empty());
        let mut space = [0u8; 16];
        let mut read = ReadBuf::new(&mut space);
        assert!(
            Pin::new(&mut writer)
                .poll_read(&mut cx, &mut read)
                .is_pending()
        );
        assert_eq!(writer.inner.bytes(), [f.0.clone(), f.1.clone()].concat());

        write_frame(&mut writer, &mut cx, &f);
        flush(&mut writer, &mut cx);
        assert_eq!(writer.inner.writes.len(), 1);
        assert!(matches!(
            Pin::new(&mut writer).poll_shutdown(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(
            writer.inner.bytes(),
            [&f.0, &f.1, &f.0, &f.1].map(|b| b.as_slice()).concat()
        );
    }
}
