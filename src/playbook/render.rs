//! Rendering: the playbook templates, compiled once at start, and the shell quoting every
//! value they print gets from the environment's formatter (quoted by construction, not by
//! each template's author remembering).

use std::path::{Path, PathBuf};

use minijinja::{Environment, UndefinedBehavior, Value};
use serde::Serialize;

use super::vars::Rendered;
use super::{AppVars, CertVars, HomeVars, Playbook, PlaybookError, Vars};

impl Playbook {
    fn template(self) -> String {
        format!("{}.sh.j2", self.name())
    }
}

/// Template pieces other playbooks include (`{% include %}`).
const PARTIALS: [&str; 1] = ["_end_processes.sh.j2"];

/// The playbook templates, compiled once at start.
pub struct Playbooks {
    env: Environment<'static>,
    dir: PathBuf,
}

impl std::fmt::Debug for Playbooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Playbooks").field("dir", &self.dir).finish()
    }
}

impl Playbooks {
    /// Loads and compiles every playbook Orion needs from `dir`; a missing or broken one
    /// is an error now rather than at the first rent.
    pub fn load(dir: &Path) -> Result<Self, PlaybookError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_formatter(shell_quoting_formatter);
        let names = Playbook::ALL
            .iter()
            .map(|p| p.template())
            .chain(PARTIALS.iter().map(|p| p.to_string()));
        for name in names {
            let path = dir.join(&name);
            let text = std::fs::read_to_string(&path).map_err(|cause| PlaybookError::Read {
                path: path.clone(),
                cause,
            })?;
            env.add_template_owned(name.clone(), text)
                .map_err(|cause| PlaybookError::Template { name, cause })?;
        }
        Ok(Self {
            env,
            dir: dir.to_owned(),
        })
    }

    /// Renders a playbook into the shell script that will run on the worker. `uid_min`
    /// is the floor below which the script refuses to touch an account.
    pub fn render(
        &self,
        playbook: Playbook,
        vars: &Vars,
        uid_min: u32,
    ) -> Result<String, PlaybookError> {
        self.render_with(playbook, &Rendered { vars, uid_min })
    }

    /// Renders an app playbook ([`Playbook::APPS`]).
    pub fn render_app(&self, playbook: Playbook, vars: &AppVars) -> Result<String, PlaybookError> {
        self.render_with(playbook, vars)
    }

    /// Renders `host_cert`.
    pub fn render_cert(&self, vars: &CertVars) -> Result<String, PlaybookError> {
        self.render_with(Playbook::HostCert, vars)
    }

    /// Renders a home playbook ([`Playbook::STREAMS`]) into the command that runs it
    /// (`sh -c '<script>'`: the channel's stdin and stdout carry the archive). Nothing
    /// secret is in it; `uid_min` is the floor below which it refuses.
    pub fn render_home(
        &self,
        playbook: Playbook,
        vars: &HomeVars,
        uid_min: u32,
    ) -> Result<String, PlaybookError> {
        debug_assert!(Playbook::STREAMS.contains(&playbook));
        if vars.uid < uid_min {
            return Err(PlaybookError::Refused {
                playbook: playbook.name(),
                worker: String::new(),
                reason: format!("uid {} is below Orion's floor {uid_min}", vars.uid),
            });
        }
        let script = self.render_with(playbook, vars)?;
        Ok(format!("sh -c {}", shell_quote(&script)))
    }

    /// Renders a playbook with any values (strict: a value it prints must be there).
    pub(super) fn render_with(
        &self,
        playbook: Playbook,
        values: &impl Serialize,
    ) -> Result<String, PlaybookError> {
        let name = playbook.template();
        let template_error = |cause| PlaybookError::Template {
            name: name.clone(),
            cause,
        };
        self.env
            .get_template(&name)
            .and_then(|t| t.render(values))
            .map_err(template_error)
    }
}

/// Writes every printed value as one shell word in single quotes. `None` prints as `''`.
fn shell_quoting_formatter(
    out: &mut minijinja::Output<'_>,
    _state: &minijinja::State<'_, '_>,
    value: &Value,
) -> Result<(), minijinja::Error> {
    let text = if value.is_none() {
        String::new()
    } else {
        value.to_string()
    };
    out.write_str(&shell_quote(&text))
        .map_err(|e| minijinja::Error::new(minijinja::ErrorKind::WriteFailure, e.to_string()))
}

/// Quotes `s` as a single POSIX shell word: `it's` becomes `'it'\''s'`.
pub fn shell_quote(s: &str) -> String {
    let mut quoted = String::with_capacity(s.len() + 2);
    quoted.push('\'');
    for c in s.chars() {
        if c == '\'' {
            quoted.push_str("'\\''");
        } else {
            quoted.push(c);
        }
    }
    quoted.push('\'');
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> Playbooks {
        Playbooks::load(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/playbooks"))).unwrap()
    }

    fn vars(username: &str) -> Vars {
        Vars {
            username: username.into(),
            uid: Some(200_123),
            public_key: Some(
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPGmoeQtEFLPvpG1nEm0qOGCMmviF+bRgDjkt8J0nQ+b"
                    .into(),
            ),
            password_hash: Some("$6$salt$hash".into()),
        }
    }

    #[test]
    fn quoting_makes_one_word_of_anything() {
        assert_eq!(shell_quote("alice"), "'alice'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$(rm -rf /)"), "'$(rm -rf /)'");
    }

    #[test]
    fn every_printed_value_is_quoted_by_the_environment() {
        let mut env = Environment::new();
        env.set_formatter(shell_quoting_formatter);
        env.add_template("t", "echo {{ v }} {{ n }}").unwrap();
        let out = env
            .get_template("t")
            .unwrap()
            .render(minijinja::context! { v => "a'; rm -rf / #\nb", n => None::<String> })
            .unwrap();
        assert_eq!(out, "echo 'a'\\''; rm -rf / #\nb' ''");
    }

    #[test]
    fn every_shipped_playbook_renders() {
        let playbooks = shipped();
        for playbook in Playbook::ACCOUNTS {
            let script = playbooks.render(playbook, &vars("alice"), 200_000).unwrap();
            assert!(script.contains("'alice'"), "{script}");
            assert!(
                script.starts_with("#!/bin/sh") || script.contains("set -eu"),
                "{script}"
            );
        }
    }

    #[test]
    fn app_playbooks_hand_the_spec_to_the_runtime_as_one_quoted_word() {
        let spec = AppVars::new(&serde_json::json!({"env": {"X": "'; rm -rf / #"}})).spec;
        for playbook in Playbook::APPS {
            let script = shipped()
                .render_app(playbook, &AppVars { spec: spec.clone() })
                .unwrap();
            assert!(script.contains(&format!("spec='{spec}'")), "{script}");
            assert!(!script.contains("rm -rf"), "{script}");
            assert!(
                script.contains("| /usr/local/sbin/orion-runtime "),
                "{script}"
            );
        }
    }

    #[test]
    fn the_home_playbooks_render_into_one_command_with_their_values_quoted() {
        let playbooks = shipped();
        let mut vars = HomeVars {
            username: "erin".into(),
            uid: 200_321,
            fingerprint: "abc'; rm -rf / #".into(),
            r#final: false,
            max_bytes: 1 << 20,
            deadline: 65,
        };
        let snapshot = playbooks
            .render_home(Playbook::SnapshotHome, &vars, 200_000)
            .unwrap();
        assert!(snapshot.starts_with("sh -c '"), "{snapshot}");
        assert!(snapshot.contains("user='\\''erin'\\''"), "{snapshot}");
        assert!(snapshot.contains("final='\\''no'\\''"), "{snapshot}");
        assert!(
            snapshot.contains("max_bytes='\\''1048576'\\''"),
            "{snapshot}"
        );
        assert!(snapshot.contains("deadline='\\''65'\\''"), "{snapshot}");
        vars.r#final = true;
        let last = playbooks
            .render_home(Playbook::SnapshotHome, &vars, 200_000)
            .unwrap();
        assert!(last.contains("final='\\''yes'\\''"), "{last}");
        assert!(last.contains("kill -KILL -1"), "{last}");
        let restore = playbooks
            .render_home(Playbook::RestoreHome, &vars, 200_000)
            .unwrap();
        assert!(restore.contains("--no-same-owner"), "{restore}");
        vars.uid = 5;
        assert!(
            playbooks
                .render_home(Playbook::RestoreHome, &vars, 200_000)
                .is_err()
        );
    }

    #[test]
    fn the_host_certificate_playbook_gets_the_certificate_and_the_key_quoted() {
        let vars = CertVars {
            certificate: "ssh-ed25519-cert-v01@openssh.com AAAA w1".into(),
            host_key: "ssh-ed25519 BBBB".into(),
        };
        let script = shipped().render_cert(&vars).unwrap();
        assert!(script.contains("certificate='ssh-ed25519-cert-v01@openssh.com AAAA w1'"));
        assert!(script.contains("host_key='ssh-ed25519 BBBB'"));
    }

    #[test]
    fn create_user_with_key_only_sets_no_password() {
        let mut v = vars("bob");
        v.password_hash = None;
        let script = shipped().render(Playbook::CreateUser, &v, 200_000).unwrap();
        assert!(!script.contains("chpasswd"), "{script}");
        assert!(script.contains(r#"mv -f "$tmp" "$keys/$user""#), "{script}");
    }

    #[test]
    fn the_password_hash_is_only_fed_to_chpasswd_quoted() {
        let script = shipped()
            .render(Playbook::CreateUser, &vars("carol"), 200_000)
            .unwrap();
        assert!(script.contains("'$6$salt$hash'"), "{script}");
    }

    #[test]
    fn a_missing_variable_is_an_error_not_an_empty_string() {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_formatter(shell_quoting_formatter);
        env.add_template("t", "userdel {{ usernme }}").unwrap();
        assert!(env.get_template("t").unwrap().render(vars("x")).is_err());
    }

    #[test]
    fn a_missing_playbook_directory_names_the_file() {
        let err = Playbooks::load(Path::new("/nonexistent"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/create_user.sh.j2"), "{err}");
    }

    #[test]
    fn the_uid_and_its_floor_reach_every_playbook_quoted() {
        let playbooks = shipped();
        for playbook in Playbook::ACCOUNTS {
            let script = playbooks.render(playbook, &vars("dave"), 200_000).unwrap();
            assert!(script.contains("uid='200123'"), "{script}");
            assert!(script.contains("uid_min='200000'"), "{script}");
        }
    }
}
