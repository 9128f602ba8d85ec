//! Binding a pod's ports on its own address, where the pod's own port is
//! often below 1024 (80, 443): directly when the agent may, else through the
//! package's bind helper (`k3s-local-agent-bind`, which alone carries
//! `cap_net_bind_service` and binds only inside the address block), which
//! hands the listening socket back. The agent itself never holds a
//! capability.

use std::net::SocketAddr;
use std::path::PathBuf;

use k3s_local_agent_bind::{BindHelper, BindHelperError};
use parking_lot::Mutex;

use super::addresses::CannotListen;
use super::listen::bind_listener;

/// Binds ports on pod addresses, asking the helper when a bind is refused
/// for want of privilege. One helper process serves every such bind (a
/// restore of many pods on port 80 starts one process, not one each).
#[derive(Debug)]
pub struct AddressPorts {
    helper_path: Option<PathBuf>,
    helper: Mutex<Option<BindHelper>>,
}

impl AddressPorts {
    /// `helper_path`: the bind helper, when one is installed or configured.
    pub fn new(helper_path: Option<PathBuf>) -> Self {
        Self {
            helper_path,
            helper: Mutex::new(None),
        }
    }

    /// A listening socket on `addr`, or why there cannot be one, with what
    /// to run to allow it.
    pub fn bind(&self, addr: SocketAddr) -> Result<std::net::TcpListener, CannotListen> {
        let denied = match bind_listener(addr) {
            Ok(listener) => return Ok(listener),
            Err(err) if err.kind() == std::io::ErrorKind::PermissionDenied => err,
            Err(err) => return Err(CannotListen::new(addr, &err)),
        };
        let (Some(helper_path), SocketAddr::V4(v4)) = (&self.helper_path, addr) else {
            return Err(CannotListen::new(addr, &denied));
        };
        match self.through_helper(v4) {
            Ok(listener) => Ok(listener),
            Err(BindHelperError::Bind { source, .. }) => {
                // The helper tried and the kernel said no: without its
                // capability (a build tree, a file system without xattrs)
                // that is EACCES, and the fix is the helper's capability.
                Err(CannotListen::new(addr, &source).via_helper(helper_path))
            }
            Err(err) => Err(CannotListen::Other {
                addr,
                message: err.to_string(),
            }),
        }
    }

    /// Asks the helper, starting it when none runs; a helper that died or
    /// broke the protocol is replaced once.
    fn through_helper(
        &self,
        addr: std::net::SocketAddrV4,
    ) -> Result<std::net::TcpListener, BindHelperError> {
        let Some(path) = &self.helper_path else {
            return Err(BindHelperError::Spawn {
                helper: PathBuf::new(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        };
        let mut slot = self.helper.lock();
        for attempt in 0..2 {
            if slot.is_none() {
                *slot = Some(BindHelper::spawn(path)?);
            }
            let Some(helper) = slot.as_mut() else {
                continue;
            };
            match helper.bind(addr) {
                Ok(listener) => return Ok(listener),
                Err(err @ (BindHelperError::Refused { .. } | BindHelperError::Bind { .. })) => {
                    return Err(err)
                }
                Err(err) if attempt == 1 => {
                    *slot = None;
                    return Err(err);
                }
                Err(err) => {
                    tracing::debug!(error = %err, "bind helper failed; starting a new one");
                    *slot = None;
                }
            }
        }
        Err(BindHelperError::Spawn {
            helper: path.clone(),
            source: std::io::Error::other("the bind helper kept failing"),
        })
    }
}
