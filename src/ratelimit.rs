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
//! address, the time at which its bucket will be full again. Time is passed in (the API
//! reads it from [`crate::clock::Clock`]), so the arithmetic is tested without sleeping
//! and the API's tests can hold it still.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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
        let capacity = self.interval * self.burst;
        match gcra(full_at.get(&key).copied(), now, self.interval, capacity) {
            Ok(after) => {
                full_at.insert(key, after);
                self.admitted.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(wait) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                Err(wait)
            }
        }
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

/// One step of a GCRA bucket: the bucket is full again at `full_at` (absent or past: full
/// now), a request costs `cost` of refill time, and the bucket holds `capacity` of it.
/// The new `full_at` when the request fits; else how long until it would.
fn gcra(
    full_at: Option<Instant>,
    now: Instant,
    cost: Duration,
    capacity: Duration,
) -> Result<Instant, Duration> {
    let after = full_at.filter(|t| *t > now).unwrap_or(now) + cost;
    if after > now + capacity {
        return Err(after - (now + capacity));
    }
    Ok(after)
}

/// Bounds on what tenants ask Orion to read from workers (an instance's log): how many of
/// one tenant's reads run at once, how many of everyone's, how often a tenant may start
/// one, and how many bytes it may read per minute. Time is passed in, as above.
#[derive(Debug)]
pub struct TenantReads {
    limits: crate::config::LogReadsConfig,
    tenants: Mutex<HashMap<String, ReadBudget>>,
    running: Arc<std::sync::atomic::AtomicU32>,
}

/// One tenant's reads: how many run, and when its two buckets are full again.
#[derive(Debug, Default)]
struct ReadBudget {
    running: u32,
    turns_full_at: Option<Instant>,
    bytes_full_at: Option<Instant>,
}

/// Why a read may not start now, and when to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadRefused {
    pub retry_after: Duration,
}

/// A read that may run: counted until dropped; what it read is charged to its tenant.
#[derive(Debug)]
pub struct ReadTurn<'a> {
    reads: &'a TenantReads,
    tenant: String,
}

/// Tenants whose buckets are all full again are forgotten past this many tracked.
const MAX_TENANTS_TRACKED: usize = 10_000;

impl TenantReads {
    pub fn new(limits: crate::config::LogReadsConfig) -> Self {
        Self {
            limits,
            tenants: Mutex::new(HashMap::new()),
            running: Arc::default(),
        }
    }

    fn turn_cost(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.limits.per_second)
    }

    /// Refill time of one byte.
    fn byte_cost(&self) -> Duration {
        Duration::from_secs(60) / u32::try_from(self.limits.bytes_per_minute).unwrap_or(u32::MAX)
    }

    /// A turn for one of `tenant`'s reads at `now`, or how long to wait. A read of a
    /// tenant whose byte budget is spent waits until it has refilled a full answer's worth.
    pub fn start(&self, tenant: &str, now: Instant) -> Result<ReadTurn<'_>, ReadRefused> {
        let busy = |secs| {
            Err(ReadRefused {
                retry_after: Duration::from_secs(secs),
            })
        };
        let mut tenants = self.tenants.lock().expect("read budgets poisoned");
        if tenants.len() >= MAX_TENANTS_TRACKED && !tenants.contains_key(tenant) {
            tenants.retain(|_, b| {
                b.running > 0
                    || b.turns_full_at.is_some_and(|t| t > now)
                    || b.bytes_full_at.is_some_and(|t| t > now)
            });
        }
        let budget = tenants.entry(tenant.to_owned()).or_default();
        if budget.running >= self.limits.per_tenant {
            return busy(1);
        }
        if self.running.load(Ordering::Relaxed) >= self.limits.total {
            return busy(1);
        }
        // Bytes: a spent budget must have refilled one whole answer before the next read.
        let answer =
            self.byte_cost() * u32::try_from(crate::apps::runtime::LOGS_CAP).unwrap_or(u32::MAX);
        let bytes_capacity =
            self.byte_cost() * u32::try_from(self.limits.bytes_per_minute).unwrap_or(u32::MAX);
        if let Err(wait) = gcra(budget.bytes_full_at, now, answer, bytes_capacity) {
            return Err(ReadRefused {
                retry_after: wait.max(Duration::from_secs(1)),
            });
        }
        let capacity = self.turn_cost() * self.limits.burst;
        let after =
            gcra(budget.turns_full_at, now, self.turn_cost(), capacity).map_err(|wait| {
                ReadRefused {
                    retry_after: wait.max(Duration::from_secs(1)),
                }
            })?;
        budget.turns_full_at = Some(after);
        budget.running += 1;
        self.running.fetch_add(1, Ordering::Relaxed);
        Ok(ReadTurn {
            reads: self,
            tenant: tenant.to_owned(),
        })
    }
}

impl ReadTurn<'_> {
    /// Charges what the read returned to its tenant's byte budget.
    pub fn charge(&self, bytes: usize, now: Instant) {
        let cost = self.reads.byte_cost() * u32::try_from(bytes).unwrap_or(u32::MAX);
        let mut tenants = self.reads.tenants.lock().expect("read budgets poisoned");
        if let Some(b) = tenants.get_mut(&self.tenant) {
            b.bytes_full_at = Some(b.bytes_full_at.filter(|t| *t > now).unwrap_or(now) + cost);
        }
    }
}

impl Drop for ReadTurn<'_> {
    fn drop(&mut self) {
        self.reads.running.fetch_sub(1, Ordering::Relaxed);
        let mut tenants = self.reads.tenants.lock().expect("read budgets poisoned");
        if let Some(b) = tenants.get_mut(&self.tenant) {
            b.running = b.running.saturating_sub(1);
        }
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

    fn read_limits() -> crate::config::LogReadsConfig {
        crate::config::LogReadsConfig {
            per_tenant: 2,
            total: 3,
            burst: 4,
            per_second: 1.0,
            bytes_per_minute: 128 * 1024,
        }
    }

    #[test]
    fn a_tenant_runs_at_most_its_share_of_reads_and_everyone_at_most_the_total() {
        let reads = TenantReads::new(read_limits());
        let t0 = Instant::now();
        let a1 = reads.start("a", t0).unwrap();
        let _a2 = reads.start("a", t0).unwrap();
        let refused = reads.start("a", t0).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(1));
        let _b1 = reads.start("b", t0).unwrap();
        assert!(reads.start("c", t0).is_err(), "over the total");
        drop(a1);
        assert!(
            reads.start("c", t0).is_ok(),
            "a finished read frees its place"
        );
    }

    #[test]
    fn a_tenant_starts_a_burst_of_reads_then_one_per_interval() {
        let reads = TenantReads::new(read_limits());
        let t0 = Instant::now();
        for _ in 0..4 {
            drop(reads.start("a", t0).unwrap());
        }
        let refused = reads.start("a", t0).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(1));
        assert!(
            reads.start("b", t0).is_ok(),
            "another tenant has its own budget"
        );
        assert!(reads.start("a", t0 + Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn a_tenant_that_read_its_bytes_waits_until_a_whole_answer_refilled() {
        let reads = TenantReads::new(read_limits());
        let t0 = Instant::now();
        let turn = reads.start("a", t0).unwrap();
        // 128 KiB per minute: reading it all leaves nothing for the next 64 KiB answer.
        turn.charge(128 * 1024, t0);
        drop(turn);
        let refused = reads.start("a", t0).unwrap_err();
        // 64 KiB of 128 KiB a minute: 30 s, to the rounding of a byte's refill time.
        let wait = refused.retry_after.as_secs_f64();
        assert!((wait - 30.0).abs() < 0.001, "{wait}");
        assert!(reads.start("a", t0 + Duration::from_secs(30)).is_ok());
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
