//! The memory of the guard on moves ([`super::guard`](mod@super::guard)): when it last held them, whether
//! each loop is held, which sites are lost. Apart from the guard's pass so that the
//! [`crate::context::Context`] that keeps it does not depend on the code that reads the
//! context.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::policy::SiteHealth;

/// The guard's memory, shared by the migration and apps loops (it is in the
/// [`crate::context::Context`]): when it last held every move, whether each loop is held
/// now, and which sites are lost.
#[derive(Debug, Default)]
pub struct Holds {
    /// When the guard last held every move: for a while after a hold, workers declared
    /// dead are probed again before anything is moved off them (see
    /// [`super::guard::guard`]).
    last: std::sync::Mutex<Option<std::time::Instant>>,
    /// Whether each [`Mover`] is held, so that each says when a hold begins and when it
    /// ends, not at every pass.
    held: [AtomicBool; 2],
    /// The sites found lost (every worker gone while another site answers), so that a
    /// loss and a return are each said once.
    lost: std::sync::Mutex<BTreeSet<String>>,
}

/// What a loop moves off a worker the guard lets go: each is held, and says so, on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mover {
    /// Rentals (the migration loop).
    Rentals,
    /// Apps' instances (the apps loop).
    Instances,
}

impl Holds {
    /// Records whether `mover` is held now, and returns whether it was before.
    pub fn swap_held(&self, mover: Mover, held: bool) -> bool {
        self.held[mover as usize].swap(held, Ordering::Relaxed)
    }

    /// Records the sites `lost` now, and returns those newly lost and those back (lost
    /// before, not now, and still among `sites`).
    pub fn lost_sites(&self, lost: &[String], sites: &[SiteHealth]) -> (Vec<String>, Vec<String>) {
        let mut known = self.lost.lock().expect("not poisoned");
        let new = lost
            .iter()
            .filter(|s| !known.contains(*s))
            .cloned()
            .collect();
        let back = known
            .iter()
            .filter(|s| !lost.contains(s) && sites.iter().any(|h| &h.site == *s))
            .cloned()
            .collect();
        *known = lost.iter().cloned().collect();
        (new, back)
    }

    pub(super) fn held_now(&self) {
        *self.last.lock().expect("not poisoned") = Some(std::time::Instant::now());
    }

    /// Whether a hold ended less than `window` ago.
    pub(super) fn settling(&self, window: Duration) -> bool {
        self.last
            .lock()
            .expect("not poisoned")
            .is_some_and(|at| at.elapsed() < window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(name: &str, dead: i64) -> SiteHealth {
        SiteHealth {
            site: name.into(),
            total: 3,
            dead,
            failing: 0,
        }
    }

    #[test]
    fn a_site_lost_and_back_is_said_once_each() {
        let holds = Holds::default();
        let sites = [site("a", 3), site("b", 0)];
        let lost = vec!["a".to_owned()];
        assert_eq!(holds.lost_sites(&lost, &sites), (lost.clone(), vec![]));
        assert_eq!(holds.lost_sites(&lost, &sites), (vec![], vec![]));
        assert_eq!(holds.lost_sites(&[], &sites), (vec![], lost));
        assert_eq!(holds.lost_sites(&[], &sites), (vec![], vec![]));
    }

    #[test]
    fn a_lost_site_gone_from_the_inventory_is_not_said_back() {
        let holds = Holds::default();
        let lost = vec!["a".to_owned()];
        holds.lost_sites(&lost, &[site("a", 3), site("b", 0)]);
        assert_eq!(holds.lost_sites(&[], &[site("b", 0)]), (vec![], vec![]));
    }

    #[test]
    fn each_mover_is_held_on_its_own() {
        let holds = Holds::default();
        assert!(!holds.swap_held(Mover::Rentals, true));
        assert!(!holds.swap_held(Mover::Instances, false));
        assert!(holds.swap_held(Mover::Rentals, false));
        assert!(!holds.swap_held(Mover::Instances, true));
        assert!(holds.swap_held(Mover::Instances, true));
    }
}
