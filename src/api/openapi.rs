//! The API's OpenAPI document, checked in at `docs/openapi.json` and served at
//! `/openapi.json`. A test walks [`ROUTES`] against it both ways, so the document cannot
//! drift from the router.

use axum::http::header;
use axum::response::IntoResponse;

/// The OpenAPI 3.1 document.
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

/// Every route of the router: (method, path in OpenAPI syntax).
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/health"),
    ("get", "/ready"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("get", "/v1/deals"),
    ("get", "/v1/deals/{id}"),
    ("get", "/v1/deals/{id}/audit"),
    ("post", "/v1/deals/{id}/cancel"),
    ("post", "/v1/deals/{id}/fail"),
    ("post", "/v1/deals/{id}/retry"),
    ("get", "/v1/events"),
    ("post", "/v1/storage-deals"),
    ("post", "/v1/retrievals"),
];

/// Serves the document.
pub async fn document() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_describes_exactly_the_routes() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("valid JSON");
        assert_eq!(doc["openapi"].as_str().map(|v| v.starts_with("3.")), Some(true));
        let paths = doc["paths"].as_object().expect("paths");
        for (method, path) in ROUTES {
            assert!(
                paths.get(*path).and_then(|p| p.get(*method)).is_some(),
                "{method} {path} undocumented"
            );
        }
        let documented: usize = paths.values().map(|p| p.as_object().map_or(0, |o| o.len())).sum();
        assert_eq!(documented, ROUTES.len(), "the document has routes the router lacks");
    }
}
