//! What the agent answers itself, and what it refuses: unknown
//! authorities (and no dial), unreachable backends, full `Wait` pools,
//! HTTP/1, non-gRPC requests, malformed HTTP/2, and configurations that
//! clash. Other clients keep being served throughout.

use std::time::Duration;

use bytes::Bytes;
use tidepool_testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tonic::Code;

const LIMIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn an_unknown_authority_gets_an_error_naming_it_and_nothing_is_dialed() {
    timeout(LIMIT, async {
        let backend = Backend::start("b1").await;
        let app = agent().await;
        app.runtime()
            .apply(vec![pool("echo", &[backend.address()]).build()])
            .unwrap();
        // Even an authority that *is* a declared backend address is no route.
        for authority in ["nope.default:80", &backend.address(), "127.0.0.1:9"] {
            let mut client = Client::connect(app.proxy_addr(), authority).await;
            let status = client
                .unary(request(Bytes::from_static(b"x"), &[]))
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
            assert!(
                status.message().contains(&format!("{authority:?}")),
                "{status:?}"
            );
        }
        assert_eq!(
            backend.accepts(),
            0,
            "the agent dialed for an unknown authority"
        );
        assert!(
            app.runtime().report()[0]
                .addresses
                .iter()
                .all(|a| a.dials == 0)
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn an_unreachable_backend_gives_unavailable_naming_the_address() {
    timeout(LIMIT, async {
        let dead = format!("127.0.0.1:{}", free_port());
        let app = agent().await;
        app.runtime()
            .apply(vec![pool("echo", std::slice::from_ref(&dead)).build()])
            .unwrap();
        let mut client = Client::connect(app.proxy_addr(), "echo").await;
        let status = client
            .unary(request(Bytes::from_static(b"x"), &[]))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains(&dead), "{status:?}");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_dead_address_is_skipped_for_a_live_one() {
    timeout(LIMIT, async {
        let backend = Backend::start("b1").await;
        let dead = format!("127.0.0.1:{}", free_port());
        let app = agent().await;
        app.runtime()
            .apply(vec![pool("echo", &[dead, backend.address()]).build()])
            .unwrap();
        let mut client = Client::connect(app.proxy_addr(), "echo").await;
        // A failed dial is retried on another address (nothing was sent),
        // and the dead one then sits in backoff.
        for _ in 0..20 {
            let response = client
                .unary(request(Bytes::from_static(b"x"), &[]))
                .await
                .unwrap();
            assert_eq!(backend_of(response.metadata()), "b1");
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_full_wait_pool_times_out_with_resource_exhausted_naming_the_pool() {
    timeout(LIMIT, async {
        let backend = Backend::start("b1").await;
        let app = agent().await;
        app.runtime()
            .apply(vec![
                pool("echo", &[backend.address()])
                    .namespace("shop")
                    .size(1)
                    .max_idle(1)
                    .max_streams(1)
                    .wait("200ms")
                    .build(),
            ])
            .unwrap();
        let mut client = Client::connect(app.proxy_addr(), "echo.shop").await;
        let held = client
            .hold(request(Bytes::from_static(b"x"), &[]))
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let status = client
            .unary(request(Bytes::from_static(b"y"), &[]))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("shop/echo"), "{status:?}");
        assert!(started.elapsed() >= Duration::from_millis(190));
        // Once the slot frees, calls go through again.
        drop(held);
        assert!(streams_released(&app, &backend.address(), Duration::from_secs(3)).await);
        client
            .unary(request(Bytes::from_static(b"z"), &[]))
            .await
            .unwrap();
    })
    .await
    .unwrap();
}

/// A gRPC client that must keep working while others misbehave.
async fn still_served(app: &tidepool_agent::app::App) {
    let mut client = Client::connect(app.proxy_addr(), "echo").await;
    let response = client
        .unary(request(Bytes::from_static(b"ok"), &[]))
        .await
        .unwrap();
    assert_eq!(response.get_ref().as_ref(), b"ok");
}

#[tokio::test]
async fn http1_gets_a_clean_505_and_other_clients_keep_being_served() {
    timeout(LIMIT, async {
        let backend = Backend::start("b1").await;
        let app = agent().await;
        app.runtime()
            .apply(vec![pool("echo", &[backend.address()]).build()])
            .unwrap();
        let mut tcp = TcpStream::connect(app.proxy_addr()).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nhost: echo\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 505 "), "{answer}");
        assert!(answer.contains("h2c"), "{answer}");
        still_served(&app).await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn non_grpc_content_types_and_methods_get_http_errors() {
    timeout(LIMIT, async {
        let backend = Backend::start("b1").await;
        let app = agent().await;
        app.runtime()
            .apply(vec![pool("echo", &[backend.address()]).build()])
            .unwrap();
        let json = raw_call(
            app.proxy_addr(),
            "POST",
            "http://echo/x",
            &[("content-type", "application/json")],
            Bytes::from_static(b"{}"),
        )
        .await
        .unwrap();
        assert_eq!(json.status, http::StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert!(String::from_utf8_lossy(&json.body).contains("application/json"));
        let get = raw_call(app.proxy_addr(), "GET", "http://echo/x", &[], Bytes::new())
            .await
            .unwrap();
        assert_eq!(get.status, http::StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(backend.accepts(), 0);
        still_served(&app).await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn malformed_http2_ends_only_that_connection() {
    timeout(LIMIT, async {
        let backend = Backend::start("b1").await;
        let app = agent().await;
        app.runtime()
            .apply(vec![pool("echo", &[backend.address()]).build()])
            .unwrap();
        // A long-lived healthy stream on its own connection.
        let mut healthy = Client::connect(app.proxy_addr(), "echo").await;
        let mut held = healthy
            .hold(request(Bytes::from_static(b"alive"), &[]))
            .await
            .unwrap()
            .into_inner();
        held.message().await.unwrap().unwrap();

        // The preface, then a DATA frame on stream 0: a connection error.
        let mut tcp = TcpStream::connect(app.proxy_addr()).await.unwrap();
        tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap(); // empty SETTINGS
        tcp.write_all(&[0, 0, 1, 0, 0, 0, 0, 0, 0, 0xAA])
            .await
            .unwrap(); // DATA on stream 0
        let mut answer = Vec::new();
        let _ = tcp.read_to_end(&mut answer).await;
        // The server's frames end with a GOAWAY (type 7) and the connection
        // closes.
        assert!(
            answer.windows(4).any(|w| w[3] == 7),
            "no GOAWAY in {answer:?}"
        );

        // A preface of garbage: closed without a word.
        let mut tcp = TcpStream::connect(app.proxy_addr()).await.unwrap();
        tcp.write_all(b"\x16\x03\x01\x02\x00garbage-garbage-garbage")
            .await
            .unwrap();
        let mut rest = Vec::new();
        let _ = tcp.read_to_end(&mut rest).await;
        assert!(rest.is_empty());

        // The healthy stream and new clients are unaffected.
        still_served(&app).await;
        drop(held);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_dedicated_listen_port_serves_its_pool_whatever_the_authority() {
    timeout(LIMIT, async {
        let one = Backend::start("one").await;
        let two = Backend::start("two").await;
        let app = agent().await;
        let port = free_port();
        app.runtime()
            .apply(vec![
                pool("one", &[one.address()]).listen_port(port).build(),
                pool("two", &[two.address()]).build(),
            ])
            .unwrap();
        let dedicated: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut client = Client::connect(dedicated, "two").await;
        let response = client
            .unary(request(Bytes::from_static(b"x"), &[]))
            .await
            .unwrap();
        assert_eq!(backend_of(response.metadata()), "one");

        // Removing the pool closes its listener.
        app.runtime()
            .apply(vec![pool("two", &[two.address()]).build()])
            .unwrap();
        assert!(
            eventually(Duration::from_secs(3), || std::net::TcpStream::connect(
                dedicated
            )
            .is_err())
            .await,
            "the removed pool's listener still accepts"
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_bad_configuration_changes_nothing() {
    timeout(LIMIT, async {
        let backend = Backend::start("b1").await;
        let app = agent().await;
        let good = pool("echo", &[backend.address()]).build();
        app.runtime().apply(vec![good.clone()]).unwrap();

        let port = free_port();
        let cases = [
            (vec![good.clone(), good.clone()], "listed twice"),
            (
                vec![
                    good.clone(),
                    pool("other", &[backend.address()])
                        .size(2)
                        .max_idle(3)
                        .build(),
                ],
                "spec.maxIdle",
            ),
            (
                vec![
                    pool("a", &[backend.address()]).listen_port(port).build(),
                    pool("b", &[backend.address()]).listen_port(port).build(),
                ],
                "already used",
            ),
            (
                vec![
                    pool("a", &[backend.address()])
                        .listen_port(app.proxy_addr().port())
                        .build(),
                ],
                "shared listener",
            ),
            (
                vec![pool("a", &["not an address".to_owned()]).build()],
                "host:port",
            ),
        ];
        for (pools, expected) in cases {
            let err = app.runtime().apply(pools).unwrap_err().to_string();
            assert!(err.contains(expected), "{err} lacks {expected}");
            still_served(&app).await;
            assert_eq!(app.runtime().report().len(), 1);
        }
        // A port someone else holds: refused, naming port and pool.
        let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = squatter.local_addr().unwrap().port();
        let err = app
            .runtime()
            .apply(vec![
                good.clone(),
                pool("a", &[backend.address()]).listen_port(taken).build(),
            ])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&taken.to_string()) && err.contains("default/a"),
            "{err}"
        );
        still_served(&app).await;
    })
    .await
    .unwrap();
}
