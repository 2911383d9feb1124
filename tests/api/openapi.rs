//! `GET /api/openapi.json`: open, it describes every route of the router, and what each
//! route answers has exactly the fields its documented schema has.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::helpers::spawn_app;

/// The document, as an anonymous client gets it.
async fn document(app: &crate::helpers::TestApp) -> Value {
    let resp = reqwest::Client::new()
        .get(app.url("/api/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "the document is open");
    resp.json().await.expect("the document is JSON")
}

/// Follows `$ref`s to the schema itself.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(reference) => {
            let name = reference
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("an unexpected $ref {reference}"));
            resolve(doc, &doc["components"]["schemas"][name])
        }
        None => schema,
    }
}

/// The property names of an object schema, through `$ref`, `allOf` (flattened structs)
/// and a nullable `oneOf`.
fn fields(doc: &Value, schema: &Value) -> BTreeSet<String> {
    let schema = resolve(doc, schema);
    let mut names: BTreeSet<String> = schema["properties"]
        .as_object()
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    for part in schema["allOf"].as_array().into_iter().flatten() {
        names.extend(fields(doc, part));
    }
    for part in schema["oneOf"].as_array().into_iter().flatten() {
        names.extend(fields(doc, part));
    }
    names
}

/// The schema of property `name` of an object schema (searching `allOf` parts).
fn property<'a>(doc: &'a Value, schema: &'a Value, name: &str) -> &'a Value {
    let schema = resolve(doc, schema);
    if let Some(p) = schema["properties"].get(name) {
        return p;
    }
    schema["allOf"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|part| property(doc, part, name))
        .find(|p| !p.is_null())
        .unwrap_or(&Value::Null)
}

/// The documented JSON schema of the `status` answer of `method path`.
fn response_schema<'a>(doc: &'a Value, method: &str, path: &str, status: u16) -> &'a Value {
    let schema = &doc["paths"][path][method]["responses"][status.to_string()]["content"]["application/json"]
        ["schema"];
    assert!(
        !schema.is_null(),
        "{method} {path} documents no JSON body for {status}"
    );
    schema
}

/// Asserts that `body` has exactly the fields of `schema`, but for the optional ones
/// named in `absent`.
fn assert_fields(doc: &Value, schema: &Value, body: &Value, absent: &[&str], what: &str) {
    let have: BTreeSet<String> = body
        .as_object()
        .unwrap_or_else(|| panic!("{what} is not an object: {body}"))
        .keys()
        .cloned()
        .collect();
    let documented = fields(doc, schema);
    let undocumented: Vec<_> = have.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "{what} has fields the document lacks: {undocumented:?}"
    );
    let missing: Vec<_> = documented
        .difference(&have)
        .filter(|f| !absent.contains(&f.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{what} lacks documented fields: {missing:?}"
    );
}

#[tokio::test]
async fn the_document_is_open_and_describes_every_route() {
    let app = spawn_app(0).await;
    let doc = document(&app).await;
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{}",
        doc["openapi"]
    );
    for (method, path) in orion::api::routes() {
        let method = method.as_str().to_lowercase();
        assert!(
            doc["paths"][path][&method].is_object(),
            "{method} {path} is missing from /api/openapi.json"
        );
    }
}

#[tokio::test]
async fn every_answer_has_the_fields_of_its_documented_schema() {
    let app = spawn_app(1).await;
    let doc = document(&app).await;

    // A rent without a key: every field, the password included.
    let rented = app.rent_ok(json!({ "username": "alice" })).await;
    let schema = response_schema(&doc, "post", "/api/rent", 201);
    assert_fields(&doc, schema, &rented, &[], "the rent answer");
    let placement = property(&doc, schema, "placements");
    assert_fields(
        &doc,
        &placement["items"],
        &rented["placements"][0],
        &[],
        "a placement",
    );
    let id = rented["id"].as_str().unwrap();

    let (_, rental) = app.get_json(&format!("/api/rentals/{id}")).await;
    let schema = response_schema(&doc, "get", "/api/rentals/{id}", 200);
    assert_fields(&doc, schema, &rental, &[], "a rental");

    let (_, list) = app.get_json("/api/rentals").await;
    let schema = response_schema(&doc, "get", "/api/rentals", 200);
    assert_fields(&doc, schema, &list, &[], "the rental list");
    let item = &property(&doc, schema, "rentals")["items"];
    assert_fields(&doc, item, &list["rentals"][0], &[], "a listed rental");

    let (_, workers) = app.get_json("/api/workers").await;
    let schema = response_schema(&doc, "get", "/api/workers", 200);
    assert_fields(&doc, schema, &workers, &[], "the worker list");
    let item = &property(&doc, schema, "workers")["items"];
    let worker = &workers["workers"][0];
    assert_fields(&doc, item, worker, &[], "a listed worker");
    assert_fields(
        &doc,
        &property(&doc, item, "rental")["oneOf"][1],
        &worker["rental"],
        &[],
        "a worker's rental",
    );

    let resp = app
        .http
        .post(app.url("/api/workers/worker_1/undrain"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let schema = response_schema(&doc, "post", "/api/workers/{name}/undrain", 200);
    assert_fields(&doc, schema, &body, &[], "an undrained worker");

    let resp = app
        .http
        .post(app.url("/api/tokens"))
        .json(&json!({ "tenant": "acme" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let token: Value = resp.json().await.unwrap();
    let schema = response_schema(&doc, "post", "/api/tokens", 201);
    assert_fields(&doc, schema, &token, &[], "a new token");

    let (_, tokens) = app.get_json("/api/tokens").await;
    let schema = response_schema(&doc, "get", "/api/tokens", 200);
    assert_fields(&doc, schema, &tokens, &[], "the token list");
    let item = &property(&doc, schema, "tokens")["items"];
    assert_fields(&doc, item, &tokens["tokens"][0], &[], "a listed token");

    let (_, events) = app.get_json("/api/events").await;
    let schema = response_schema(&doc, "get", "/api/events", 200);
    assert_fields(&doc, schema, &events, &[], "the events page");
    let item = &property(&doc, schema, "events")["items"];
    assert_fields(&doc, item, &events["events"][0], &[], "an event");

    let (_, status) = app.get_json("/api/status").await;
    let schema = response_schema(&doc, "get", "/api/status", 200);
    assert_fields(&doc, schema, &status, &["error"], "the status");
    let counts = &property(&doc, schema, "workers");
    assert_fields(
        &doc,
        &counts["oneOf"][1],
        &status["workers"],
        &[],
        "the fleet counts",
    );

    let (_, health) = app.get_json("/health").await;
    let schema = response_schema(&doc, "get", "/health", 200);
    assert_fields(&doc, schema, &health, &["error"], "the health");

    // An error with the field at fault.
    let resp = app.rent(json!({ "username": "Not A Name!" })).await;
    assert_eq!(resp.status(), 422);
    let error: Value = resp.json().await.unwrap();
    let schema = response_schema(&doc, "post", "/api/rent", 422);
    assert_fields(&doc, schema, &error, &[], "an error");
    assert_fields(
        &doc,
        property(&doc, schema, "error"),
        &error["error"],
        &[],
        "an error's detail",
    );
}

/// The document passes a standard validator (`openapi-spec-validator`, which
/// `scripts/test.sh` installs): client generators read it as it is.
#[tokio::test]
async fn the_document_passes_a_standard_openapi_validator() {
    let app = spawn_app(1).await;
    let doc = document(&app).await;
    let file = app.dir.path().join("openapi.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    let out = std::process::Command::new("python3")
        .args(["-m", "openapi_spec_validator"])
        .arg(&file)
        .output()
        .expect("python3 is needed to run openapi-spec-validator");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !said.contains("No module named openapi_spec_validator"),
        "openapi-spec-validator is not installed: pip install openapi-spec-validator \
         (scripts/test.sh does)"
    );
    assert!(
        out.status.success(),
        "the validator refused the document: {said}"
    );
}

/// The routes of the route table in `docs/reference/api.md` (the rows of its `## Routes`
/// section), as `METHOD /path`: each row's first cell is one route in backticks.
fn reference_routes(text: &str) -> BTreeSet<String> {
    let section = text
        .split("\n## ")
        .find(|s| s.starts_with("Routes\n"))
        .expect("docs/reference/api.md has a `## Routes` section");
    let mut routes = BTreeSet::new();
    for row in section.lines().filter(|l| l.starts_with('|')) {
        let cell = row.split('|').nth(1).unwrap_or_default().trim();
        if cell == "route" || cell.starts_with("---") {
            continue;
        }
        let route = cell
            .strip_prefix('`')
            .and_then(|c| c.strip_suffix('`'))
            .unwrap_or_else(|| panic!("a route cell is one `METHOD /path`, not {cell:?}"));
        assert!(
            routes.insert(route.to_owned()),
            "{route} is listed twice in docs/reference/api.md"
        );
    }
    routes
}

/// The reference a reader sees and the document clients are generated from hold the same
/// routes: neither can gain or lose one without the other.
#[tokio::test]
async fn the_api_reference_lists_exactly_the_routes_of_the_document() {
    let app = spawn_app(0).await;
    let doc = document(&app).await;
    let methods = [
        "get", "put", "post", "delete", "patch", "head", "options", "trace",
    ];
    let documented: BTreeSet<String> = doc["paths"]
        .as_object()
        .expect("the document has paths")
        .iter()
        .flat_map(|(path, item)| {
            methods
                .iter()
                .filter(|m| item[**m].is_object())
                .map(move |m| format!("{} {path}", m.to_uppercase()))
        })
        .collect();
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/reference/api.md"
    ))
    .expect("docs/reference/api.md");
    let listed = reference_routes(&text);
    let unlisted: Vec<_> = documented.difference(&listed).collect();
    assert!(
        unlisted.is_empty(),
        "routes of /api/openapi.json missing from docs/reference/api.md: {unlisted:?}"
    );
    let undocumented: Vec<_> = listed.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "routes of docs/reference/api.md that /api/openapi.json lacks: {undocumented:?}"
    );
}
