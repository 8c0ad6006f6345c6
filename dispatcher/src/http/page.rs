//! The web page at `/`: a form to submit a job, its live previews, the final
//! grid and images, and the key's recent jobs (`GET /v1/jobs`). Plain HTML, CSS and
//! JavaScript from `dispatcher/web/`, compiled into the binary, so there is
//! nothing to build or install and nothing fetched from elsewhere (the
//! Content-Security-Policy says so to the browser too). The page talks to
//! the same `/v1/...` API as any client, with the API key it is given.

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

const INDEX_HTML: &str = include_str!("../../web/index.html");

/// The files under `/web/`: name, content type, content.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "api.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/api.js"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/app.js"),
    ),
    (
        "inputs.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/inputs.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../../web/style.css"),
    ),
];

/// Scripts and styles from this server only; images from anywhere (the
/// results are presigned URLs of the S3 server, previews are data URIs);
/// requests to this server only.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data: blob: http: https:; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

fn file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            // Revalidate each time: a new dispatcher must not run an old page.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        ],
        body,
    )
        .into_response()
}

/// The web page: a form, the live previews and the results.
#[utoipa::path(
    get,
    path = "/",
    tag = "page",
    responses((status = 200, description = "The page", content_type = "text/html", body = String))
)]
pub async fn index() -> Response {
    let mut response = file("text/html; charset=utf-8", INDEX_HTML);
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    response
}

/// The page's script and style sheet.
#[utoipa::path(
    get,
    path = "/web/{file}",
    tag = "page",
    params(("file" = String, Path, description = "`api.js`, `inputs.js`, `app.js` or `style.css`")),
    responses(
        (status = 200, description = "The file", content_type = "text/javascript", body = String),
        (status = 404, description = "No such file", content_type = "text/plain", body = String),
    )
)]
pub async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, content_type, body)) => file(content_type, body),
        None => (StatusCode::NOT_FOUND, "no such file").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(response: Response) -> (StatusCode, String, String) {
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        (status, content_type, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn every_file_the_page_links_is_served_with_its_type() {
        let (status, content_type, html) = read(index().await).await;
        assert_eq!(
            (status, content_type.as_str()),
            (StatusCode::OK, "text/html; charset=utf-8")
        );
        for (name, expected_type, body) in ASSETS {
            assert!(html.contains(&format!("\"/web/{name}\"")), "index.html links {name}");
            let (status, content_type, served) = read(asset(Path(name.to_string())).await).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(&content_type, expected_type);
            assert_eq!(&served, body);
        }
        let missing = read(asset(Path("missing.js".into())).await).await;
        assert_eq!(missing.0, StatusCode::NOT_FOUND);
    }

    /// No CDN, no font service: the page works on a machine with no way out.
    #[test]
    fn nothing_is_loaded_from_elsewhere() {
        for (name, text) in std::iter::once(("index.html", INDEX_HTML)).chain(ASSETS.iter().map(|(n, _, b)| (*n, *b))) {
            for external in ["http://", "https://", "//cdn", "@import"] {
                assert!(!text.contains(external), "{name} mentions {external}");
            }
        }
    }
}
