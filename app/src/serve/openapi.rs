//! The OpenAPI document of the HTTP API, generated from the handlers and
//! types (utoipa). Served at `/api/v1/openapi.json` and checked in as
//! `docs/openapi.json`; a test keeps the two equal
//! (`tandem serve --print-openapi > docs/openapi.json` regenerates it).

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{api, errors, routes, series, status};

/// The API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tandem",
        description = "The HTTP API of `tandem serve`: all-or-nothing batch writes across a \
                       metadata store and a vector index, guarded search, and the service's \
                       health, status and metrics. Errors carry a stable `code`, `retryable` and \
                       `outcome` (see docs/serve.md and docs/errors.md).",
        license(name = "Apache-2.0")
    ),
    paths(
        api::upsert,
        api::delete,
        api::search,
        api::get,
        api::status,
        routes::healthz,
        routes::readyz,
        routes::metrics,
        routes::openapi_json,
    ),
    components(schemas(
        api::ApiRecord,
        api::Embed,
        api::UpsertRequest,
        api::UpsertResponse,
        api::DeleteRequest,
        api::DeleteResponse,
        api::SearchRequest,
        api::SearchResponse,
        api::ApiHit,
        api::ApiStoredRecord,
        api::GetRequest,
        api::GetResponse,
        errors::ApiError,
        errors::ApiOutcome,
        routes::Health,
        routes::Readiness,
        routes::StoreReadiness,
        status::Status,
        series::SeriesStatus,
        series::PhaseStatus,
    )),
    tags(
        (name = "records", description = "Writes and reads"),
        (name = "service", description = "Health, readiness, status and metrics"),
    ),
    modifiers(&Bearer)
)]
pub struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "Required on every endpoint but /healthz, the dashboard and this \
                         document when the service runs with TANDEM_API_TOKEN",
                    ))
                    .build(),
            ),
        );
    }
}

/// The document as served and checked in: pretty JSON and a final newline.
pub fn document() -> String {
    let mut text = ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_checked_in_document_is_the_generated_one() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            checked_in == super::document(),
            "docs/openapi.json is out of date: regenerate it with \
             `cargo run -p tandem-app -- serve --print-openapi > docs/openapi.json`"
        );
    }
}
