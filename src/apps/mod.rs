//! Apps: container workloads on the workers. The API records what a tenant wants (an
//! image, how many replicas, a command, an environment, a port); the apps loop
//! ([`crate::loops::apps`]) makes the workers hold exactly that, agentless, over SSH.
//!
//! - this file: the words of apps and the validation of what clients send, before
//!   anything is written or run;
//! - [`plan`]: the pure decisions: where new instances go, which go away, what a
//!   worker's observed containers call for, the crash back-off;
//! - [`runtime`]: what Orion says to `orion-runtime`, the wrapper on each worker that
//!   alone talks to the container engine, and what it answers.

pub mod caddy;
pub mod plan;
pub mod runtime;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::InvalidInput;

/// Where an instance is in its life.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
    sqlx::Encode,
    sqlx::Decode,
    strum::Display,
    strum::EnumString,
    strum::IntoStaticStr,
)]
#[serde(rename_all = "lowercase")]
#[sqlx(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum InstanceState {
    /// Placed on a worker, not seen running yet.
    Pending,
    /// Seen running.
    Running,
    /// Seen exited (or failed to start): started again after its back-off.
    Exited,
    /// No longer wanted (scaled down, replaced, app deleted): being removed.
    Stopping,
    /// Over: removed from its worker, or lost with it.
    Gone,
}

crate::model::varchar_type!(InstanceState);

/// The most replicas one app may ask for.
pub const MAX_REPLICAS: u32 = 100;
const MAX_ARGS: usize = 64;
const MAX_ENV: usize = 64;
const MAX_VALUE: usize = 4096;
/// Environment names Orion sets itself on every instance.
pub const RESERVED_ENV_PREFIX: &str = "ORION_";

/// An app's name: a DNS label (it becomes a host name in front of the app), unique per
/// tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct AppName(String);

impl AppName {
    /// 1 to 63 characters: lowercase letters, digits and `-`, a letter first, no `-` last.
    pub fn parse(value: &str) -> Result<Self, InvalidInput> {
        let bad = |m: &str| Err(InvalidInput::new("name", m));
        if value.is_empty() || value.len() > 63 {
            return bad("must be 1 to 63 characters long");
        }
        if !value.starts_with(|c: char| c.is_ascii_lowercase()) {
            return bad("must start with a lowercase letter");
        }
        if value.ends_with('-') {
            return bad("must not end with `-`");
        }
        if !value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return bad("may only hold lowercase letters, digits and `-` (a DNS label)");
        }
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A container image reference: `[host[:port]/]path[:tag][@sha256:<64 hex>]`, as
/// Docker and Podman read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ImageRef(String);

impl ImageRef {
    pub fn parse(value: &str) -> Result<Self, InvalidInput> {
        let bad = |m: String| Err(InvalidInput::new("image", m));
        if value.is_empty() || value.len() > 255 {
            return bad("must be 1 to 255 characters long".into());
        }
        let (rest, digest) = match value.split_once('@') {
            Some((rest, digest)) => (rest, Some(digest)),
            None => (value, None),
        };
        if let Some(d) = digest {
            let hex = d.strip_prefix("sha256:").unwrap_or("");
            if hex.len() != 64
                || !hex
                    .chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
            {
                return bad(format!(
                    "digest `{d}` must be sha256: and 64 lowercase hex digits"
                ));
            }
        }
        // The tag is after the last `:` that follows the last `/` (a `:` before it is a
        // registry's port).
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (path, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(tag) = tag {
            let ok = !tag.is_empty()
                && tag.len() <= 128
                && tag.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
                && tag
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
            if !ok {
                return bad(format!(
                    "tag `{tag}` must be 1 to 128 letters, digits, `_`, `.` or `-`"
                ));
            }
        }
        let mut components: Vec<&str> = path.split('/').collect();
        let first = components[0];
        let is_host = components.len() > 1
            && (first.contains('.') || first.contains(':') || first == "localhost");
        if is_host {
            let (host, port) = match first.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (first, None),
            };
            let host_ok = !host.is_empty()
                && host.split('.').all(|l| {
                    !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                });
            let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
            if !host_ok || !port_ok {
                return bad(format!(
                    "registry `{first}` is not a host name with an optional port"
                ));
            }
            components.remove(0);
        }
        for c in components {
            if !path_component_ok(c) {
                return bad(format!(
                    "`{c}` is not a valid path component: lowercase letters and digits, \
                     separated by `.`, `_`, `__` or `-`"
                ));
            }
        }
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `[a-z0-9]+` runs separated by one `.`, one or two `_`, or `-`s.
fn path_component_ok(c: &str) -> bool {
    if c.is_empty() || c.len() > 128 {
        return false;
    }
    let bytes = c.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.chars().all(|ch| ch == '-')) {
            return false;
        }
    }
    true
}

/// The command an instance runs instead of its image's: at most 64 arguments.
pub fn check_command(command: &[String]) -> Result<(), InvalidInput> {
    let bad = |m: String| Err(InvalidInput::new("command", m));
    if command.is_empty() {
        return bad("must hold at least the program (leave it out to run the image's own)".into());
    }
    if command.len() > MAX_ARGS {
        return bad(format!("must have at most {MAX_ARGS} arguments"));
    }
    for (i, arg) in command.iter().enumerate() {
        if arg.len() > MAX_VALUE {
            return bad(format!("argument {i} is longer than {MAX_VALUE} bytes"));
        }
        if arg.contains('\0') {
            return bad(format!("argument {i} holds a NUL byte"));
        }
    }
    Ok(())
}

/// The environment of an instance: at most 64 variables, names as a shell reads them,
/// none of Orion's own (`ORION_*`).
pub fn check_env(env: &BTreeMap<String, String>) -> Result<(), InvalidInput> {
    let bad = |m: String| Err(InvalidInput::new("env", m));
    if env.len() > MAX_ENV {
        return bad(format!("must have at most {MAX_ENV} variables"));
    }
    for (name, value) in env {
        let name_ok = !name.is_empty()
            && name.len() <= 128
            && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !name_ok {
            return bad(format!(
                "`{}` is not a variable name: letters, digits and `_`, not a digit first, at most 128",
                name.chars().take(40).collect::<String>()
            ));
        }
        if name.to_ascii_uppercase().starts_with(RESERVED_ENV_PREFIX) {
            return bad(format!(
                "`{name}`: names starting with {RESERVED_ENV_PREFIX} are Orion's"
            ));
        }
        if value.len() > MAX_VALUE {
            return bad(format!(
                "the value of `{name}` is longer than {MAX_VALUE} bytes"
            ));
        }
        if value.contains('\0') {
            return bad(format!("the value of `{name}` holds a NUL byte"));
        }
    }
    Ok(())
}

/// The port an instance listens on. Instances run unprivileged, so not below 1024; and
/// not a worker's own SSH port.
pub fn check_port(port: u32) -> Result<u16, InvalidInput> {
    match u16::try_from(port) {
        Ok(p) if p >= 1024 => Ok(p),
        _ => Err(InvalidInput::new(
            "port",
            "must be between 1024 and 65535 (instances run as an unprivileged user)",
        )),
    }
}

/// An app's `health_path`: what Caddy requests on each instance. Caddy parses it as a
/// URL when the route is loaded and refuses the whole configuration when it cannot (#24:
/// `/%` stopped every app's route), so only what every URL parser takes is accepted: an
/// absolute path and query of RFC 3986 characters, each `%` starting an escape of two hex
/// digits, no fragment.
pub fn check_health_path(path: &str) -> Result<(), InvalidInput> {
    let bad = |why: &str| {
        Err(InvalidInput::new(
            "health_path",
            format!("must be an absolute path (and query) of at most 255 URL characters: {why}"),
        ))
    };
    if !path.starts_with('/') {
        return bad("it does not start with `/`");
    }
    if path.len() > 255 {
        return bad("it is longer");
    }
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'%' => {
                let escape = bytes.get(i + 1..i + 3);
                if !escape.is_some_and(|e| e.iter().all(u8::is_ascii_hexdigit)) {
                    return bad("`%` must start an escape such as `%2F`");
                }
                i += 3;
                continue;
            }
            b'#' => return bad("a fragment (`#`) is never sent"),
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' => {}
            b'-' | b'.' | b'_' | b'~' | b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+'
            | b',' | b';' | b'=' | b':' | b'@' | b'/' | b'?' => {}
            _ => return bad(&format!("{:?} is not a URL character", char::from(c))),
        }
        i += 1;
    }
    Ok(())
}

pub fn check_replicas(replicas: u32) -> Result<u32, InvalidInput> {
    if replicas > MAX_REPLICAS {
        return Err(InvalidInput::new(
            "replicas",
            format!("must be between 0 and {MAX_REPLICAS}"),
        ));
    }
    Ok(replicas)
}

/// The name of an instance's container on its worker's engine: unique on that engine,
/// since `node` is unique there and the instance id in Orion.
pub fn container_name(node: &str, app: &str, instance_id: u64) -> String {
    format!("{node}.{app}.{instance_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_names_are_dns_labels() {
        for ok in ["web", "a", "web-2", "x1"] {
            assert!(AppName::parse(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(64);
        for bad in [
            "",
            "Web",
            "2web",
            "web-",
            "we_b",
            "we.b",
            "web;rm",
            "wéb",
            long.as_str(),
        ] {
            assert!(AppName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn image_references_are_read_as_docker_reads_them() {
        for ok in [
            "orion/demo-app",
            "orion/demo-app:latest",
            "debian:bookworm-slim",
            "registry.example:5000/team/app:1.2.3",
            "localhost/app",
            "app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "a__b/c-d.e",
        ] {
            assert!(ImageRef::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Orion/app",
            "app:",
            "app:-x",
            "app;rm -rf /",
            "app$(id)",
            "app with space",
            "-app",
            "app/",
            "app@sha256:1234",
            "app\nx",
            "host:99999/app",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn env_refuses_bad_names_orions_own_and_huge_values() {
        let env = |k: &str, v: &str| BTreeMap::from([(k.to_owned(), v.to_owned())]);
        assert!(check_env(&env("GREETING", "it's \"$(rm -rf /)\"\nnext")).is_ok());
        assert!(check_env(&env("1X", "v")).is_err());
        assert!(check_env(&env("A-B", "v")).is_err());
        assert!(check_env(&env("A=B", "v")).is_err());
        assert!(check_env(&env("ORION_INSTANCE", "v")).is_err());
        assert!(check_env(&env("orion_x", "v")).is_err());
        assert!(check_env(&env("X", &"v".repeat(MAX_VALUE + 1))).is_err());
        assert!(check_env(&env("X", "a\0b")).is_err());
    }

    #[test]
    fn health_paths_are_absolute_and_printable() {
        assert!(check_health_path("/").is_ok());
        assert!(check_health_path("/healthz?full=1").is_ok());
        assert!(check_health_path("/a%2Fb?x=%20&y=~").is_ok());
        for bad in [
            "", "healthz", "/a b", "/a\nb", "/é", "/%", "/%2", "/%zz", "/a#b", "/a\"b", "/<x>",
            "/a\\b", "/{x}",
        ] {
            assert!(check_health_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn commands_ports_and_replicas_are_bounded() {
        assert!(check_command(&["sleep".into(), "1000".into()]).is_ok());
        assert!(check_command(&[]).is_err());
        assert!(check_command(&vec!["x".into(); MAX_ARGS + 1]).is_err());
        assert!(check_port(8080).is_ok());
        assert!(check_port(22).is_err());
        assert!(check_port(80).is_err());
        assert!(check_port(70000).is_err());
        assert!(check_replicas(MAX_REPLICAS).is_ok());
        assert!(check_replicas(MAX_REPLICAS + 1).is_err());
    }
}
