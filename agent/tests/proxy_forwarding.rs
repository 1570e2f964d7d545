//! Transparent forwarding through the agent, with real sockets: tonic
//! backends and clients, every RPC kind, metadata, trailers, errors with
//! details, deadlines, cancellation, large and compressed messages, flow
//! control and long-lived streams.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tidepool_testkit::*;
use tokio::time::timeout;
use tonic::Code;
use tonic::metadata::MetadataValue;

const LIMIT: Duration = Duration::from_secs(20);

/// An agent with one static pool `echo` over one backend, and a client
/// that names the pool in its authority.
async fn setup() -> (tidepool_agent::app::App, Backend, Client) {
    let backend = Backend::start("b1").await;
    let app = agent().await;
    app.runtime()
        .apply(vec![
            pool("echo", &[backend.address()])
                .size(4)
                .max_streams(100)
                .build(),
        ])
        .unwrap();
    let client = Client::connect(app.proxy_addr(), "echo.default:50051").await;
    (app, backend, client)
}

#[tokio::test]
async fn unary_headers_binary_metadata_and_message_pass_unchanged() {
    timeout(LIMIT, async {
        let (app, backend, mut client) = setup().await;
        let mut req = request(
            Bytes::from_static(b"hello \x00\xff"),
            &[("x-echo-plain", "value 1")],
        );
        req.metadata_mut().insert_bin(
            "x-echo-data-bin",
            MetadataValue::from_bytes(&[0, 159, 146, 150, 255]),
        );
        let response = client.unary(req).await.unwrap();
        assert_eq!(response.get_ref().as_ref(), b"hello \x00\xff");
        let md = response.metadata();
        assert_eq!(md.get("x-echo-plain").unwrap(), "value 1");
        assert_eq!(
            md.get_bin("x-echo-data-bin")
                .unwrap()
                .to_bytes()
                .unwrap()
                .as_ref(),
            &[0, 159, 146, 150, 255]
        );
        assert_eq!(backend_of(md), "b1");
        assert_eq!(backend.state.calls.load(Ordering::SeqCst), 1);
        // The stream is released once the response has ended.
        assert!(streams_released(&app, &backend.address(), Duration::from_secs(2)).await);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn server_streaming_forwards_every_message_and_the_trailers() {
    timeout(LIMIT, async {
        let (_app, _backend, mut client) = setup().await;
        let response = client
            .server_stream(request(
                Bytes::from_static(b"tick"),
                &[("x-count", "5"), ("x-interval-ms", "10")],
            ))
            .await
            .unwrap();
        let mut stream = response.into_inner();
        let mut got = Vec::new();
        while let Some(message) = stream.message().await.unwrap() {
            got.push(message);
        }
        assert_eq!(got, vec![Bytes::from_static(b"tick"); 5]);
        let trailers = stream.trailers().await.unwrap().unwrap();
        assert_eq!(trailers.get("x-trailer").unwrap(), "done");
        assert_eq!(
            trailers
                .get_bin("x-trailer-bin")
                .unwrap()
                .to_bytes()
                .unwrap()
                .as_ref(),
            &[0, 1, 2, 255]
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn client_streaming_forwards_every_message() {
    timeout(LIMIT, async {
        let (_app, _backend, mut client) = setup().await;
        let parts: Vec<Bytes> = (0..50u8)
            .map(|i| Bytes::from(vec![i; 1000 + usize::from(i)]))
            .collect();
        let expected: Vec<u8> = parts.iter().flat_map(|p| p.to_vec()).collect();
        let response = client
            .client_stream(tonic::Request::new(futures::stream::iter(parts)))
            .await
            .unwrap();
        assert_eq!(response.get_ref().as_ref(), expected.as_slice());
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn bidirectional_streaming_echoes_in_lockstep() {
    timeout(LIMIT, async {
        let (_app, _backend, mut client) = setup().await;
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        let response = client
            .bidi(tonic::Request::new(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            ))
            .await
            .unwrap();
        let mut stream = response.into_inner();
        // Each answer arrives before the next message is sent: nothing waits
        // for the end of the request.
        for i in 0..20u32 {
            let message = Bytes::from(format!("ping {i}"));
            tx.send(message.clone()).await.unwrap();
            assert_eq!(stream.message().await.unwrap().unwrap(), message);
        }
        drop(tx);
        assert!(stream.message().await.unwrap().is_none());
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn error_status_message_details_and_metadata_pass_unchanged() {
    timeout(LIMIT, async {
        let (app, backend, mut client) = setup().await;
        let details = [8u8, 0, 1, 2, 254, 255, 10, 3];
        let mut req = request(
            Bytes::from_static(b"x"),
            &[
                ("x-fail-code", "5"),
                ("x-fail-message", "no such thing: 100% gone"),
                ("x-echo-why", "because"),
            ],
        );
        req.metadata_mut()
            .insert_bin("x-fail-details-bin", MetadataValue::from_bytes(&details));
        let status = client.unary(req).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(status.message(), "no such thing: 100% gone ✓");
        assert_eq!(status.details(), &details);
        assert_eq!(status.metadata().get("x-echo-why").unwrap(), "because");
        // An application error is a normal completion: the connection stays.
        assert!(
            eventually(Duration::from_secs(2), || occupancy(
                &app,
                &backend.address()
            ) == (0, 1))
            .await
        );
        let ok = client
            .unary(request(Bytes::from_static(b"again"), &[]))
            .await
            .unwrap();
        assert_eq!(ok.get_ref().as_ref(), b"again");
        assert_eq!(backend.accepts(), 1);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn messages_of_4_mib_and_more_pass_both_ways() {
    timeout(LIMIT, async {
        let (_app, _backend, mut client) = setup().await;
        let big: Bytes = (0..(6 << 20))
            .map(|i: u32| (i % 251) as u8)
            .collect::<Vec<u8>>()
            .into();
        let response = client.unary(request(big.clone(), &[])).await.unwrap();
        assert_eq!(response.get_ref().len(), big.len());
        assert!(response.get_ref() == &big);
        // Two 4 MiB messages streamed up, one 8 MiB answer down.
        let four: Bytes = vec![7u8; 4 << 20].into();
        let response = client
            .client_stream(tonic::Request::new(futures::stream::iter(vec![
                four.clone(),
                four.clone(),
            ])))
            .await
            .unwrap();
        assert_eq!(response.get_ref().len(), 8 << 20);
        assert!(response.get_ref().iter().all(|b| *b == 7));
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn compressed_messages_pass_unchanged() {
    timeout(LIMIT, async {
        let (_app, _backend, client) = setup().await;
        let mut client = client.gzip();
        let text: Bytes = "compress me ".repeat(100_000).into();
        let response = client
            .server_stream(request(text.clone(), &[("x-count", "2")]))
            .await
            .unwrap();
        assert_eq!(response.metadata().get("grpc-encoding").unwrap(), "gzip");
        let mut stream = response.into_inner();
        assert_eq!(stream.message().await.unwrap().unwrap(), text);
        assert_eq!(stream.message().await.unwrap().unwrap(), text);
        assert!(stream.message().await.unwrap().is_none());
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn grpc_timeout_is_honoured_and_the_backend_gets_what_is_left() {
    timeout(LIMIT, async {
        let (_app, backend, mut client) = setup().await;
        // The backend sees a budget no larger than the client's.
        let mut req = request(Bytes::from_static(b"x"), &[]);
        req.set_timeout(Duration::from_secs(5));
        let response = client.unary(req).await.unwrap();
        let seen = response
            .metadata()
            .get("x-seen-grpc-timeout")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        let seen =
            tidepool_agent::proxy::forward::parse_grpc_timeout(&seen.parse().unwrap()).unwrap();
        assert!(
            seen <= Duration::from_secs(5) && seen > Duration::from_secs(4),
            "{seen:?}"
        );

        // A slow handler past the deadline, called by a client that does
        // not enforce deadlines itself: the agent answers DEADLINE_EXCEEDED
        // on time and cancels the backend's handler.
        let started = tokio::time::Instant::now();
        let response = raw_call(
            _app.proxy_addr(),
            "POST",
            &format!("http://echo/{SERVICE}/Unary"),
            &[
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                ("grpc-timeout", "300m"),
                ("x-sleep-ms", "10000"),
            ],
            grpc_frame(b"x"),
        )
        .await
        .unwrap();
        assert_eq!(response.grpc_status().as_deref(), Some("4"), "{response:?}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(290) && took < Duration::from_secs(3),
            "{took:?}"
        );
        assert!(
            eventually(Duration::from_secs(3), || backend
                .state
                .cancelled
                .load(Ordering::SeqCst)
                >= 1)
            .await
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_cancelled_client_cancels_the_backend_stream() {
    timeout(LIMIT, async {
        let (app, backend, mut client) = setup().await;
        let response = client
            .hold(request(Bytes::from_static(b"first"), &[]))
            .await
            .unwrap();
        let mut stream = response.into_inner();
        assert_eq!(stream.message().await.unwrap().unwrap().as_ref(), b"first");
        assert_eq!(backend.state.holding.load(Ordering::SeqCst), 1);
        assert_eq!(occupancy(&app, &backend.address()).0, 1);
        drop(stream);
        assert!(
            eventually(Duration::from_secs(3), || backend
                .state
                .holding
                .load(Ordering::SeqCst)
                == 0)
            .await,
            "the backend stream outlived the client's"
        );
        assert!(backend.state.cancelled.load(Ordering::SeqCst) >= 1);
        assert!(streams_released(&app, &backend.address(), Duration::from_secs(3)).await);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn at_the_drain_deadline_open_streams_end_with_unavailable_the_client_retries() {
    timeout(LIMIT, async {
        let (app, backend, mut client) = setup().await;
        let response = client
            .hold(request(Bytes::from_static(b"first"), &[]))
            .await
            .unwrap();
        let mut stream = response.into_inner();
        assert_eq!(stream.message().await.unwrap().unwrap().as_ref(), b"first");
        let left = app.shutdown(Duration::from_millis(300)).await;
        assert!(left >= 1, "the held stream was open at the deadline");
        let status = stream.message().await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(
            status.message().contains("shutting down") && status.message().contains("retry"),
            "{status:?}"
        );
        // The backend's stream was cancelled, not left running.
        assert!(
            eventually(Duration::from_secs(3), || backend
                .state
                .holding
                .load(Ordering::SeqCst)
                == 0)
            .await,
            "the backend stream outlived the cut"
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_reset_backend_fails_the_client_stream() {
    timeout(LIMIT, async {
        let (_app, backend, mut client) = setup().await;
        let response = client
            .hold(request(Bytes::from_static(b"first"), &[]))
            .await
            .unwrap();
        let mut stream = response.into_inner();
        assert_eq!(stream.message().await.unwrap().unwrap().as_ref(), b"first");
        backend.kill();
        let status = stream.message().await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains(&backend.address()), "{status:?}");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn flow_control_holds_a_fast_backend_to_a_slow_client() {
    timeout(LIMIT, async {
        let (_app, backend, mut client) = setup().await;
        // 256 messages of 256 KiB = 64 MiB if nothing pushed back.
        let chunk: Bytes = vec![1u8; 256 << 10].into();
        let response = client
            .server_stream(request(chunk, &[("x-count", "256")]))
            .await
            .unwrap();
        let mut stream = response.into_inner();
        stream.message().await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        let produced = backend.state.produced.load(Ordering::SeqCst);
        // Windows and send buffers on three hops hold a few MiB; the agent
        // must not have soaked up the rest.
        assert!(
            produced < 24 << 20,
            "the backend produced {} MiB for a stalled client",
            produced >> 20
        );
        // Reading on drains everything in order.
        let mut count = 1;
        while let Some(message) = stream.message().await.unwrap() {
            assert_eq!(message.len(), 256 << 10);
            count += 1;
        }
        assert_eq!(count, 256);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_long_lived_stream_outlives_the_connection_ttl() {
    timeout(LIMIT, async {
        let backend = Backend::start("b1").await;
        let app = agent().await;
        app.runtime()
            .apply(vec![pool("echo", &[backend.address()]).ttl("1s").build()])
            .unwrap();
        let mut client = Client::connect(app.proxy_addr(), "echo").await;
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        let response = client
            .bidi(tonic::Request::new(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            ))
            .await
            .unwrap();
        let mut stream = response.into_inner();
        let started = tokio::time::Instant::now();
        let mut i = 0;
        while started.elapsed() < Duration::from_millis(2500) {
            let message = Bytes::from(format!("{i}"));
            tx.send(message.clone()).await.unwrap();
            assert_eq!(stream.message().await.unwrap().unwrap(), message);
            tokio::time::sleep(Duration::from_millis(100)).await;
            i += 1;
        }
        drop(tx);
        assert!(stream.message().await.unwrap().is_none());
        assert!(i >= 20);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn any_grpc_path_is_forwarded_and_the_backend_answers_it() {
    timeout(LIMIT, async {
        let (app, backend, _client) = setup().await;
        let response = raw_call(
            app.proxy_addr(),
            "POST",
            &format!("http://echo/{SERVICE}/Nope"),
            &[
                ("content-type", "application/grpc+proto"),
                ("te", "trailers"),
            ],
            grpc_frame(b""),
        )
        .await
        .unwrap();
        // The backend's UNIMPLEMENTED, not the agent's: it names the path.
        assert_eq!(response.grpc_status().as_deref(), Some("12"));
        assert!(response.grpc_message().contains("Nope"), "{response:?}");
        assert_eq!(backend.state.calls.load(Ordering::SeqCst), 1);
    })
    .await
    .unwrap();
}
