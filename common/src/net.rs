//! Listeners: binding one, and the error that says which could not be.

use std::net::SocketAddr;

use tokio::net::TcpListener;

/// A listener that could not be bound (a port already in use, an address
/// not on this host), named by its address and its role.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({what}): {source}")]
pub struct BindError {
    /// The address.
    pub addr: SocketAddr,
    /// Which listener: `proxy`, `admin`, `control`.
    pub what: &'static str,
    /// What the OS said.
    #[source]
    pub source: std::io::Error,
}

impl BindError {
    /// The error for listener `what` on `addr`, for `map_err`.
    pub fn at(addr: SocketAddr, what: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| Self { addr, what, source }
    }
}

/// Binds listener `what` on `addr` (port 0 picks one) and returns it with
/// the address it got.
pub async fn bind(
    addr: SocketAddr,
    what: &'static str,
) -> Result<(TcpListener, SocketAddr), BindError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(BindError::at(addr, what))?;
    let local = listener.local_addr().map_err(BindError::at(addr, what))?;
    Ok((listener, local))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_port_in_use_names_the_address_and_the_listener() {
        let (_held, addr) = bind("127.0.0.1:0".parse().unwrap(), "admin").await.unwrap();
        let err = bind(addr, "control").await.unwrap_err();
        assert_eq!(err.addr, addr);
        assert_eq!(err.source.kind(), std::io::ErrorKind::AddrInUse);
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("cannot listen on {addr} (control): ")),
            "{text}"
        );
    }
}
