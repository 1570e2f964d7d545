//! `spec.clients` over real sockets: a client from a namespace the pool
//! does not list, or from an IP the agent does not know, gets
//! PERMISSION_DENIED naming the pool and is never forwarded (the backend
//! sees no connection), while an allowed client on the same agent is
//! served; a pool without a list serves everyone; a new pod map takes
//! effect on connections already open; a pool's dedicated port checks the
//! same way. Clients bind their socket to a
//! chosen loopback address first, standing for a pod IP.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tidepool_agent::clients::ClientMap;
use tidepool_testkit::*;
use tokio::time::timeout;
use tonic::Code;

/// The pod IPs the tests stand for.
const SHOP: &str = "127.0.0.51";
const DEV: &str = "127.0.0.52";
const UNKNOWN: &str = "127.0.0.53";

fn map(version: &str, pods: &[(&str, &'static str)]) -> ClientMap {
    ClientMap::new(
        version,
        pods.iter().map(|(ip, ns)| (ip.parse().unwrap(), *ns)),
    )
}

async fn call(client: &mut Client) -> Result<String, tonic::Status> {
    let response = client
        .unary(request(Bytes::from_static(b"hi"), &[]))
        .await?;
    Ok(backend_of(response.metadata()))
}

#[tokio::test]
async fn a_refused_client_gets_permission_denied_and_no_backend_dial() {
    timeout(Duration::from_secs(20), async {
        let guarded = Backend::start("guarded").await;
        let open = Backend::start("open").await;
        let app = agent().await;
        app.runtime()
            .apply(vec![
                pool("echo", &[guarded.address()])
                    .clients(&["shop", "billing"])
                    .build(),
                pool("open", &[open.address()]).build(),
            ])
            .unwrap();
        app.runtime()
            .set_clients(map("v1", &[(SHOP, "shop"), (DEV, "dev")]));

        let mut shop = Client::connect_from(app.proxy_addr(), "echo", SHOP).await;
        let mut dev = Client::connect_from(app.proxy_addr(), "echo", DEV).await;
        let mut stranger = Client::connect_from(app.proxy_addr(), "echo", UNKNOWN).await;

        // Refused first, so a backend connection could only be theirs.
        let status = call(&mut dev).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        let message = status.message();
        assert!(
            message.contains("pool default/echo")
                && message.contains("namespace dev")
                && message.contains(DEV)
                && message.contains("spec.clients.namespaces"),
            "{message}"
        );
        let status = call(&mut stranger).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(
            status.message().contains("pool default/echo")
                && status.message().contains(UNKNOWN)
                && status.message().contains("no pod this node's agent knows"),
            "{}",
            status.message()
        );
        assert_eq!(guarded.accepts(), 0, "a refused client reached the backend");
        assert_eq!(guarded.state.calls.load(Ordering::SeqCst), 0);

        // The allowed client beside them is served.
        assert_eq!(call(&mut shop).await.unwrap(), "guarded");
        assert_eq!(guarded.accepts(), 1);
        // A refused stream never reaches the now-open backend connection.
        assert_eq!(
            call(&mut dev).await.unwrap_err().code(),
            Code::PermissionDenied
        );
        assert_eq!(guarded.state.calls.load(Ordering::SeqCst), 1);

        // A pool without a list serves a client the agent does not know.
        let mut anyone = Client::connect_from(app.proxy_addr(), "open", UNKNOWN).await;
        assert_eq!(call(&mut anyone).await.unwrap(), "open");

        let (_, metrics) = http_get(app.admin_addr(), "/metrics").await;
        for line in [
            "tidepool_proxy_refused_total{pool=\"default/echo\",reason=\"namespace\"} 2",
            "tidepool_proxy_refused_total{pool=\"default/echo\",reason=\"unknown_ip\"} 1",
            "tidepool_clients_pods 2",
        ] {
            assert!(metrics.contains(line), "no {line:?} in\n{metrics}");
        }
        let (_, pools) = http_get(app.admin_addr(), "/pools").await;
        assert!(
            pools.contains("\"clients\":[\"shop\",\"billing\"]"),
            "{pools}"
        );
        let (_, clients) = http_get(app.admin_addr(), "/clients").await;
        assert!(
            clients.contains(&format!("{{\"ip\":\"{SHOP}\",\"namespace\":\"shop\"}}")),
            "{clients}"
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_new_pod_map_applies_to_open_connections_and_unknown_fails_closed() {
    timeout(Duration::from_secs(20), async {
        let backend = Backend::start("b").await;
        let app = agent().await;
        app.runtime()
            .apply(vec![
                pool("echo", &[backend.address()])
                    .clients(&["shop"])
                    .build(),
            ])
            .unwrap();
        let mut client = Client::connect_from(app.proxy_addr(), "echo", DEV).await;

        // No map yet: every IP is unknown, so refused.
        let status = call(&mut client).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
        assert!(status.message().contains("no pod"), "{}", status.message());

        // The pod turns out to be in shop: the same connection is served.
        app.runtime().set_clients(map("v1", &[(DEV, "shop")]));
        assert_eq!(call(&mut client).await.unwrap(), "b");

        // Its IP goes to a pod of another namespace: refused again.
        app.runtime().set_clients(map("v2", &[(DEV, "dev")]));
        let status = call(&mut client).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
        assert!(
            status.message().contains("namespace dev"),
            "{}",
            status.message()
        );

        // Taking the list off the pool opens it to everyone.
        app.runtime()
            .apply(vec![
                pool("echo", &[backend.address()]).generation(2).build(),
            ])
            .unwrap();
        assert_eq!(call(&mut client).await.unwrap(), "b");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_dedicated_listener_checks_clients_too() {
    timeout(Duration::from_secs(20), async {
        let backend = Backend::start("b").await;
        let app = agent().await;
        let port = free_port();
        app.runtime()
            .apply(vec![
                pool("echo", &[backend.address()])
                    .listen_port(port)
                    .clients(&["shop"])
                    .build(),
            ])
            .unwrap();
        app.runtime()
            .set_clients(map("v1", &[(SHOP, "shop"), (DEV, "dev")]));
        let dedicated = std::net::SocketAddr::new(app.proxy_addr().ip(), port);
        // Any authority: the port alone chooses the pool.
        let mut dev = Client::connect_from(dedicated, "anything", DEV).await;
        let status = call(&mut dev).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(
            status.message().contains("pool default/echo"),
            "{}",
            status.message()
        );
        assert_eq!(backend.accepts(), 0);
        let mut shop = Client::connect_from(dedicated, "anything", SHOP).await;
        assert_eq!(call(&mut shop).await.unwrap(), "b");
    })
    .await
    .unwrap();
}
