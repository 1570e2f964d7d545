//! Loopback sockets: free ports, and a TCP balancer standing for a
//! Service's ClusterIP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::{TcpListener, TcpStream};

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A TCP load balancer on loopback: each new connection goes to the next
/// of its current backends, round robin (a Service's ClusterIP, in small).
#[derive(Debug, Clone)]
pub struct Balancer {
    /// Where it listens.
    pub addr: SocketAddr,
    backends: Arc<std::sync::Mutex<Vec<SocketAddr>>>,
}

impl Balancer {
    /// Starts a balancer over `backends`.
    pub async fn start(backends: Vec<SocketAddr>) -> Balancer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backends = Arc::new(std::sync::Mutex::new(backends));
        let shared = backends.clone();
        tokio::spawn(async move {
            let next = AtomicUsize::new(0);
            while let Ok((mut client, _)) = listener.accept().await {
                let target = {
                    let list = shared.lock().unwrap();
                    list[next.fetch_add(1, Ordering::SeqCst) % list.len()]
                };
                tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(target).await {
                        let _ = server.set_nodelay(true);
                        let _ = client.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Balancer { addr, backends }
    }

    /// Replaces the backends new connections go to.
    pub fn set_backends(&self, backends: Vec<SocketAddr>) {
        *self.backends.lock().unwrap() = backends;
    }
}
