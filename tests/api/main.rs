//! Integration tests against real MariaDB and real sshd worker containers.
//! Run them with `scripts/test.sh`, which starts what they need.

mod crash;
mod failover;
mod helpers;
mod playbooks;
mod probe;
mod rent;
mod startup;
