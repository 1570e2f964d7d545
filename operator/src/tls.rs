//! TLS on the control port: a serving certificate issued by this replica
//! from the control CA ([`crate::ca`]), renewed in place, and an acceptor
//! that bounds every handshake.
//!
//! The certificate lives in memory only, behind an [`ArcSwap`]: a renewal
//! changes what new handshakes get, and connections already up keep theirs
//! (TLS never re-authenticates a running connection), so no agent is
//! dropped. TLS 1.3 only, ALPN `h2`, rustls with ring passed explicitly (a
//! process-default provider is never relied on).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::ca::{Authority, CaError};
use crate::metrics::{HandshakeFailure, Metrics};

/// Most TLS handshakes in progress at once; more connections wait in the
/// kernel's accept queue.
const MAX_HANDSHAKES: usize = 256;

/// The crypto provider every TLS config here uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Serves whatever certificate was issued last.
#[derive(Debug)]
pub struct Resolver {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// What a serving certificate is issued for.
#[derive(Debug, Clone)]
pub struct LeafConfig {
    /// Its DNS names (the control Service's).
    pub dns_names: Vec<String>,
    /// Its lifetime; it is renewed at half of it.
    pub ttl: Duration,
}

fn issue(signer: &Authority, leaf: &LeafConfig) -> Result<(Arc<CertifiedKey>, i64), CaError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let (chain, key) = signer.issue(&leaf.dns_names, leaf.ttl, now)?;
    let key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(CaError::Key)?;
    let expires = now + i64::try_from(leaf.ttl.as_secs()).unwrap_or(i64::MAX);
    Ok((Arc::new(CertifiedKey::new(chain, key)), expires))
}

impl Resolver {
    /// A resolver serving a certificate issued now by `signer`.
    pub fn new(
        signer: &Authority,
        leaf: &LeafConfig,
        metrics: &Metrics,
    ) -> Result<Arc<Self>, CaError> {
        let (key, expires) = issue(signer, leaf)?;
        metrics.control_cert_expiry.set(expires);
        Ok(Arc::new(Self {
            current: ArcSwap::new(key),
        }))
    }

    /// The server config for the control port.
    pub fn server_config(self: &Arc<Self>) -> Result<rustls::ServerConfig, rustls::Error> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    /// Renews the certificate at half its lifetime, and at once when the
    /// signer changes, until `stop`. A failed issue is retried in a minute;
    /// the current certificate keeps serving meanwhile.
    pub async fn renew(
        self: Arc<Self>,
        mut signer: watch::Receiver<Arc<Authority>>,
        leaf: LeafConfig,
        metrics: Metrics,
        stop: CancellationToken,
    ) {
        let mut wait = leaf.ttl / 2;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                changed = signer.changed() => if changed.is_err() { return },
            }
            let current = signer.borrow_and_update().clone();
            match issue(&current, &leaf) {
                Ok((key, expires)) => {
                    self.current.store(key);
                    metrics.control_cert_expiry.set(expires);
                    metrics.control_cert_renewals.inc();
                    tracing::info!(ttl = ?leaf.ttl, "issued a new serving certificate for the control port");
                    wait = leaf.ttl / 2;
                }
                Err(error) => {
                    tracing::warn!(%error, "renewing the control port's certificate failed; retrying in a minute");
                    wait = Duration::from_secs(60).min(leaf.ttl / 4);
                }
            }
        }
    }
}

/// Accepts TCP connections on `listener` and hands over those whose TLS
/// handshake finishes within `timeout`; a failed or slow handshake is
/// counted and dropped, and never holds up another. Ends at `stop`.
pub fn accept(
    listener: TcpListener,
    config: rustls::ServerConfig,
    timeout: Duration,
    metrics: Metrics,
    stop: CancellationToken,
) -> mpsc::Receiver<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = handshakes.clone().acquire_owned().await else {
                return;
            };
            let (tcp, peer) = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(error) => {
                        // Out of file descriptors and the like: wait, do not spin.
                        tracing::warn!(%error, "accepting a control connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let (acceptor, tx, metrics) = (acceptor.clone(), tx.clone(), metrics.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match handshake(&acceptor, tcp, peer, timeout).await {
                    Ok(tls) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Err(reason) => {
                        metrics
                            .tls_handshake_failures
                            .get_or_create(&crate::metrics::HandshakeLabel { reason })
                            .inc();
                    }
                }
            });
        }
    });
    rx
}

async fn handshake(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>, HandshakeFailure> {
    let _ = tcp.set_nodelay(true);
    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(error)) => {
            tracing::info!(%peer, %error, "TLS handshake on the control port failed (a plain-text or untrusting client?)");
            Err(HandshakeFailure::Handshake)
        }
        Err(_) => {
            tracing::info!(%peer, ?timeout, "TLS handshake on the control port did not finish in time; closed");
            Err(HandshakeFailure::Timeout)
        }
    }
}
