//! The dashboard: a page and its assets, embedded in the binary (no CDN: it
//! works offline). The page polls `/api/v1/status`; see `assets/dashboard.js`.
//! The chart library is uPlot 1.6.32 (MIT), vendored unmodified under
//! `assets/vendor/uplot/` (its README says how to upgrade it).

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::errors::ApiError;

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const INDEX: &str = include_str!("assets/index.html");

const ASSETS: &[Asset] = &[
    Asset {
        name: "dashboard.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("assets/dashboard.js"),
    },
    Asset {
        name: "dashboard.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("assets/dashboard.css"),
    },
    Asset {
        name: "uPlot.iife.min.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("assets/vendor/uplot/uPlot.iife.min.js"),
    },
    Asset {
        name: "uPlot.min.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("assets/vendor/uplot/uPlot.min.css"),
    },
    Asset {
        name: "uPlot.LICENSE.txt",
        content_type: "text/plain; charset=utf-8",
        body: include_str!("assets/vendor/uplot/LICENSE"),
    },
];

/// Everything the page may load comes from this service; no inline script.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'";

fn page(content_type: &'static str, body: &'static str) -> Response {
    let mut r = (StatusCode::OK, body).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// `GET /`: the page.
pub async fn index() -> Response {
    page("text/html; charset=utf-8", INDEX)
}

/// `GET /assets/{name}`.
pub async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|a| a.name == name) {
        Some(a) => page(a.content_type, a.body),
        None => ApiError::not_found(&format!("/assets/{name}")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_the_page_names_is_embedded() {
        for src in INDEX
            .split("\"assets/")
            .skip(1)
            .map(|rest| &rest[..rest.find('"').unwrap()])
        {
            assert!(
                ASSETS.iter().any(|a| a.name == src),
                "the page loads assets/{src}, which is not embedded"
            );
        }
        // No remote resource at all: the page works offline.
        for a in ASSETS.iter().filter(|a| a.name.starts_with("dashboard")) {
            assert!(
                !a.body.contains("http://") && !a.body.contains("https://"),
                "{}",
                a.name
            );
        }
        assert!(!INDEX.contains("http://") && !INDEX.contains("https://"));
    }
}
