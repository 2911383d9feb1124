//! The time the API's limits read ([`crate::ratelimit`]'s buckets, the trusted proxies'
//! look-ups): `Instant::now()`, except in tests, which may stop it and move it by hand.
//!
//! Why not tokio's paused time: those tests drive the real server over HTTP, with real
//! sockets, SSH and database connections, whose own timeouts must keep running; only
//! the limits' time must stand still, so that what they allow does not depend on how
//! fast the machine is.

use std::time::Instant;

/// A handle on the clock; clones read (and, in tests, move) the same time. In the shipped
/// binary it holds nothing and reads `Instant::now()`.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    /// Where a test stopped the clock, if it did.
    #[cfg(any(test, feature = "testkit"))]
    stopped: std::sync::Arc<std::sync::Mutex<Option<Instant>>>,
}

impl Clock {
    /// The time now.
    pub fn now(&self) -> Instant {
        #[cfg(any(test, feature = "testkit"))]
        if let Some(at) = *self.stopped.lock().expect("clock poisoned") {
            return at;
        }
        Instant::now()
    }

    /// Stops the clock where it is, for every clone; returns that time.
    #[cfg(any(test, feature = "testkit"))]
    pub fn stop(&self) -> Instant {
        let mut stopped = self.stopped.lock().expect("clock poisoned");
        *stopped.get_or_insert_with(Instant::now)
    }

    /// Moves a stopped clock on by `by`.
    #[cfg(any(test, feature = "testkit"))]
    pub fn advance(&self, by: std::time::Duration) {
        let mut stopped = self.stopped.lock().expect("clock poisoned");
        let at = stopped.as_mut().expect("the clock is stopped first");
        *at += by;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_stopped_clock_moves_only_when_told_and_for_every_clone() {
        let clock = Clock::default();
        let seen = clock.clone();
        let at = clock.stop();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(seen.now(), at);
        seen.advance(Duration::from_secs(3));
        assert_eq!(clock.now(), at + Duration::from_secs(3));
    }
}
