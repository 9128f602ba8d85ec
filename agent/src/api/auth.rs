//! Who may call the agent. A loopback caller is known by the user who owns
//! its socket (asked of the kernel when needed, `peer`): this
//! agent's user and root are trusted as they are; any other local user, and
//! any caller beyond loopback when the agent listens there, needs the bearer
//! token (compared in constant time) for every endpoint but `/health`, which
//! then shows no pods, and the dashboard's page, which holds no data and asks
//! for the token. A browser is trusted only from the agent's own pages
//! (same origin) or the tray app's webview: every other `Origin`, a page
//! served through one of our own tunnels included, is refused; on loopback a
//! foreign `Host` is refused (DNS rebinding); and a state change never comes
//! with a form's content type. Endpoints that change local state answer
//! loopback callers only.

use std::net::SocketAddr;

use axum::extract::rejection::ExtensionRejection;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::peer::Peer;
use crate::agent::Agent;

/// Paths anyone may read without the token: liveness, and the dashboard's
/// page and code, which hold no data (the page then asks for the token).
const OPEN_PATHS: [&str; 6] = [
    "/health",
    "/",
    "/index.html",
    "/app.js",
    "/adapter.js",
    "/style.css",
];

/// The open paths whose answer depends on who asks (`/health` shows pods to
/// trusted callers only): the only open ones that look the caller up.
const OPEN_PATHS_BY_CALLER: [&str; 1] = ["/health"];

/// What a request may see, as [`check_caller`] decided; handlers read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// This agent's user, root, or a holder of the token.
    Trusted,
    /// Anyone else, allowed on the open paths only (which then show no pods).
    Stranger,
}

/// Content types an HTML form (or a `no-cors` fetch) can send without the
/// browser asking first: a state change never comes as one of these.
const FORM_TYPES: [&str; 3] = [
    "application/x-www-form-urlencoded",
    "multipart/form-data",
    "text/plain",
];

/// Whether `headers` carry a content type a web form could have sent.
pub fn has_form_content_type(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map(|value| {
            value
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
        .is_some_and(|media| FORM_TYPES.contains(&media.as_str()))
}

/// The answer to a state change sent with a form's content type.
pub fn form_refused() -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "state changes must be sent as Content-Type: application/json",
    )
}

/// Whether `presented` equals `expected`, in time independent of where they differ.
pub fn token_matches(presented: &str, expected: &str) -> bool {
    presented.as_bytes().ct_eq(expected.as_bytes()).into()
}

/// The bearer token from an `Authorization` header, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Middleware on every request: a browser's `Origin` must be one of the
/// agent's own pages; on loopback the `Host` must be local; then who the
/// caller is (its socket's user, or the token) decides what it may do.
pub async fn check_caller(
    State(agent): State<Agent>,
    mut request: Request,
    next: Next,
) -> Response {
    let open = OPEN_PATHS.contains(&request.uri().path());
    let open_to_all = open && !OPEN_PATHS_BY_CALLER.contains(&request.uri().path());
    let headers = request.headers();
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        if !open
            && !origin
                .to_str()
                .is_ok_and(|origin| is_own_origin(origin, host))
        {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "requests from pages other than the agent's own are refused",
            )
            .into_response();
        }
    }
    if !agent.token_required() {
        if let Some(host) = headers.get(header::HOST) {
            if !host.to_str().is_ok_and(is_local_host) {
                return ApiError::new(
                    StatusCode::FORBIDDEN,
                    "Host header must name localhost or a loopback address",
                )
                .into_response();
            }
        }
    }
    let token = match bearer(headers) {
        Some(token) if token_matches(token, agent.token()) => true,
        Some(_) => {
            return ApiError::new(StatusCode::UNAUTHORIZED, "invalid bearer token").into_response()
        }
        None => false,
    };
    let caller = if token {
        Caller::Trusted
    } else if agent.token_required() {
        if !open {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing bearer token: this agent listens beyond loopback, send \
                 `Authorization: Bearer <token>` (see `k3s-local-agent token`)",
            )
            .into_response();
        }
        Caller::Stranger
    } else {
        let peer = request.extensions().get::<Peer>().cloned();
        match peer {
            // Not through the server: an in-process caller of the router.
            None => Caller::Trusted,
            // The dashboard's files are the same for everyone: asking the
            // kernel whose the connection is would be work for nothing.
            Some(_) if open_to_all => Caller::Stranger,
            Some(peer) if is_own_user(peer.uid().await) => Caller::Trusted,
            Some(_) if open => Caller::Stranger,
            Some(_) => {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "this agent belongs to another user of this machine: send its bearer \
                     token (`Authorization: Bearer <token>`; its user can print it with \
                     `k3s-local-agent token`)",
                )
                .into_response()
            }
        }
    };
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// Whether the socket's user may use the agent without the token: the
/// agent's own user, or root. Where the kernel cannot tell (not Linux), the
/// loopback caller is trusted, as before.
fn is_own_user(uid: Option<u32>) -> bool {
    match (uid, crate::ops::own_uid()) {
        (Some(uid), Some(own)) => uid == own || uid == 0,
        (None, Some(_)) => false,
        (_, None) => true,
    }
}

/// Whether a `Host` header value names this machine's loopback.
fn is_local_host(value: &str) -> bool {
    let host = match value.strip_prefix('[') {
        // [::1]:8082
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => value.rsplit_once(':').map_or(value, |(host, port)| {
            if port.chars().all(|c| c.is_ascii_digit()) {
                host
            } else {
                value
            }
        }),
    };
    let host = host.to_ascii_lowercase();
    host == "localhost"
        || host.ends_with(".localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether an `Origin` is one of the agent's own pages: the origin the
/// request itself was sent to (`http://` + its `Host`: only the agent serves
/// on its port), on a loopback name, or the tray app's webview. A page of a
/// tunnel (`http://web-staging.localhost:8085`) is another origin.
fn is_own_origin(origin: &str, host: Option<&str>) -> bool {
    match origin {
        // The desktop app's webview (Linux and macOS; Windows).
        "tauri://localhost" | "http://tauri.localhost" => return true,
        "null" => return false,
        _ => {}
    }
    let Some(rest) = origin.strip_prefix("http://") else {
        return false;
    };
    let Some(host) = host else {
        return false;
    };
    rest.eq_ignore_ascii_case(host) && is_local_host(rest)
}

/// Middleware for endpoints that change local state: loopback callers only,
/// with a local `Host`, and a local `Origin` when a browser sends one.
pub async fn local_only(
    peer: Result<ConnectInfo<SocketAddr>, ExtensionRejection>,
    request: Request,
    next: Next,
) -> Response {
    let peer_is_loopback = peer.is_ok_and(|ConnectInfo(addr)| addr.ip().is_loopback());
    if !peer_is_loopback {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "this endpoint answers callers on this machine only",
        )
        .into_response();
    }
    let headers = request.headers();
    let host_ok = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .is_some_and(is_local_host);
    if !host_ok {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "Host header must name localhost or a loopback address",
        )
        .into_response();
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        if !origin
            .to_str()
            .is_ok_and(|origin| is_own_origin(origin, host))
        {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "requests from other sites may not change the agent's state",
            )
            .into_response();
        }
    }
    if has_form_content_type(headers) {
        return form_refused().into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(token_matches("abc", "abc"));
        assert!(!token_matches("abd", "abc"));
        assert!(!token_matches("ab", "abc"));
        assert!(!token_matches("", "abc"));
    }

    #[test]
    fn hosts_and_origins() {
        for ok in [
            "localhost",
            "localhost:8082",
            "127.0.0.1:8082",
            "[::1]:8082",
            "my-app-staging.localhost:9",
        ] {
            assert!(is_local_host(ok), "{ok}");
        }
        for bad in [
            "evil.com",
            "evil.com:8082",
            "localhost.evil.com",
            "10.0.0.1:8082",
            "",
        ] {
            assert!(!is_local_host(bad), "{bad}");
        }
        let own = Some("localhost:8082");
        assert!(is_own_origin("http://localhost:8082", own));
        assert!(is_own_origin("tauri://localhost", own));
        assert!(!is_own_origin("http://evil.com", own));
        assert!(!is_own_origin("null", own));
        assert!(!is_own_origin("file://localhost", own));
        // A page served through a tunnel is another origin, on every name.
        assert!(!is_own_origin("http://localhost:8085", own));
        assert!(!is_own_origin("http://evil-staging.localhost:8081", own));
        assert!(!is_own_origin(
            "http://evil-staging.localhost:8081",
            Some("evil-staging.localhost:8082")
        ));
        assert!(!is_own_origin("http://127.0.0.1:8082", None));
        // A rebound name is not local even when it is the same origin.
        assert!(!is_own_origin(
            "http://evil.com:8082",
            Some("evil.com:8082")
        ));
    }

    #[test]
    fn form_content_types_are_spotted() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, value.parse().expect("header"));
            has_form_content_type(&headers)
        };
        assert!(with("application/x-www-form-urlencoded"));
        assert!(with("text/plain;charset=UTF-8"));
        assert!(with("Multipart/Form-Data; boundary=x"));
        assert!(!with("application/json"));
        assert!(!has_form_content_type(&HeaderMap::new()));
    }
}
