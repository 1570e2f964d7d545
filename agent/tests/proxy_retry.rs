//! Streams that provably never reached a backend are sent again, and
//! nothing else is: real tonic clients through the agent, against backends
//! that refuse streams (RST_STREAM REFUSED_STREAM from the `h2` crate's
//! server), that send GOAWAY with a last stream id below or at the stream
//! (written frame by frame: no server library lets a test choose it), and
//! closed ports. Each backend counts the streams it saw, so "not retried"
//! is proven on the server side; `tidepool_proxy_retries_total` counts the
//! retries.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::Reason;
use tidepool_agent::app::App;
use tidepool_testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::{Instant, timeout};
use tonic::Code;

const LIMIT: Duration = Duration::from_secs(20);

/// What a scripted backend does with one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    /// Reads the request and echoes its body (the gRPC frames as they came)
    /// with status OK.
    Serve,
    /// RST_STREAM with this code at once, reading nothing.
    Reset(Reason),
    /// Reads the whole request body, then RST_STREAM with this code.
    ResetAfterBody(Reason),
    /// Sends response headers, then RST_STREAM with this code.
    ResetAfterHeaders(Reason),
    /// Waits this long, then RST_STREAM REFUSED_STREAM.
    RefuseAfter(Duration),
    /// Reads the whole request body, then drops the connection without a
    /// word: the stream was processed and then failed.
    Vanish,
    /// On a connection of its own written frame by frame: a GOAWAY whose
    /// last stream id is the stream's (`processed`) or below it, then the
    /// connection closes.
    GoAway { processed: bool },
}

/// One stream as the backend saw it.
#[derive(Debug, Clone)]
struct Seen {
    act: Act,
    /// The `grpc-timeout` it carried.
    timeout: Option<String>,
    /// The request body bytes read (for the acts that read it).
    body: usize,
    /// The `x-end` request trailer, when it read one.
    trailer: Option<String>,
}

/// A backend that plays `script`, one act per stream in arrival order (the
/// last act repeats), and records every stream it saw.
#[derive(Clone)]
struct Scripted {
    addr: String,
    script: Arc<Vec<Act>>,
    next: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Scripted {
    async fn start(script: &[Act]) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend = Scripted {
            addr: listener.local_addr().unwrap().to_string(),
            script: Arc::new(script.to_vec()),
            next: Arc::default(),
            seen: Arc::default(),
        };
        let server = backend.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tcp.set_nodelay(true).unwrap();
                let server = server.clone();
                // A GOAWAY act needs the connection to itself, decided
                // before any frame: the tests send one stream at a time.
                tokio::spawn(async move {
                    match server.peek() {
                        Act::GoAway { processed } => server.go_away(tcp, processed).await,
                        _ => server.serve(tcp).await,
                    }
                });
            }
        });
        backend
    }

    fn peek(&self) -> Act {
        let n = self.next.load(Ordering::SeqCst).min(self.script.len() - 1);
        self.script[n]
    }

    fn take(&self) -> Act {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        self.script[n.min(self.script.len() - 1)]
    }

    fn record(
        &self,
        act: Act,
        headers: &http::HeaderMap,
        (body, trailer): (usize, Option<String>),
    ) {
        let timeout = headers
            .get("grpc-timeout")
            .map(|v| v.to_str().unwrap().to_owned());
        self.seen.lock().unwrap().push(Seen {
            act,
            timeout,
            body,
            trailer,
        });
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Serves one connection with the `h2` crate.
    async fn serve(self, tcp: TcpStream) {
        let Ok(mut conn) = h2::server::handshake(tcp).await else {
            return;
        };
        let vanish = Arc::new(Notify::new());
        loop {
            let accepted = tokio::select! {
                accepted = conn.accept() => accepted,
                () = vanish.notified() => return,
            };
            let Some(Ok((request, respond))) = accepted else {
                return;
            };
            let act = self.take();
            let this = self.clone();
            let vanish = vanish.clone();
            tokio::spawn(async move { this.play(act, request, respond, &vanish).await });
        }
    }

    async fn play(
        &self,
        act: Act,
        request: http::Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
        vanish: &Notify,
    ) {
        let (parts, mut recv) = request.into_parts();
        match act {
            Act::Serve => {
                let (body, trailer) = read_body(&mut recv).await;
                self.record(act, &parts.headers, (body.len(), trailer));
                let response = http::Response::builder()
                    .header("content-type", "application/grpc")
                    .body(())
                    .unwrap();
                let mut send = respond.send_response(response, false).unwrap();
                send.send_data(body, false).unwrap();
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", "0".parse().unwrap());
                send.send_trailers(trailers).unwrap();
            }
            Act::Reset(reason) => {
                self.record(act, &parts.headers, (0, None));
                respond.send_reset(reason);
            }
            Act::ResetAfterBody(reason) => {
                let (body, trailer) = read_body(&mut recv).await;
                self.record(act, &parts.headers, (body.len(), trailer));
                respond.send_reset(reason);
            }
            Act::ResetAfterHeaders(reason) => {
                self.record(act, &parts.headers, (0, None));
                let response = http::Response::builder()
                    .header("content-type", "application/grpc")
                    .body(())
                    .unwrap();
                let mut send = respond.send_response(response, false).unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
                send.send_reset(reason);
            }
            Act::RefuseAfter(wait) => {
                self.record(act, &parts.headers, (0, None));
                tokio::time::sleep(wait).await;
                respond.send_reset(Reason::REFUSED_STREAM);
            }
            Act::Vanish => {
                let (body, trailer) = read_body(&mut recv).await;
                self.record(act, &parts.headers, (body.len(), trailer));
                vanish.notify_one();
            }
            Act::GoAway { .. } => unreachable!("played by go_away"),
        }
    }

    /// One connection spoken frame by frame: SETTINGS, PING and SETTINGS
    /// acknowledged, and the first HEADERS answered with a GOAWAY.
    async fn go_away(self, mut tcp: TcpStream, processed: bool) {
        const HEADERS: u8 = 1;
        const SETTINGS: u8 = 4;
        const PING: u8 = 6;
        const GOAWAY: u8 = 7;
        const ACK: u8 = 1;
        tcp.write_all(&h2_frame(SETTINGS, 0, 0, &[])).await.unwrap();
        let mut preface = [0u8; 24];
        if tcp.read_exact(&mut preface).await.is_err() {
            return;
        }
        loop {
            let mut head = [0u8; 9];
            if tcp.read_exact(&mut head).await.is_err() {
                return;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            if tcp.read_exact(&mut payload).await.is_err() {
                return;
            }
            match kind {
                SETTINGS if flags & ACK == 0 => {
                    tcp.write_all(&h2_frame(SETTINGS, ACK, 0, &[]))
                        .await
                        .unwrap();
                }
                PING if flags & ACK == 0 => {
                    tcp.write_all(&h2_frame(PING, ACK, 0, &payload))
                        .await
                        .unwrap();
                }
                HEADERS => {
                    self.take();
                    self.record(
                        Act::GoAway { processed },
                        &http::HeaderMap::new(),
                        (0, None),
                    );
                    let last = if processed {
                        stream
                    } else {
                        stream.saturating_sub(2)
                    };
                    let mut goaway = last.to_be_bytes().to_vec();
                    goaway.extend_from_slice(&0u32.to_be_bytes()); // NO_ERROR
                    tcp.write_all(&h2_frame(GOAWAY, 0, 0, &goaway))
                        .await
                        .unwrap();
                    // A graceful server would finish the streams at or below
                    // `last`; this one dies instead, a moment later.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    return;
                }
                _ => {}
            }
        }
    }
}

/// Reads a request to its end, releasing capacity as it goes: the body,
/// and the `x-end` request trailer if trailers came.
async fn read_body(recv: &mut h2::RecvStream) -> (Bytes, Option<String>) {
    let mut body = BytesMut::new();
    while let Some(Ok(chunk)) = recv.data().await {
        let _ = recv.flow_control().release_capacity(chunk.len());
        body.extend_from_slice(&chunk);
    }
    let trailer = match recv.trailers().await {
        Ok(Some(trailers)) => trailers
            .get("x-end")
            .map(|v| v.to_str().unwrap().to_owned()),
        _ => None,
    };
    (body.freeze(), trailer)
}

/// An HTTP/2 frame: 24-bit length, type, flags, stream id, payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = u32::try_from(payload.len()).unwrap().to_be_bytes()[1..].to_vec();
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A backend playing `script` and an agent whose pool `default/echo` has
/// it as its only address.
async fn scripted(script: &[Act]) -> (Scripted, App) {
    let backend = Scripted::start(script).await;
    let app = agent_over(std::slice::from_ref(&backend.addr)).await;
    (backend, app)
}

/// An agent running one pool, `default/echo`, over `addresses`.
async fn agent_over(addresses: &[String]) -> App {
    let app = agent().await;
    app.runtime()
        .apply(vec![pool("echo", addresses).build()])
        .unwrap();
    app
}

/// `tidepool_proxy_retries_total` of `default/echo` for `reason`.
async fn retries(app: &App, reason: &str) -> u64 {
    let (_, metrics) = http_get(app.admin_addr(), "/metrics").await;
    let series =
        format!("tidepool_proxy_retries_total{{pool=\"default/echo\",reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&series))
        .unwrap_or_else(|| panic!("no {series:?} in\n{metrics}"))
        .parse()
        .unwrap()
}

async fn all_retries(app: &App) -> u64 {
    let mut total = 0;
    for reason in [
        "refused_stream",
        "goaway",
        "connect_refused",
        "connect_failed",
        "closed",
    ] {
        total += retries(app, reason).await;
    }
    total
}

async fn unary(app: &App, message: Bytes) -> Result<Bytes, tonic::Status> {
    let mut client = Client::connect(app.proxy_addr(), "echo").await;
    client
        .unary(request(message, &[]))
        .await
        .map(|r| r.into_inner())
}

fn acts(backend: &Scripted) -> Vec<Act> {
    backend.seen().into_iter().map(|s| s.act).collect()
}

#[tokio::test]
async fn a_refused_stream_is_sent_again_and_counted() {
    timeout(LIMIT, async {
        let (backend, app) = scripted(&[Act::Reset(Reason::REFUSED_STREAM), Act::Serve]).await;
        let answer = unary(&app, Bytes::from_static(b"hello")).await.unwrap();
        assert_eq!(answer.as_ref(), b"hello");
        assert_eq!(
            acts(&backend),
            [Act::Reset(Reason::REFUSED_STREAM), Act::Serve]
        );
        assert_eq!(retries(&app, "refused_stream").await, 1);
        assert_eq!(all_retries(&app).await, 1);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_large_body_refused_unread_is_sent_again_whole() {
    timeout(LIMIT, async {
        // The backend resets before reading: what went out is at most its
        // 64 KiB window, within the replay cap; the rest was still on its
        // way from the client and follows the replayed part.
        let (backend, app) = scripted(&[Act::Reset(Reason::REFUSED_STREAM), Act::Serve]).await;
        let message: Bytes = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let answer = unary(&app, message.clone()).await.unwrap();
        assert_eq!(answer, message, "the replayed body differs");
        let seen = backend.seen();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[1].body, message.len() + 5, "{seen:?}");
        assert_eq!(retries(&app, "refused_stream").await, 1);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_streamed_body_refused_after_it_was_read_is_replayed_in_order() {
    timeout(LIMIT, async {
        let (backend, app) =
            scripted(&[Act::ResetAfterBody(Reason::REFUSED_STREAM), Act::Serve]).await;
        let messages: Vec<Bytes> = (0..3u8).map(|i| Bytes::from(vec![i; 10_000])).collect();
        let mut client = Client::connect(app.proxy_addr(), "echo").await;
        let mut answers = client
            .bidi(tonic::Request::new(futures::stream::iter(messages.clone())))
            .await
            .unwrap()
            .into_inner();
        let mut got = Vec::new();
        while let Some(message) = answers.message().await.unwrap() {
            got.push(message);
        }
        assert_eq!(got, messages);
        let seen = backend.seen();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!(seen[0].body, 3 * 10_005);
        assert_eq!(seen[1].body, 3 * 10_005);
        assert_eq!(retries(&app, "refused_stream").await, 1);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn request_trailers_already_sent_are_sent_again_after_the_body() {
    timeout(LIMIT, async {
        // The backend reads the whole request, trailers included, before it
        // refuses: the agent had sent them, and sends them again.
        let (backend, app) =
            scripted(&[Act::ResetAfterBody(Reason::REFUSED_STREAM), Act::Serve]).await;
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-end", "the-end".parse().unwrap());
        let answer = raw_call_with_trailers(
            app.proxy_addr(),
            "POST",
            "http://echo/test.Echo/Unary",
            &[("content-type", "application/grpc"), ("te", "trailers")],
            grpc_frame(b"with trailers"),
            Some(trailers),
        )
        .await
        .unwrap();
        assert_eq!(answer.grpc_status().as_deref(), Some("0"), "{answer:?}");
        assert_eq!(answer.body, grpc_frame(b"with trailers"));
        let seen = backend.seen();
        assert_eq!(seen.len(), 2, "{seen:?}");
        for s in &seen {
            assert_eq!(s.trailer.as_deref(), Some("the-end"), "{seen:?}");
        }
        assert_eq!(retries(&app, "refused_stream").await, 1);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_body_beyond_the_replay_cap_is_not_sent_again() {
    timeout(LIMIT, async {
        let (backend, app) =
            scripted(&[Act::ResetAfterBody(Reason::REFUSED_STREAM), Act::Serve]).await;
        let status = unary(&app, Bytes::from(vec![7u8; 100_000]))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        let message = status.message();
        assert!(
            message.contains(&backend.addr)
                && message.contains("refused_stream")
                && message.contains("65536 bytes")
                && message.contains("not sent again"),
            "{message}"
        );
        assert_eq!(
            acts(&backend),
            [Act::ResetAfterBody(Reason::REFUSED_STREAM)]
        );
        assert_eq!(all_retries(&app).await, 0);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_stream_above_a_goaways_last_stream_id_is_sent_again() {
    timeout(LIMIT, async {
        let (backend, app) = scripted(&[Act::GoAway { processed: false }, Act::Serve]).await;
        let answer = unary(&app, Bytes::from_static(b"again")).await.unwrap();
        assert_eq!(answer.as_ref(), b"again");
        assert_eq!(
            acts(&backend),
            [Act::GoAway { processed: false }, Act::Serve]
        );
        assert_eq!(retries(&app, "goaway").await, 1);
        assert_eq!(all_retries(&app).await, 1);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_stream_a_goaway_counts_as_processed_is_not_sent_again() {
    timeout(LIMIT, async {
        // The GOAWAY names the stream itself as processed; the connection
        // then dies under it (h2 reports a broken pipe): it may have run.
        let (backend, app) = scripted(&[Act::GoAway { processed: true }, Act::Serve]).await;
        let status = unary(&app, Bytes::from_static(b"once")).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains(&backend.addr), "{status:?}");
        assert_eq!(acts(&backend), [Act::GoAway { processed: true }]);
        assert_eq!(all_retries(&app).await, 0);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn other_resets_and_failures_after_processing_are_not_sent_again() {
    timeout(LIMIT, async {
        let cases = [
            Act::Reset(Reason::INTERNAL_ERROR),
            Act::Reset(Reason::CANCEL),
            Act::ResetAfterBody(Reason::INTERNAL_ERROR),
            // Headers reached the client: even a refusal is final then.
            Act::ResetAfterHeaders(Reason::REFUSED_STREAM),
            Act::ResetAfterHeaders(Reason::CANCEL),
            Act::Vanish,
        ];
        for act in cases {
            let (backend, app) = scripted(&[act, Act::Serve]).await;
            let status = unary(&app, Bytes::from_static(b"once")).await.unwrap_err();
            assert_eq!(status.code(), Code::Unavailable, "{act:?}: {status:?}");
            assert!(
                status.message().contains(&backend.addr),
                "{act:?}: {status:?}"
            );
            assert_eq!(acts(&backend), [act], "{act:?} was sent again");
            assert_eq!(all_retries(&app).await, 0, "{act:?}");
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_refused_dial_is_retried_on_the_live_address_and_counted() {
    timeout(LIMIT, async {
        let live = Backend::start("live").await;
        let dead = format!("127.0.0.1:{}", free_port());
        let app = agent_over(&[dead.clone(), live.address()]).await;
        // The balancer picks one of two at random, and not an address in
        // dial backoff: call until the dead one has been dialed.
        let dial_failures = |app: &App| {
            app.runtime().report()[0]
                .addresses
                .iter()
                .filter(|a| a.address == dead)
                .map(|a| a.dial_failures)
                .sum::<u64>()
        };
        let mut calls = 0;
        while dial_failures(&app) == 0 {
            assert!(calls < 40, "the dead address was never picked");
            let answer = unary(&app, Bytes::from_static(b"x")).await.unwrap();
            assert_eq!(answer.as_ref(), b"x");
            calls += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        // Every refused dial was one retry, and every call succeeded.
        assert_eq!(retries(&app, "connect_refused").await, dial_failures(&app));
        assert_eq!(
            live.state.calls.load(Ordering::SeqCst),
            calls,
            "each call reached the live backend once"
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn when_every_attempt_is_refused_the_error_names_each_address_and_why() {
    timeout(LIMIT, async {
        let (a, b) = (
            format!("127.0.0.1:{}", free_port()),
            format!("127.0.0.1:{}", free_port()),
        );
        let app = agent_over(&[a.clone(), b.clone()]).await;
        let status = unary(&app, Bytes::from_static(b"x")).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        let message = status.message();
        assert!(
            message.contains(&format!("{a} (connect_refused)"))
                && message.contains(&format!("{b} (connect_refused)"))
                && message.contains("2 attempts"),
            "{message}"
        );
        assert_eq!(retries(&app, "connect_refused").await, 1);

        // A backend that refuses every stream: three attempts, then the
        // refusals are named.
        let refuser = Scripted::start(&[Act::Reset(Reason::REFUSED_STREAM)]).await;
        let app = agent_over(std::slice::from_ref(&refuser.addr)).await;
        let status = unary(&app, Bytes::from_static(b"x")).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        let named = format!("{} (refused_stream)", refuser.addr);
        assert_eq!(
            status.message().matches(&named).count(),
            3,
            "{}",
            status.message()
        );
        assert_eq!(backend_streams(&refuser), 3);
        assert_eq!(retries(&app, "refused_stream").await, 2);
    })
    .await
    .unwrap();
}

fn backend_streams(backend: &Scripted) -> usize {
    backend.seen().len()
}

#[tokio::test]
async fn a_retry_never_outlives_the_clients_deadline() {
    timeout(LIMIT, async {
        let wait = Duration::from_millis(300);
        let (backend, app) = scripted(&[Act::RefuseAfter(wait)]).await;
        // h2 directly: a tonic client would enforce the deadline itself.
        let started = Instant::now();
        let answer = raw_call(
            app.proxy_addr(),
            "POST",
            "http://echo/test.Echo/Unary",
            &[
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                ("grpc-timeout", "500m"),
            ],
            grpc_frame(b"x"),
        )
        .await
        .unwrap();
        let took = started.elapsed();
        assert_eq!(answer.grpc_status().as_deref(), Some("4"), "{answer:?}");
        assert!(answer.grpc_message().contains("deadline"), "{answer:?}");
        assert!(took < Duration::from_millis(900), "took {took:?}");
        // The first refusal came at 300 ms, the second would at 600 ms:
        // the deadline ended the second attempt, and no third began.
        let seen = backend.seen();
        assert_eq!(seen.len(), 2, "{seen:?}");
        let budget = |s: &Seen| {
            let t = s.timeout.as_deref().unwrap();
            let (n, unit) = t.split_at(t.len() - 1);
            let n: u64 = n.parse().unwrap();
            match unit {
                "n" => Duration::from_nanos(n),
                "u" => Duration::from_micros(n),
                "m" => Duration::from_millis(n),
                "S" => Duration::from_secs(n),
                other => panic!("unit {other}"),
            }
        };
        assert!(budget(&seen[0]) <= Duration::from_millis(500));
        assert!(
            budget(&seen[1]) <= Duration::from_millis(500) - wait,
            "the retry was given more than what was left: {seen:?}"
        );
        assert_eq!(retries(&app, "refused_stream").await, 1);
    })
    .await
    .unwrap();
}
