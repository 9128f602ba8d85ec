//! Who may call the agent: the bearer token (required when the receiver
//! listens beyond loopback, compared in constant time), and the loopback-only
//! guard for endpoints that change local state; foreign `Origin` headers are
//! refused everywhere and foreign `Host` headers on loopback, so no web page
//! can drive the agent (cross-site requests, DNS rebinding).

use std::net::SocketAddr;

use axum::extract::rejection::ExtensionRejection;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::agent::Agent;
use crate::api::receiver::ApiError;

/// Paths anyone may read without the token (liveness checks).
const OPEN_PATHS: [&str; 1] = ["/health"];

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

/// Middleware on every request. A browser's `Origin`, when sent, must be a
/// page of this machine: the control plane sends none, and a page elsewhere
/// could otherwise push with a "simple" (unpreflighted) POST. Beyond loopback:
/// every request but the open paths must carry the bearer token. On loopback:
/// the `Host` must be local, so a web page whose name was rebound to
/// 127.0.0.1 cannot read or push.
pub async fn check_caller(State(agent): State<Agent>, request: Request, next: Next) -> Response {
    if let Some(origin) = request.headers().get(header::ORIGIN) {
        if !OPEN_PATHS.contains(&request.uri().path())
            && !origin.to_str().is_ok_and(is_local_origin)
        {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "requests from pages of other sites are refused",
            )
            .into_response();
        }
    }
    if agent.token_required() {
        if !OPEN_PATHS.contains(&request.uri().path()) {
            match bearer(request.headers()) {
                Some(token) if token_matches(token, agent.token()) => {}
                Some(_) => {
                    return ApiError::new(StatusCode::UNAUTHORIZED, "invalid bearer token")
                        .into_response()
                }
                None => {
                    return ApiError::new(
                        StatusCode::UNAUTHORIZED,
                        "missing bearer token: this agent listens beyond loopback, send \
                         `Authorization: Bearer <token>` (see `k3s-local-agent token`)",
                    )
                    .into_response()
                }
            }
        }
    } else if let Some(host) = request.headers().get(header::HOST) {
        if !host.to_str().is_ok_and(is_local_host) {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "Host header must name localhost or a loopback address",
            )
            .into_response();
        }
    }
    next.run(request).await
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

/// Whether an `Origin` header value is a page served from this machine.
fn is_local_origin(value: &str) -> bool {
    if value == "null" {
        return false;
    }
    let Some((scheme, rest)) = value.split_once("://") else {
        return false;
    };
    match scheme {
        "http" | "https" => is_local_host(rest.trim_end_matches('/')),
        // The desktop app's own webview.
        "tauri" => rest == "localhost",
        _ => false,
    }
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
        if !origin.to_str().is_ok_and(is_local_origin) {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "requests from other sites may not change the agent's state",
            )
            .into_response();
        }
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
        assert!(is_local_origin("http://localhost:8082"));
        assert!(is_local_origin("tauri://localhost"));
        assert!(!is_local_origin("http://evil.com"));
        assert!(!is_local_origin("null"));
        assert!(!is_local_origin("file://localhost"));
    }
}
