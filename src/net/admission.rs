//! Admission: budgets for connections that are not viewers yet.
//!
//! A connection goes through three states, each with its own budget, so that
//! what is cheap for an attacker (QUIC Initials, handshakes that never say
//! Hello) can never take the slots of admitted viewers:
//!
//! | state | budget | beyond it |
//! |---|---|---|
//! | handshaking | `max_handshakes`; Retry first for unvalidated addresses from `retry_above` | refused by QUIC |
//! | awaiting Hello | `max_awaiting_hello`, `hello_timeout` each | the oldest is closed (`hello_timeout`) |
//! | viewer | `max_connections` | closed with `server_full` |
//!
//! and one more across the first two: `max_per_source` per IP address.
//!
//! [`Budget`] is the pure bookkeeping; [`Admission`] wraps it in a lock and
//! remembers the connections waiting for Hello, so the oldest can be closed.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::{Arc, Mutex},
};

use crate::CloseCode;

/// The limits [`Budget`] enforces.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_handshakes: usize,
    pub(crate) retry_above: usize,
    pub(crate) max_per_source: usize,
    pub(crate) max_awaiting_hello: usize,
    pub(crate) max_viewers: usize,
}

/// What to do with a new connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Start the handshake; the attempt now counts as handshaking.
    Accept,
    /// Answer with a QUIC Retry: no state until the address is validated.
    Retry,
    /// Refuse: too many handshakes in progress.
    RefuseHandshakes,
    /// Refuse: too many unadmitted connections from this address.
    RefusePerSource,
}

/// Where a counted connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Handshaking,
    AwaitingHello,
    Viewer,
}

/// Connections by state, and unadmitted ones by source. PURE: no clock, no I/O.
#[derive(Debug)]
pub(crate) struct Budget {
    limits: Limits,
    handshaking: usize,
    awaiting: usize,
    viewers: usize,
    per_source: HashMap<IpAddr, usize>,
    /// Connections awaiting Hello, oldest first.
    waiting: VecDeque<u64>,
}

impl Budget {
    pub(crate) fn new(limits: Limits) -> Self {
        Budget {
            limits,
            handshaking: 0,
            awaiting: 0,
            viewers: 0,
            per_source: HashMap::new(),
            waiting: VecDeque::new(),
        }
    }

    /// A new attempt from `ip`; `validated` when it answered a Retry.
    pub(crate) fn incoming(&mut self, ip: IpAddr, validated: bool) -> Decision {
        // Retry first: it costs nothing and proves the address, so the
        // per-source count below is about a real sender.
        if !validated && self.handshaking >= self.limits.retry_above {
            return Decision::Retry;
        }
        if self.handshaking >= self.limits.max_handshakes {
            return Decision::RefuseHandshakes;
        }
        let n = self.per_source.entry(ip).or_insert(0);
        if *n >= self.limits.max_per_source {
            return Decision::RefusePerSource;
        }
        *n += 1;
        self.handshaking += 1;
        Decision::Accept
    }

    /// Handshake `id` from `ip` completed. Returns `Err(())` when every viewer
    /// slot is taken (the caller closes it with `server_full` and calls
    /// [`leave`](Self::leave)), else the id of a connection to close to make
    /// room in the Hello budget, if any.
    pub(crate) fn handshake_done(&mut self, id: u64) -> Result<Option<u64>, ()> {
        self.handshaking -= 1;
        self.awaiting += 1;
        self.waiting.push_back(id);
        if self.viewers >= self.limits.max_viewers {
            return Err(());
        }
        if self.waiting.len() > self.limits.max_awaiting_hello {
            return Ok(self.waiting.pop_front());
        }
        Ok(None)
    }

    /// Connection `id` from `ip`, awaiting Hello, sent a good one. `false`
    /// when every viewer slot is taken.
    pub(crate) fn admit(&mut self, id: u64, ip: IpAddr) -> bool {
        if self.viewers >= self.limits.max_viewers {
            return false;
        }
        self.awaiting -= 1;
        self.waiting.retain(|w| *w != id);
        self.release_source(ip);
        self.viewers += 1;
        true
    }

    /// Connection `id` from `ip` ended in `state`.
    pub(crate) fn leave(&mut self, id: u64, ip: IpAddr, state: State) {
        match state {
            State::Handshaking => self.handshaking -= 1,
            State::AwaitingHello => {
                self.awaiting -= 1;
                self.waiting.retain(|w| *w != id);
            }
            State::Viewer => {
                self.viewers -= 1;
                return;
            }
        }
        self.release_source(ip);
    }

    fn release_source(&mut self, ip: IpAddr) {
        if let Some(n) = self.per_source.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&ip);
            }
        }
    }

    /// Connections (handshaking, awaiting Hello, viewers). Awaiting Hello
    /// leaves out connections already closed to make room, still ending.
    pub(crate) fn counts(&self) -> (usize, usize, usize) {
        (self.handshaking, self.waiting.len(), self.viewers)
    }
}

/// [`Budget`] behind a lock, with the connections awaiting Hello.
#[derive(Debug)]
pub(crate) struct Admission {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    budget: Budget,
    next_id: u64,
    waiting: HashMap<u64, quinn::Connection>,
}

impl Admission {
    pub(crate) fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Admission {
            inner: Mutex::new(Inner {
                budget: Budget::new(limits),
                next_id: 0,
                waiting: HashMap::new(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides on an attempt; with [`Decision::Accept`], the ticket that
    /// keeps it counted until dropped.
    pub(crate) fn incoming(
        self: &Arc<Self>,
        ip: IpAddr,
        validated: bool,
    ) -> (Decision, Option<Ticket>) {
        let ip = ip.to_canonical();
        let mut inner = self.lock();
        let decision = inner.budget.incoming(ip, validated);
        if decision != Decision::Accept {
            return (decision, None);
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let ticket = Ticket {
            admission: self.clone(),
            id,
            ip,
            state: State::Handshaking,
        };
        (decision, Some(ticket))
    }

    /// Connections (handshaking, awaiting Hello, viewers).
    pub(crate) fn counts(&self) -> (usize, usize, usize) {
        self.lock().budget.counts()
    }
}

/// One connection's place in the budgets; dropping it gives the place back.
#[derive(Debug)]
pub(crate) struct Ticket {
    admission: Arc<Admission>,
    id: u64,
    ip: IpAddr,
    state: State,
}

/// Why a ticket could not move on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Full;

impl Ticket {
    /// The handshake of `conn` completed: it now waits for Hello. `Err` when
    /// every viewer slot is taken. Returns whether a connection waiting
    /// longer was closed to make room.
    pub(crate) fn handshake_done(&mut self, conn: &quinn::Connection) -> Result<bool, Full> {
        let evicted = {
            let mut inner = self.admission.lock();
            let done = inner.budget.handshake_done(self.id);
            self.state = State::AwaitingHello;
            match done {
                Err(()) => return Err(Full),
                Ok(evict) => {
                    inner.waiting.insert(self.id, conn.clone());
                    evict.and_then(|id| inner.waiting.remove(&id))
                }
            }
        };
        // Its own task sees the close, gives its ticket back and counts it.
        if let Some(old) = &evicted {
            old.close(
                CloseCode::HelloTimeout.varint(),
                b"no hello in time: too many connections waiting for hello",
            );
        }
        Ok(evicted.is_some())
    }

    /// A good Hello arrived: the connection becomes a viewer. `Err` when
    /// every viewer slot is taken.
    pub(crate) fn admit(&mut self) -> Result<(), Full> {
        let mut inner = self.admission.lock();
        if !inner.budget.admit(self.id, self.ip) {
            return Err(Full);
        }
        inner.waiting.remove(&self.id);
        self.state = State::Viewer;
        Ok(())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut inner = self.admission.lock();
        inner.budget.leave(self.id, self.ip, self.state);
        if self.state == State::AwaitingHello {
            inner.waiting.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_handshakes: 4,
            retry_above: 2,
            max_per_source: 2,
            max_awaiting_hello: 2,
            max_viewers: 1,
        }
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn retry_then_handshake_cap_then_per_source_cap() {
        let mut b = Budget::new(limits());
        assert_eq!(b.incoming(ip(1), false), Decision::Accept);
        assert_eq!(b.incoming(ip(2), false), Decision::Accept);
        // Two in progress: unvalidated attempts are sent a Retry.
        assert_eq!(b.incoming(ip(3), false), Decision::Retry);
        assert_eq!(b.incoming(ip(3), true), Decision::Accept);
        // A validated address still has its per-source cap.
        assert_eq!(b.incoming(ip(1), true), Decision::Accept);
        assert_eq!(b.incoming(ip(1), true), Decision::RefuseHandshakes);
        b.leave(9, ip(2), State::Handshaking);
        assert_eq!(b.incoming(ip(1), true), Decision::RefusePerSource);
        assert_eq!(b.incoming(ip(4), true), Decision::Accept);
        assert_eq!(b.counts(), (4, 0, 0));
    }

    #[test]
    fn waiting_for_hello_has_its_own_budget_and_evicts_the_oldest() {
        let mut b = Budget::new(Limits {
            max_per_source: 10,
            retry_above: 10,
            ..limits()
        });
        for id in 0..3 {
            assert_eq!(b.incoming(ip(1), true), Decision::Accept);
            let evict = b.handshake_done(id).unwrap();
            assert_eq!(evict, (id == 2).then_some(0), "id {id}");
        }
        // The evicted one's task gives its place back.
        b.leave(0, ip(1), State::AwaitingHello);
        assert_eq!(b.counts(), (0, 2, 0));
        // Being evicted twice is impossible: it left the queue.
        assert!(b.admit(1, ip(1)));
        assert_eq!(b.counts(), (0, 1, 1));
        // The one viewer slot is taken: the next handshake is refused as full.
        assert_eq!(b.incoming(ip(2), true), Decision::Accept);
        assert_eq!(b.handshake_done(3), Err(()));
        b.leave(3, ip(2), State::AwaitingHello);
        assert!(!b.admit(2, ip(1)));
        b.leave(2, ip(1), State::AwaitingHello);
        b.leave(1, ip(1), State::Viewer);
        assert_eq!(b.counts(), (0, 0, 0));
        assert!(b.per_source.is_empty(), "every source released");
    }
}
