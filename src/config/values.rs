//! The configuration's values that are written as text but mean something typed: a size
//! (`256m`), a range of ports (`2200-2299`), the address of Caddy's admin API
//! (`unix:/path` or `http://host:port`), a share of CPUs. Each is read once, when the file
//! or an `ORION_*` variable is read, so that a bad one stops Orion at start with the key
//! it came from (figment adds it to the message), and nothing downstream parses it again.

use std::fmt;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::str::FromStr;

use serde::de::{Deserialize, Deserializer, Error as _};

/// A number of bytes, written `256m`, `10k`, `1g` or as a plain number (`b`, `kb`,
/// `kib`… and capitals are accepted too). Units are binary: `1k` is 1024 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(u64);

impl ByteSize {
    pub const fn mib(n: u64) -> Self {
        Self(n << 20)
    }

    pub const fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let s = text.trim().to_ascii_lowercase();
        let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
            Some(i) => (&s[..i], &s[i..]),
            None => (s.as_str(), ""),
        };
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("`{s}` is not a size such as 256m"))?;
        let factor: u64 = match unit {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            _ => return Err(format!("`{s}`: unknown unit `{unit}`")),
        };
        Ok(Self(n.saturating_mul(factor)))
    }
}

/// The way it is written in the file: the largest unit that divides it (`256m`).
impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        match [(30, 'g'), (20, 'm'), (10, 'k')]
            .into_iter()
            .find(|&(shift, _)| n != 0 && n.trailing_zeros() >= shift)
        {
            Some((shift, unit)) => write!(f, "{}{unit}", n >> shift),
            None => write!(f, "{n}"),
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(D::Error::custom)
    }
}

/// `first-last`, e.g. `2200-2299`: at least one port, none of them 0, at most 4096 (the
/// gateway binds one listener each).
fn parse_port_range(text: &str) -> Result<RangeInclusive<u16>, String> {
    let bad = || format!("`{text}` is not a range such as 2200-2299");
    let (first, last) = text.trim().split_once('-').ok_or_else(bad)?;
    let first: u16 = first.trim().parse().map_err(|_| bad())?;
    let last: u16 = last.trim().parse().map_err(|_| bad())?;
    if first == 0 || last < first {
        return Err(bad());
    }
    if last - first >= 4096 {
        return Err(format!("`{text}`: at most 4096 ports (one listener each)"));
    }
    Ok(first..=last)
}

/// An optional port range, for `#[serde(deserialize_with)]`.
pub fn port_range<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<RangeInclusive<u16>>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|text| parse_port_range(&text))
        .transpose()
        .map_err(D::Error::custom)
}

/// Where Caddy's admin API is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaddyAdmin {
    /// A unix socket (the platform's).
    Unix(PathBuf),
    /// `host:port` over plain HTTP (a Caddy on loopback).
    Tcp(String),
}

impl CaddyAdmin {
    /// `unix:/path/to/admin.sock` or `http://host:port`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!("`{text}`: the socket path must be absolute"));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = text.strip_prefix("http://") {
            let addr = addr.trim_end_matches('/');
            if addr.is_empty() || addr.contains('/') {
                return Err(format!("`{text}`: expected http://host:port"));
            }
            return Ok(Self::Tcp(addr.to_owned()));
        }
        Err(format!(
            "`{text}`: expected unix:/path/to/admin.sock or http://host:port"
        ))
    }
}

impl<'de> Deserialize<'de> for CaddyAdmin {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::parse(&String::deserialize(d)?).map_err(D::Error::custom)
    }
}

/// A share of CPUs, written as a number of CPUs (`0.5`), between 0.01 and 1024; kept in
/// thousandths, as the runtime takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cpus(u32);

impl Cpus {
    pub const fn whole(n: u32) -> Self {
        Self(n * 1000)
    }

    /// Thousandths of a CPU.
    pub const fn milli(self) -> u32 {
        self.0
    }
}

impl TryFrom<f64> for Cpus {
    type Error = String;

    fn try_from(c: f64) -> Result<Self, String> {
        if !(0.01..=1024.0).contains(&c) {
            return Err(format!("{c} must be between 0.01 and 1024"));
        }
        Ok(Self((c * 1000.0).round() as u32))
    }
}

impl<'de> Deserialize<'de> for Cpus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::try_from(f64::deserialize(d)?).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_read_in_the_spellings_of_the_file_and_written_back_alike() {
        for (text, bytes, shown) in [
            ("256m", 256 << 20, "256m"),
            ("10k", 10 << 10, "10k"),
            ("1g", 1 << 30, "1g"),
            (" 10MiB ", 10 << 20, "10m"),
            ("1048576", 1 << 20, "1m"),
            ("1000", 1000, "1000"),
            ("0", 0, "0"),
        ] {
            let size: ByteSize = text.parse().unwrap();
            assert_eq!(size.bytes(), bytes, "{text}");
            assert_eq!(size.to_string(), shown, "{text}");
        }
        for bad in ["", "m", "1t", "-1m", "1.5g"] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad}");
        }
    }

    #[test]
    fn cpus_are_thousandths_within_bounds() {
        assert_eq!(Cpus::try_from(0.5).unwrap().milli(), 500);
        assert_eq!(Cpus::try_from(1.0).unwrap(), Cpus::whole(1));
        for bad in [0.0, 0.001, 2000.0, f64::NAN] {
            assert!(Cpus::try_from(bad).is_err(), "{bad}");
        }
    }
}
