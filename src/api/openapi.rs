//! The OpenAPI 3 document ([`ApiDoc`]), served at `GET /api/openapi.json`: the reference
//! of every route, its parameters, bodies and answers. It is built from the handlers'
//! own annotations, and tests hold it to the router (every route described, nothing
//! described that is not a route), so it cannot drift from what Orion answers.

use axum::Json;
use axum::http::Method;
use utoipa::OpenApi;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};

use super::handler::{Endpoint, endpoint};
use super::views::{self, ErrorBody};
use super::{apps, dashboard, events, inventory, prometheus, rentals, status, tokens, workers};

pub(super) fn endpoints() -> Vec<Endpoint> {
    vec![endpoint(Method::GET, "/api/openapi.json", openapi_json)]
}

/// The OpenAPI 3 document of the routes of [`super::app`], served at `GET /api/openapi.json`.
#[derive(OpenApi)]
#[openapi(
    info(title = "Orion", description = "Rent worker machines over SSH; rentals move off dead workers."),
    paths(
        rentals::rent, rentals::list_rentals, rentals::get_rental, rentals::release_rental,
        rentals::renew_rental,
        apps::create, apps::list, apps::get, apps::change, apps::delete, apps::logs,
        workers::list_workers, workers::drain_worker, workers::undrain_worker,
        workers::restore_worker,
        inventory::add, inventory::change, inventory::retire, inventory::export, inventory::apply,
        events::list_events, events::stream_events,
        tokens::list_tokens, tokens::create_token, tokens::revoke_token,
        rentals::known_hosts, status::status, status::health, openapi_json,
        prometheus::prometheus_metrics,
        dashboard::page, dashboard::script, dashboard::style,
    ),
    components(schemas(ErrorBody, views::ErrorDetail)),
    modifiers(&Security, &GuardAnswers),
    security(("bearer" = [])),
)]
pub struct ApiDoc;

/// The ways to present a token: Bearer, or (to read) Basic with the token as password.
struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        components.add_security_scheme(
            "basic",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Basic)),
        );
    }
}

/// The answers [`super::guard`] may give before any handler runs, added to every operation they
/// can come from, unless it lists that status itself (then its description says all):
/// 429 everywhere (requests without a valid token are rate limited), 401 where a token is
/// needed, 415 where a request changes state.
struct GuardAnswers;

impl utoipa::Modify for GuardAnswers {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let error = |description: &str| {
            let body = ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build();
            ResponseBuilder::new()
                .description(description)
                .content("application/json", body)
                .build()
        };
        // What `security(())` leaves on an open operation.
        let open = [utoipa::openapi::security::SecurityRequirement::default()];
        for item in doc.paths.paths.values_mut() {
            let reads = [
                &mut item.get,
                &mut item.head,
                &mut item.options,
                &mut item.trace,
            ];
            let changes = [
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ];
            let operations = reads.map(|op| (op, false)).into_iter();
            for (operation, changes_state) in operations.chain(changes.map(|op| (op, true))) {
                let Some(operation) = operation.as_mut() else {
                    continue;
                };
                let needs_token = operation.security.as_deref() != Some(&open);
                let responses = &mut operation.responses.responses;
                for (status, applies, description) in [
                    ("429", true, RATE_LIMITED),
                    ("401", needs_token, "No valid token"),
                    ("415", changes_state, UNSUPPORTED_MEDIA_TYPE),
                ] {
                    if applies {
                        responses
                            .entry(status.to_owned())
                            .or_insert_with(|| error(description).into());
                    }
                }
            }
        }
    }
}

const RATE_LIMITED: &str =
    "Too many requests without a valid token from this address; see `Retry-After`";
const UNSUPPORTED_MEDIA_TYPE: &str = "A body not sent as `Content-Type: application/json`";

/// `GET /api/openapi.json`: open, it holds no secret.
#[utoipa::path(get, path = "/api/openapi.json", tag = "service", security(()),
    responses((status = 200, description = "This document", content_type = "application/json")))]
async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::routes;

    #[test]
    fn the_openapi_document_describes_every_route() {
        let doc = ApiDoc::openapi();
        for (method, path) in routes() {
            let item = doc
                .paths
                .paths
                .get(path)
                .unwrap_or_else(|| panic!("{path} is missing from the OpenAPI document"));
            let operation = match method {
                Method::GET => &item.get,
                Method::POST => &item.post,
                Method::DELETE => &item.delete,
                Method::PATCH => &item.patch,
                Method::PUT => &item.put,
                other => panic!("no check for {other} routes"),
            };
            assert!(
                operation.is_some(),
                "{method} {path} is missing from the OpenAPI document"
            );
        }
    }

    #[test]
    fn every_operation_has_an_id_of_its_own() {
        let doc = ApiDoc::openapi();
        let mut seen = std::collections::BTreeMap::new();
        for (path, item) in &doc.paths.paths {
            for (method, operation) in [
                ("GET", &item.get),
                ("POST", &item.post),
                ("DELETE", &item.delete),
                ("PUT", &item.put),
                ("PATCH", &item.patch),
            ] {
                let Some(operation) = operation else { continue };
                let id = operation
                    .operation_id
                    .clone()
                    .unwrap_or_else(|| panic!("{method} {path} has no operationId"));
                if let Some(other) = seen.insert(id.clone(), format!("{method} {path}")) {
                    panic!("operationId `{id}` names both {other} and {method} {path}");
                }
            }
        }
    }

    #[test]
    fn the_openapi_document_describes_no_route_that_does_not_exist() {
        let routes = routes();
        let doc = ApiDoc::openapi();
        for (path, item) in &doc.paths.paths {
            for (method, operation) in [
                (Method::GET, &item.get),
                (Method::POST, &item.post),
                (Method::DELETE, &item.delete),
                (Method::PUT, &item.put),
                (Method::PATCH, &item.patch),
            ] {
                if operation.is_some() {
                    assert!(
                        routes.contains(&(method.clone(), path.as_str())),
                        "the document describes {method} {path}, which is no route"
                    );
                }
            }
        }
    }

    #[test]
    fn the_guards_answers_are_documented_where_they_can_come() {
        let doc = ApiDoc::openapi();
        let statuses = |path: &str, method: Method| {
            let item = &doc.paths.paths[path];
            let operation = match method {
                Method::GET => &item.get,
                Method::POST => &item.post,
                Method::PATCH => &item.patch,
                Method::PUT => &item.put,
                _ => &item.delete,
            };
            let responses = &operation.as_ref().unwrap().responses.responses;
            responses.keys().cloned().collect::<Vec<_>>()
        };
        for (method, path) in routes() {
            let listed = statuses(path, method.clone());
            let has = |status: &str| listed.iter().any(|s| s == status);
            let open = [
                "/health",
                "/api/openapi.json",
                "/dashboard/app.js",
                "/dashboard/app.css",
            ]
            .contains(&path);
            assert!(has("429"), "{method} {path}: {listed:?}");
            assert_eq!(has("401"), !open, "{method} {path}: {listed:?}");
            assert_eq!(has("415"), !method.is_safe(), "{method} {path}: {listed:?}");
        }
        // A status a route lists itself keeps its own description.
        let rent = doc.paths.paths["/api/rent"].post.as_ref().unwrap();
        let utoipa::openapi::RefOr::T(quota) = &rent.responses.responses["429"] else {
            panic!("429 of /api/rent is a reference");
        };
        assert!(quota.description.contains("quota"), "{}", quota.description);
    }
}
