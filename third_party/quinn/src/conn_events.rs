//! Grantline patch 1 (see `PATCHES.md`): the endpoint's events for one
//! connection, in a queue that holds no memory while it is empty.
//!
//! Upstream carries these events over `tokio::sync::mpsc::unbounded_channel`,
//! which allocates its first block of 32 slots when the channel is made: about
//! 6.7 KB per connection (a `ConnectionEvent` is some 200 bytes), held for the
//! connection's whole life although the queue is empty almost all of it. A
//! broker holding 100,000 idle connections paid 670 MB for empty queues. This
//! queue allocates when an event arrives and frees when it is drained.
//!
//! Same contract as the channel it replaces: one sender (the endpoint), one
//! receiver (the connection's driver); `send` hands the event back once the
//! receiver is gone; the receiver sees the end (`None`) once the sender is
//! dropped and every queued event was taken; and after `BUDGET` events in a
//! row the receiver yields once (`Pending`, its task woken to come back), as
//! tokio's channel did through the runtime's cooperative budget, so a peer
//! flooding one connection cannot keep its driver (and its state lock) busy
//! forever.

use std::{
    collections::VecDeque,
    sync::Arc,
    task::{Context, Poll, Waker},
};

use crate::{ConnectionEvent, mutex::Mutex};

/// Events taken in a row before the receiver yields once.
const BUDGET: u32 = 32;

pub(crate) fn channel() -> (Sender, Receiver) {
    let queue = Arc::new(Mutex::new(Queue {
        events: VecDeque::new(),
        waker: None,
        sender_gone: false,
        receiver_gone: false,
    }));
    (
        Sender(queue.clone()),
        Receiver {
            queue,
            taken_in_a_row: 0,
        },
    )
}

#[derive(Debug)]
struct Queue {
    events: VecDeque<ConnectionEvent>,
    /// The receiver's waker, while it waits on an empty queue.
    waker: Option<Waker>,
    sender_gone: bool,
    receiver_gone: bool,
}

#[derive(Debug)]
pub(crate) struct Sender(Arc<Mutex<Queue>>);

impl Sender {
    /// Queues `event` and wakes the receiver; gives `event` back if the receiver was dropped
    /// (as the channel's `SendError(event)` did).
    #[allow(clippy::result_large_err)]
    pub(crate) fn send(&self, event: ConnectionEvent) -> Result<(), ConnectionEvent> {
        let waker = {
            let mut queue = self.0.lock("conn_events send");
            if queue.receiver_gone {
                return Err(event);
            }
            queue.events.push_back(event);
            queue.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let waker = {
            let mut queue = self.0.lock("conn_events close");
            queue.sender_gone = true;
            queue.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

#[derive(Debug)]
pub(crate) struct Receiver {
    queue: Arc<Mutex<Queue>>,
    taken_in_a_row: u32,
}

impl Receiver {
    /// The next event; `Ready(None)` once the sender is gone and the queue is
    /// drained; `Pending` with the task woken after `BUDGET` events in a row.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<ConnectionEvent>> {
        if self.taken_in_a_row >= BUDGET {
            self.taken_in_a_row = 0;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let mut queue = self.queue.lock("conn_events recv");
        if let Some(event) = queue.events.pop_front() {
            if queue.events.is_empty() {
                // Give the buffer back: an idle connection holds no queue memory.
                queue.events = VecDeque::new();
            }
            self.taken_in_a_row += 1;
            return Poll::Ready(Some(event));
        }
        self.taken_in_a_row = 0;
        if queue.sender_gone {
            return Poll::Ready(None);
        }
        match &queue.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => queue.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Bytes the queue holds for events (for tests).
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.queue.lock("conn_events capacity").events.capacity()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let mut queue = self.queue.lock("conn_events drop");
        queue.receiver_gone = true;
        // What was queued is of no use to anyone now.
        queue.events = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::VarInt;
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        task::Wake,
    };

    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn close(code: u32) -> ConnectionEvent {
        ConnectionEvent::Close {
            error_code: VarInt::from_u32(code),
            reason: bytes::Bytes::new(),
        }
    }

    fn code(event: Option<ConnectionEvent>) -> Option<u64> {
        match event {
            Some(ConnectionEvent::Close { error_code, .. }) => Some(error_code.into_inner()),
            Some(other) => panic!("unexpected event {other:?}"),
            None => None,
        }
    }

    #[test]
    fn events_arrive_in_order_and_the_drained_queue_holds_no_memory() {
        let (send, mut recv) = channel();
        let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);

        assert_eq!(recv.capacity(), 0, "a new queue allocates nothing");
        assert!(recv.poll_recv(&mut cx).is_pending());
        for i in 0..40 {
            send.send(close(i)).unwrap();
        }
        assert_eq!(
            counter.0.load(Ordering::SeqCst),
            1,
            "the waiting receiver is woken once"
        );
        assert!(recv.capacity() >= 40);
        let mut i = 0;
        while i < 40 {
            match recv.poll_recv(&mut cx) {
                Poll::Ready(event) => assert_eq!(code(event), Some(i)),
                // The budget's yield: the next poll goes on.
                Poll::Pending => continue,
            }
            i += 1;
        }
        assert_eq!(recv.capacity(), 0, "a drained queue gives its buffer back");
        assert!(recv.poll_recv(&mut cx).is_pending());
        let woken = counter.0.load(Ordering::SeqCst);
        send.send(close(7)).unwrap();
        assert_eq!(
            counter.0.load(Ordering::SeqCst),
            woken + 1,
            "woken again after waiting again"
        );
    }

    #[test]
    fn the_receiver_sees_the_end_only_after_the_queued_events() {
        let (send, mut recv) = channel();
        let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        send.send(close(1)).unwrap();
        drop(send);
        assert!(matches!(recv.poll_recv(&mut cx), Poll::Ready(Some(_))));
        assert!(matches!(recv.poll_recv(&mut cx), Poll::Ready(None)));

        let (send, mut recv) = channel();
        assert!(recv.poll_recv(&mut cx).is_pending());
        drop(send);
        assert_eq!(
            counter.0.load(Ordering::SeqCst),
            1,
            "a waiting receiver is woken by the end"
        );
        assert!(matches!(recv.poll_recv(&mut cx), Poll::Ready(None)));
    }

    #[test]
    fn a_flooded_receiver_yields_after_its_budget_and_asks_to_come_back() {
        let (send, mut recv) = channel();
        let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        for i in 0..(BUDGET + 5) {
            send.send(close(i)).unwrap();
        }
        for i in 0..BUDGET {
            assert!(
                matches!(recv.poll_recv(&mut cx), Poll::Ready(Some(_))),
                "event {i}"
            );
        }
        assert!(
            recv.poll_recv(&mut cx).is_pending(),
            "no yield after {BUDGET} events"
        );
        assert_eq!(
            counter.0.load(Ordering::SeqCst),
            1,
            "the yield wakes the task to come back"
        );
        for i in BUDGET..(BUDGET + 5) {
            match recv.poll_recv(&mut cx) {
                Poll::Ready(event) => assert_eq!(code(event), Some(u64::from(i))),
                Poll::Pending => panic!("event {i} was queued"),
            }
        }
        assert!(recv.poll_recv(&mut cx).is_pending());
    }

    #[test]
    fn sending_to_a_dropped_receiver_gives_the_event_back() {
        let (send, recv) = channel();
        drop(recv);
        assert_eq!(code(send.send(close(3)).err()), Some(3));
    }
}
