//! The rules a rent follows, decided from the request, the caller and the
//! configuration alone: the ttl a rental gets, the tenant's quota, where it may be
//! placed, and which rental an `Idempotency-Key` stands for. Pure functions, so that each rule is written once and
//! tested here without HTTP or a database; the API and the rent call them.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::auth::Caller;
use crate::config::TenantsConfig;
use crate::inventory::{Labels, check_labels, check_site};
use crate::model::{InvalidInput, RentalStatus, TtlInput};
use crate::store::Constraints;

/// How long a new rental lives unless renewed (`None`: until released). A `ttl` the
/// request asks for is bounded by `tenants.max_ttl` (longer is refused); without one, a
/// tenant's rental gets `tenants.default_ttl`, so that rentals a tenant forgets end by
/// themselves, and the admin's lives until released (the operator's rentals are never
/// forgotten by someone else).
pub fn rent_ttl(
    asked: Option<&TtlInput>,
    caller: &Caller,
    tenants: &TenantsConfig,
) -> Result<Option<Duration>, InvalidInput> {
    let default = match caller {
        Caller::Tenant(_) => tenants.default_ttl,
        Caller::Admin => None,
    };
    asked_or(asked, default, tenants)
}

/// A renewal's new `ttl`: the one asked for, bounded as a rent's is, or the configured
/// default. With neither it is refused: a renewal must extend the rental by something,
/// and "until released" is not a renewal a tenant may give itself.
pub fn renew_ttl(
    asked: Option<&TtlInput>,
    tenants: &TenantsConfig,
) -> Result<Duration, InvalidInput> {
    asked_or(asked, tenants.default_ttl, tenants)?
        .ok_or_else(|| InvalidInput::new("ttl", "is required (no default ttl is configured)"))
}

/// The `ttl` asked for, within `tenants.max_ttl`, or else `default`.
fn asked_or(
    asked: Option<&TtlInput>,
    default: Option<Duration>,
    tenants: &TenantsConfig,
) -> Result<Option<Duration>, InvalidInput> {
    match asked {
        Some(ttl) => ttl.parse(tenants.max_ttl).map(Some),
        None => Ok(default),
    }
}

/// Most live rentals `caller`'s tenant may hold once this rent is made (`None`: no
/// bound): the token's own limit if it carries one, else `tenants.max_rentals`; the
/// admin is not bounded. The store enforces it in the same transaction as the claim.
pub fn quota(caller: &Caller, tenants: &TenantsConfig) -> Option<u32> {
    match caller {
        Caller::Admin => None,
        Caller::Tenant(t) => Some(t.max_rentals.unwrap_or(tenants.max_rentals)),
    }
}

/// Whether a rental made under an `Idempotency-Key` stands for its key, so that a retry
/// answers it (a replay) instead of renting again: every rental that got past
/// provisioning does, even one released since (its client was told of it, or would have
/// been). One still provisioning may yet fail, and a failed one made nothing: a retry
/// must not answer either as made.
pub fn stands_for_its_key(status: RentalStatus) -> bool {
    !matches!(status, RentalStatus::Provisioning | RentalStatus::Failed)
}

/// Where a rent may be placed: the `site` it must be on, the `prefer_site` it would
/// rather be on, the `labels` its worker must carry, checked against the sites and the
/// labels of the workers in service (`sites`, `labelled`). An unknown site or a label no
/// worker carries is the request's mistake, refused at once, never a wait for a worker
/// that will not come.
pub fn placement(
    site: Option<&str>,
    prefer_site: Option<&str>,
    labels: Option<&Labels>,
    sites: &BTreeSet<String>,
    labelled: &[Labels],
) -> Result<Constraints, InvalidInput> {
    let known_site = |field: &'static str, site: &str| -> Result<String, InvalidInput> {
        check_site(site).map_err(|m| InvalidInput::new(field, m))?;
        if !sites.contains(site) {
            let known: Vec<&str> = sites.iter().map(String::as_str).collect();
            return Err(InvalidInput::new(
                field,
                format!("unknown site `{site}`; the sites are: {}", known.join(", ")),
            ));
        }
        Ok(site.to_owned())
    };
    let site = site.map(|s| known_site("site", s)).transpose()?;
    let prefer_site = prefer_site
        .map(|s| known_site("prefer_site", s))
        .transpose()?;
    let labels = labels.cloned().unwrap_or_default();
    check_labels(&labels).map_err(|m| InvalidInput::new("labels", m))?;
    for (key, value) in &labels {
        if !labelled.iter().any(|l| l.get(key) == Some(value)) {
            return Err(InvalidInput::new(
                "labels",
                format!("unknown label {key}={value}: no worker in service carries it"),
            ));
        }
    }
    Ok(Constraints {
        site,
        labels,
        prefer_site,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::TenantToken;

    fn tenant(max_rentals: Option<u32>) -> Caller {
        Caller::Tenant(TenantToken {
            tenant: "ann".into(),
            token_id: "t1".into(),
            max_rentals,
        })
    }

    fn tenants(default_ttl: Option<Duration>) -> TenantsConfig {
        TenantsConfig {
            max_rentals: 10,
            max_ttl: Duration::from_secs(24 * 3600),
            default_ttl,
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn a_rent_without_a_ttl_gets_the_default_for_a_tenant_and_none_for_the_admin() {
        let config = tenants(Some(HOUR));
        assert_eq!(rent_ttl(None, &tenant(None), &config).unwrap(), Some(HOUR));
        assert_eq!(rent_ttl(None, &Caller::Admin, &config).unwrap(), None);
        // No default configured: a tenant's rental lives until released too.
        assert_eq!(rent_ttl(None, &tenant(None), &tenants(None)).unwrap(), None);
    }

    #[test]
    fn a_ttl_asked_for_is_kept_within_its_bounds_whoever_asks() {
        let config = tenants(Some(HOUR));
        let two_hours = TtlInput::Text("2h".into());
        for caller in [tenant(None), Caller::Admin] {
            assert_eq!(
                rent_ttl(Some(&two_hours), &caller, &config).unwrap(),
                Some(2 * HOUR)
            );
            let too_long = TtlInput::Text("2d".into());
            assert_eq!(
                rent_ttl(Some(&too_long), &caller, &config)
                    .unwrap_err()
                    .field,
                "ttl"
            );
            let too_short = TtlInput::Seconds(59);
            assert!(rent_ttl(Some(&too_short), &caller, &config).is_err());
        }
    }

    #[test]
    fn a_renewal_takes_the_ttl_asked_for_or_the_default_and_needs_one_of_them() {
        let asked = TtlInput::Seconds(7200);
        assert_eq!(renew_ttl(Some(&asked), &tenants(None)).unwrap(), 2 * HOUR);
        assert_eq!(renew_ttl(None, &tenants(Some(HOUR))).unwrap(), HOUR);
        let refused = renew_ttl(None, &tenants(None)).unwrap_err();
        assert_eq!(refused.field, "ttl");
        assert!(refused.message.contains("required"), "{}", refused.message);
        assert!(renew_ttl(Some(&TtlInput::Text("2d".into())), &tenants(Some(HOUR))).is_err());
    }

    #[test]
    fn a_tenants_quota_is_its_tokens_own_else_the_configured_one_and_the_admin_has_none() {
        let config = tenants(None);
        assert_eq!(quota(&tenant(None), &config), Some(10));
        assert_eq!(quota(&tenant(Some(3)), &config), Some(3));
        assert_eq!(quota(&Caller::Admin, &config), None);
    }

    #[test]
    fn a_keyed_rental_is_replayed_once_past_provisioning_unless_it_failed() {
        use RentalStatus::*;
        for status in [Active, Migrating, Waiting, Releasing, Released] {
            assert!(stands_for_its_key(status), "{status:?} is replayed");
        }
        for status in [Provisioning, Failed] {
            assert!(!stands_for_its_key(status), "{status:?} runs again");
        }
    }

    #[test]
    fn a_placement_names_only_sites_and_labels_of_workers_in_service() {
        let sites: BTreeSet<String> = ["north".into(), "south".into()].into();
        let gpu: Labels = [("gpu".into(), "yes".into())].into();
        let labelled = vec![gpu.clone(), Labels::new()];
        let placed = placement(Some("north"), Some("south"), Some(&gpu), &sites, &labelled)
            .expect("known site and label");
        assert_eq!(placed.site.as_deref(), Some("north"));
        assert_eq!(placed.prefer_site.as_deref(), Some("south"));
        assert_eq!(placed.labels, gpu);
        let unknown = placement(Some("west"), None, None, &sites, &labelled).unwrap_err();
        assert_eq!(unknown.field, "site");
        assert!(
            unknown.message.contains("north, south"),
            "{}",
            unknown.message
        );
        let preferred = placement(None, Some("west"), None, &sites, &labelled).unwrap_err();
        assert_eq!(preferred.field, "prefer_site");
        let arm: Labels = [("arch".into(), "arm".into())].into();
        let label = placement(None, None, Some(&arm), &sites, &labelled).unwrap_err();
        assert_eq!(label.field, "labels");
        assert_eq!(
            placement(None, None, None, &sites, &labelled).unwrap(),
            Constraints::default()
        );
    }
}
