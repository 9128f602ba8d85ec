//! Port-forwards through a Kubernetes API server, two ways: a WebSocket per
//! connection (`websocket`, what the local mirror uses and the fallback for
//! servers that refuse SPDY), and SPDY sessions (`spdy`, `sessions`), each
//! carrying many connections to one pod, so a new connection costs a pair
//! of frames on a warm connection instead of a TCP, TLS and HTTP upgrade.

mod sessions;
mod spdy;
mod websocket;

pub use sessions::{OpenError, Sessions};
pub use websocket::open;
