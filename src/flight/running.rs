//! The DoGet streams of queries running now, by caller and ticket, so that
//! `CancelFlightInfo` (and the older `CancelQuery`) can stop them.
//!
//! A cancelled stream's query is dropped at once, from the cancelling call,
//! so its work and memory stop even while its client reads nothing; the
//! stream itself then ends with `CANCELLED` at its next poll, never as if
//! its result were complete.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use futures::task::AtomicWaker;
use parking_lot::Mutex;
use tonic::Status;

use super::MessageStream;
use super::status::ProtocolError;

/// A caller's running streams of one ticket.
type Key = (String, Bytes);

/// The running DoGet streams of one gateway.
#[derive(Debug, Default)]
pub(super) struct RunningStreams {
    streams: Mutex<HashMap<Key, Vec<Arc<Slot>>>>,
}

/// What the registry and a tracked stream share.
struct Slot {
    /// The query's messages; taken (and dropped) by a cancel.
    messages: Mutex<Option<MessageStream>>,
    /// Wakes the stream's task after a cancel.
    waker: AtomicWaker,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("running", &self.messages.lock().is_some())
            .finish_non_exhaustive()
    }
}

impl RunningStreams {
    /// `messages`, the answer to `user`'s DoGet of `ticket`, as a stream a
    /// cancel of that ticket stops.
    pub(super) fn track(
        self: &Arc<Self>,
        user: &str,
        ticket: Bytes,
        messages: MessageStream,
    ) -> MessageStream {
        let key = (user.to_string(), ticket);
        let slot = Arc::new(Slot {
            messages: Mutex::new(Some(messages)),
            waker: AtomicWaker::new(),
        });
        self.streams
            .lock()
            .entry(key.clone())
            .or_default()
            .push(Arc::clone(&slot));
        Box::pin(Tracked {
            streams: Arc::clone(self),
            key,
            slot,
            ended: false,
        })
    }

    /// Stops every stream `user` is reading of `ticket`; how many there were.
    pub(super) fn cancel(&self, user: &str, ticket: &Bytes) -> usize {
        let key = (user.to_string(), ticket.clone());
        let slots = self.streams.lock().remove(&key).unwrap_or_default();
        for slot in &slots {
            // Dropped here, outside the registry's lock: the query's tasks
            // are aborted and its memory returned.
            let messages = slot.messages.lock().take();
            drop(messages);
            slot.waker.wake();
        }
        slots.len()
    }

    fn remove(&self, key: &Key, slot: &Arc<Slot>) {
        let mut streams = self.streams.lock();
        if let Some(slots) = streams.get_mut(key) {
            slots.retain(|other| !Arc::ptr_eq(other, slot));
            if slots.is_empty() {
                streams.remove(key);
            }
        }
    }
}

/// A DoGet stream that a cancel can stop.
/// Its entry in the registry goes with it.
struct Tracked {
    streams: Arc<RunningStreams>,
    key: Key,
    slot: Arc<Slot>,
    /// Whether the stream has ended (its last item, or `CANCELLED`, given).
    ended: bool,
}

impl Stream for Tracked {
    type Item = Result<super::encode::Message, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        self.slot.waker.register(cx.waker());
        let polled = self
            .slot
            .messages
            .lock()
            .as_mut()
            .map(|messages| messages.as_mut().poll_next(cx));
        let Some(polled) = polled else {
            self.ended = true;
            return Poll::Ready(Some(Err(ProtocolError::Cancelled(
                "the query was cancelled by its caller".into(),
            )
            .into())));
        };
        if matches!(polled, Poll::Ready(None)) {
            self.ended = true;
        }
        polled
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.streams.remove(&self.key, &self.slot);
    }
}
