//! A rate limit on what costs Orion work but proves nothing: requests without a token,
//! with an unknown or revoked one, and the open routes (`/health`, the dashboard's
//! assets, unknown paths). Each client address has a bucket of `burst` requests that
//! refills at `per_second`; an empty bucket means 429, answered before any token is
//! looked up in the database.
//!
//! A request whose token turns out to be good gets its turn back at once
//! ([`AddressLimiter::refund`]), so a tenant's successful requests never use up its
//! address's budget. The turn is taken *before* the lookup rather than after a failure:
//! 400 junk tokens arriving at once would otherwise all pass the check before the first
//! lookup failed. (This is also why the `governor` crate does not fit: it cannot give a
//! turn back.)
//!
//! The bucket is a GCRA (a virtual scheduling form of the token bucket): one instant per
//! address, the time at which its bucket will be full again. Time is passed in, so the
//! arithmetic is tested without sleeping.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Addresses tracked at most. Beyond it, addresses whose bucket is full again are
/// forgotten; if all of them are still draining (a flood from very many addresses), the
/// new ones share a single bucket, so memory stays bounded and the flood is limited as
/// a whole.
const MAX_TRACKED: usize = 100_000;

/// One bucket per client address (IPv6: per /64, which one host usually owns whole).
#[derive(Debug)]
pub struct AddressLimiter {
    burst: u32,
    /// Time one request takes to be refilled: `1 / per_second`.
    interval: Duration,
    /// Per address: when its bucket is full again (absent or past: full now).
    full_at: Mutex<HashMap<IpAddr, Instant>>,
    refused: AtomicU64,
    admitted: AtomicU64,
}

impl AddressLimiter {
    /// `burst` requests at once, refilled at `per_second`; both must be positive.
    pub fn new(burst: u32, per_second: f64) -> Self {
        assert!(
            burst > 0 && per_second > 0.0,
            "checked by the configuration"
        );
        Self {
            burst,
            interval: Duration::from_secs_f64(1.0 / per_second),
            full_at: Mutex::new(HashMap::new()),
            refused: AtomicU64::new(0),
            admitted: AtomicU64::new(0),
        }
    }

    /// Takes one turn for `client` at `now`; when its bucket is empty, says how long until
    /// a turn is free again.
    pub fn take(&self, client: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut full_at = self.full_at.lock().expect("rate limiter poisoned");
        let key = self.key(&mut full_at, client, now);
        let current = full_at.get(&key).copied().filter(|t| *t > now);
        let after = current.unwrap_or(now) + self.interval;
        // Full after this request later than `burst` intervals from now: over the limit.
        let capacity = self.interval * self.burst;
        if after > now + capacity {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(after - (now + capacity));
        }
        full_at.insert(key, after);
        self.admitted.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Gives back a turn taken by [`take`](Self::take) for a request that proved to be
    /// authenticated.
    pub fn refund(&self, client: IpAddr) {
        let mut full_at = self.full_at.lock().expect("rate limiter poisoned");
        if let Some(t) = full_at.get_mut(&bucket_of(client)) {
            *t = t.checked_sub(self.interval).unwrap_or(*t);
        }
    }

    /// Requests refused so far (429).
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Turns taken so far (refunded ones included): an upper bound on the token lookups
    /// made for requests that were not the admin's.
    pub fn admitted(&self) -> u64 {
        self.admitted.load(Ordering::Relaxed)
    }

    /// The bucket `client` uses, forgetting refilled buckets when the map is full.
    fn key(&self, full_at: &mut HashMap<IpAddr, Instant>, client: IpAddr, now: Instant) -> IpAddr {
        let key = bucket_of(client);
        if full_at.len() >= MAX_TRACKED && !full_at.contains_key(&key) {
            full_at.retain(|_, t| *t > now);
            if full_at.len() >= MAX_TRACKED {
                return IpAddr::V6(Ipv6Addr::UNSPECIFIED);
            }
        }
        key
    }
}

/// IPv4 addresses as they are; IPv6 addresses by their /64 (IPv4-mapped ones as IPv4).
fn bucket_of(client: IpAddr) -> IpAddr {
    match client {
        IpAddr::V4(_) => client,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_burst_passes_then_one_per_interval() {
        let limiter = AddressLimiter::new(3, 2.0);
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        for _ in 0..3 {
            limiter.take(a, t0).unwrap();
        }
        let wait = limiter.take(a, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        // A refusal costs nothing: the wait does not grow.
        assert_eq!(limiter.take(a, t0).unwrap_err(), wait);
        limiter.take(a, t0 + wait).unwrap();
        assert!(limiter.take(a, t0 + wait).is_err());
        // After a full refill, the whole burst again.
        let later = t0 + Duration::from_secs(10);
        for _ in 0..3 {
            limiter.take(a, later).unwrap();
        }
        assert_eq!(limiter.refused(), 3);
        assert_eq!(limiter.admitted(), 7);
    }

    #[test]
    fn addresses_have_their_own_buckets() {
        let limiter = AddressLimiter::new(1, 1.0);
        let t0 = Instant::now();
        limiter.take(ip("192.0.2.1"), t0).unwrap();
        assert!(limiter.take(ip("192.0.2.1"), t0).is_err());
        limiter.take(ip("192.0.2.2"), t0).unwrap();
    }

    #[test]
    fn ipv6_addresses_share_the_bucket_of_their_64() {
        let limiter = AddressLimiter::new(1, 1.0);
        let t0 = Instant::now();
        limiter.take(ip("2001:db8:1:2::1"), t0).unwrap();
        assert!(limiter.take(ip("2001:db8:1:2:ffff::9"), t0).is_err());
        limiter.take(ip("2001:db8:1:3::1"), t0).unwrap();
        limiter.take(ip("::ffff:192.0.2.7"), t0).unwrap();
        assert!(
            limiter.take(ip("192.0.2.7"), t0).is_err(),
            "IPv4-mapped is IPv4"
        );
    }

    #[test]
    fn a_refund_gives_the_turn_back() {
        let limiter = AddressLimiter::new(2, 1.0);
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        for _ in 0..10 {
            limiter.take(a, t0).unwrap();
            limiter.refund(a);
        }
        limiter.take(a, t0).unwrap();
        limiter.take(a, t0).unwrap();
        assert!(limiter.take(a, t0).is_err());
        // Refunding an address never seen is harmless.
        limiter.refund(ip("192.0.2.99"));
    }
}
