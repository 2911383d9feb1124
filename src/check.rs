//! `orion check`: validates the configuration, the inventory, the playbooks (rendered with
//! sample values) and Orion's SSH key, then probes every worker over SSH and prints a
//! table. Fails if anything does; writes nothing anywhere.

use std::sync::Arc;

use crate::client::table;
use crate::config::Config;
use crate::inventory::Inventory;
use crate::playbook::{AppVars, CertVars, HomeVars, Playbook, Playbooks, Vars};
use crate::ssh::{self, SshClient, Target};

/// Runs every check; the error says how many workers failed their probe.
pub async fn run(config: &Config) -> anyhow::Result<()> {
    let inventory = Inventory::load(&config.inventory)?;
    let playbooks = Playbooks::load(&config.playbooks)?;
    let sample = Vars {
        username: "sample".into(),
        uid: Some(config.provisioning.uid_min),
        public_key: Some(ssh::host_key_line(ssh::generate_ed25519().public_key())),
        password_hash: Some(crate::model::hash_password("sample")),
    };
    for playbook in Playbook::ACCOUNTS {
        playbooks.render(playbook, &sample, config.provisioning.uid_min)?;
    }
    let sample_app = AppVars::new(&crate::apps::runtime::RemoveSpec {
        node: "sample".into(),
        names: vec!["sample.app.1".into()],
    });
    for playbook in Playbook::APPS {
        playbooks.render_app(playbook, &sample_app)?;
    }
    let sample_key = ssh::host_key_line(ssh::generate_ed25519().public_key());
    playbooks.render_cert(&CertVars {
        certificate: sample_key.clone(),
        host_key: sample_key,
    })?;
    let sample_home = HomeVars {
        username: "sample".into(),
        uid: config.provisioning.uid_min,
        fingerprint: String::new(),
        r#final: true,
        max_bytes: 1 << 20,
        deadline: 1,
    };
    for playbook in Playbook::STREAMS {
        playbooks.render_home(playbook, &sample_home, config.provisioning.uid_min)?;
    }
    let key = Arc::new(ssh::load_private_key(&config.ssh.key)?);
    println!(
        "configuration, inventory ({} workers), playbooks and SSH key are valid",
        inventory.workers.len()
    );
    let ssh = SshClient::with_key(
        key,
        &config.ssh.user,
        config.ssh.connect_timeout,
        config.ssh.command_timeout,
        config.ssh.max_sessions,
    );
    let prober =
        crate::probe::Prober::new(ssh, crate::probe::policy::DepthEvery::of(&config.health));
    let progress = crate::progress::bar(inventory.workers.len() as u64, "probing workers");
    let probes = inventory.workers.iter().map(|w| {
        let prober = prober.clone();
        let progress = progress.clone();
        let target = Target {
            name: w.name.clone(),
            host: w.ssh_host.clone(),
            port: w.ssh_port,
            host_key: w.host_key.as_deref().and_then(ssh::parse_host_key),
        };
        let timeout = config.health.probe_timeout;
        async move {
            let result = prober.probe(&target, timeout).await;
            progress.inc(1);
            (target, result)
        }
    });
    let results = futures::future::join_all(probes).await;
    progress.finish_and_clear();
    let mut failed = 0;
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|(target, result)| {
            let address = format!("{}:{}", target.host, target.port);
            match result {
                Ok(probe) => vec![
                    target.name.clone(),
                    address,
                    "ok".into(),
                    probe.latency.as_millis().to_string(),
                    format!(
                        "{}{}",
                        probe.host_key.fingerprint(russh::keys::HashAlg::Sha256),
                        if target.host_key.is_some() {
                            " (pinned)"
                        } else {
                            ""
                        }
                    ),
                ],
                Err(e) => {
                    failed += 1;
                    vec![
                        target.name.clone(),
                        address,
                        "FAILED".into(),
                        "-".into(),
                        e.to_string(),
                    ]
                }
            }
        })
        .collect();
    println!(
        "{}",
        table(
            &[
                "worker",
                "address",
                "probe",
                "latency_ms",
                "host key / error"
            ],
            &rows
        )
    );
    anyhow::ensure!(
        failed == 0,
        "{failed} of {} workers failed their probe",
        results.len()
    );
    Ok(())
}
