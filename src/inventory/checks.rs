//! The rules of what an inventory may hold (names and sites, labels, hosts, host keys),
//! shared by the file and the admin API's edits so that both accept the same workers.

use russh::keys::PublicKey;

use super::Labels;

/// Labels: keys as names, values short and printable.
pub fn check_labels(labels: &Labels) -> Result<(), String> {
    if labels.len() > 32 {
        return Err("at most 32 labels".into());
    }
    for (key, value) in labels {
        check_label(key, "label")?;
        let ok = !value.is_empty()
            && value.len() <= 128
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '/'));
        if !ok {
            return Err(format!(
                "label `{key}`: value `{value}` must be 1 to 128 characters of letters, digits, `_`, `-`, `.`, `:` or `/`"
            ));
        }
    }
    Ok(())
}

/// A site or label name asked for by a client: the rules of the inventory's.
pub fn check_site(site: &str) -> Result<(), String> {
    check_label(site, "site")
}

/// Names and sites: short, printable, safe in logs, URLs and container names.
pub(super) fn check_label(v: &str, what: &str) -> Result<(), String> {
    let ok_chars = v
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if v.is_empty()
        || v.len() > 64
        || !ok_chars
        || !v.starts_with(|c: char| c.is_ascii_alphanumeric())
    {
        return Err(format!(
            "{what} `{v}` must be 1 to 64 characters of letters, digits, `_`, `-` or `.`, starting with a letter or digit"
        ));
    }
    Ok(())
}

pub(super) fn check_host(host: &str) -> Result<(), String> {
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'));
    if ok {
        Ok(())
    } else {
        Err(format!("`{host}` is not a host name or IP address"))
    }
}

/// Parses an OpenSSH public key line (`ssh-ed25519 AAAA… [comment]`) and returns it in
/// canonical form, without the comment.
pub(super) fn check_host_key(line: &str) -> Result<String, String> {
    let key = PublicKey::from_openssh(line.trim())
        .map_err(|e| format!("not an OpenSSH public key ({e})"))?;
    Ok(crate::ssh::host_key_line(&key))
}
