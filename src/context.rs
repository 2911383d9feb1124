//! The shared handles every part of Orion works with, built once at start.

use std::sync::Arc;

use crate::config::Config;
use crate::playbook::Executor;
use crate::ssh::SshClient;
use crate::store::Store;
use crate::telemetry::LoopRegistry;

/// Handles shared by the API handlers and the control loops. Cheap to clone.
#[derive(Clone)]
pub struct Context {
    /// The database: the only shared state between tasks and between Orion processes.
    pub store: Store,
    /// Orion's SSH client (probes, and the native playbook executor underneath).
    pub ssh: SshClient,
    /// Runs playbooks on workers.
    pub executor: Executor,
    /// The configuration Orion was started with.
    pub config: Arc<Config>,
    /// Last success and last error of each control loop, for the status endpoint.
    pub loops: Arc<LoopRegistry>,
}
