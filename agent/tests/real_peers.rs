//! The agent between gRPC stacks no one here wrote: grpc-go's interop
//! server and client, grpc-go's route_guide example server, and the ghz
//! load generator, all built from the Go module proxy by
//! `tests/peers/build.sh` (pinned in `tests/peers/go.mod`).
//!
//! The agent is the real binary in standalone mode. Every load runs twice in
//! the same test, direct and through the agent, with a fixed number of calls
//! (ghz `-n`, so ghz's own shutdown cancels nothing): through the agent,
//! every call must succeed that succeeds direct.
//!
//! `TIDEPOOL_PEERS_BIN` names the folder `tests/peers/build.sh` prints;
//! `make unit` sets it.

mod peers;

use std::time::Duration;

use peers::{Agent, Ghz, Peers, Proc, Run};

/// The pools the agent runs for these tests; `{RG}` and `{INTEROP}` are the
/// backends' ports, `{RG_PORT}`, `{BIG_PORT}` and `{INTEROP_PORT}` the
/// pools' own listeners.
const POOLS: &str = r#"
apiVersion: tidepool.dev/v1alpha1
kind: ConnectionPool
metadata: {name: rg, namespace: default}
spec:
  target: {addresses: ["127.0.0.1:{RG}"]}
  size: 100
  maxStreams: 100
  listenPort: {RG_PORT}
---
apiVersion: tidepool.dev/v1alpha1
kind: ConnectionPool
metadata: {name: big, namespace: default}
spec:
  target: {addresses: ["127.0.0.1:{RG}"]}
  size: 100
  maxStreams: 1000
  listenPort: {BIG_PORT}
---
apiVersion: tidepool.dev/v1alpha1
kind: ConnectionPool
metadata: {name: interop, namespace: default}
spec:
  target: {addresses: ["127.0.0.1:{INTEROP}"]}
  size: 10
  maxStreams: 100
  listenPort: {INTEROP_PORT}
"#;

struct Setup {
    peers: Peers,
    _route_guide: Proc,
    _interop: Proc,
    rg: u16,
    interop: u16,
    agent: Agent,
    rg_port: u16,
    big_port: u16,
    interop_port: u16,
}

fn setup() -> Setup {
    let peers = Peers::find();
    let rg = peers::free_port();
    let interop = peers::free_port();
    let route_guide = peers.start("route-guide-server", &["-port", &rg.to_string()], rg);
    let interop_server = peers.start("interop-server", &["-port", &interop.to_string()], interop);
    let (rg_port, big_port, interop_port) =
        (peers::free_port(), peers::free_port(), peers::free_port());
    let pools = POOLS
        .replace("{RG_PORT}", &rg_port.to_string())
        .replace("{BIG_PORT}", &big_port.to_string())
        .replace("{INTEROP_PORT}", &interop_port.to_string())
        .replace("{RG}", &rg.to_string())
        .replace("{INTEROP}", &interop.to_string());
    let agent = Agent::start(&pools, &[rg_port, big_port, interop_port]);
    Setup {
        peers,
        _route_guide: route_guide,
        _interop: interop_server,
        rg,
        interop,
        agent,
        rg_port,
        big_port,
        interop_port,
    }
}

/// Runs `ghz` direct to `direct` and through the agent's `via`, and checks
/// that no call fails through the agent that succeeds direct.
fn compare(s: &Setup, label: &str, ghz: &Ghz, direct: u16, via: u16) -> (Run, Run) {
    let d = ghz.run(&s.peers, direct);
    let a = ghz.run(&s.peers, via);
    eprintln!("{label}: direct {d}; agent {a}");
    assert!(
        d.count > 0 && a.count == d.count,
        "{label}: ghz made {} calls direct and {} through the agent",
        d.count,
        a.count
    );
    assert!(
        a.ok >= d.ok,
        "{label}: {} calls failed through the agent, {} direct: agent {a}, direct {d}",
        a.count - a.ok,
        d.count - d.ok
    );
    (d, a)
}

/// The defect this file was written for (issue 11): route_guide's streaming
/// calls through the agent failed 85–96% of the time (h2's small-frame
/// budget on both of the agent's sides), and unary at 256 streams 13–15%.
#[test]
fn route_guide_streaming_through_the_agent_fails_no_call_that_succeeds_direct() {
    let s = setup();
    let rect = r#"{"lo":{"latitude":400000000,"longitude":-750000000},"hi":{"latitude":420000000,"longitude":-730000000}}"#;
    // The server answers each note with every note it has at that location,
    // so replies grow call by call (the agent's run, second, gets more).
    let notes = r#"[{"location":{"latitude":1,"longitude":2},"message":"a"},{"location":{"latitude":1,"longitude":2},"message":"b"},{"location":{"latitude":1,"longitude":2},"message":"c"}]"#;
    let points: Vec<String> = (0..100)
        .map(|i| {
            format!(
                r#"{{"latitude":{},"longitude":{}}}"#,
                400_000_000 + i,
                -750_000_000 + i
            )
        })
        .collect();
    let points = format!("[{}]", points.join(","));
    let cases = [
        (
            "ListFeatures x16",
            "ListFeatures",
            rect.to_owned(),
            16,
            1600,
        ),
        (
            "ListFeatures x64",
            "ListFeatures",
            rect.to_owned(),
            64,
            2560,
        ),
        ("RouteChat x1", "RouteChat", notes.to_owned(), 1, 100),
        ("RecordRoute x64", "RecordRoute", points, 64, 1280),
    ];
    for (label, method, data, streams, calls) in cases {
        let ghz = Ghz::new(&format!("routeguide.RouteGuide.{method}"), &data)
            .streams(streams)
            .calls(calls);
        compare(&s, label, &ghz, s.rg, s.rg_port);
    }
    let unary = Ghz::new(
        "routeguide.RouteGuide.GetFeature",
        r#"{"latitude":409146138,"longitude":-746188906}"#,
    )
    .streams(256)
    .calls(10_240);
    compare(
        &s,
        "GetFeature x256 (maxStreams 1000)",
        &unary,
        s.rg,
        s.big_port,
    );

    // One connection per pool carried it all: nothing was torn down.
    let metrics = s.agent.metrics();
    for pool in ["default/rg", "default/big"] {
        let dialed = peers::metric(&metrics, "tidepool_pool_cx_total", &[pool]);
        assert!(
            (1.0..=2.0).contains(&dialed),
            "pool {pool} dialed {dialed} backend connections"
        );
        for reason in ["transport", "protocol", "closed"] {
            let destroyed = peers::metric(
                &metrics,
                "tidepool_pool_cx_destroy_total",
                &[pool, &format!("reason=\"{reason}\"")],
            );
            assert_eq!(
                destroyed, 0.0,
                "pool {pool} lost {destroyed} connections ({reason})"
            );
        }
    }
}

/// Every interop case grpc-go's client implements that needs no cloud
/// credentials or second server passes through the agent as it does direct.
#[test]
fn grpc_go_interop_cases_pass_through_the_agent() {
    let s = setup();
    let cases = [
        "empty_unary",
        "large_unary",
        "client_streaming",
        "server_streaming",
        "ping_pong",
        "empty_stream",
        "timeout_on_sleeping_server",
        "cancel_after_begin",
        "cancel_after_first_response",
        "status_code_and_message",
        "special_status_message",
        "custom_metadata",
        "unimplemented_method",
        "unimplemented_service",
    ];
    let mut failed = Vec::new();
    for case in cases {
        let direct = s.peers.interop_client(s.interop, case);
        assert!(direct.is_ok(), "{case} failed direct: {direct:?}");
        // cancel_after_begin races inside grpc-go's client: it cancels,
        // then CloseAndRecv sends END_STREAM, and when its cancellation
        // goroutine runs late (a starved CPU) the server's answer (OK, an
        // empty aggregate) arrives first. Seen once under a load average
        // of 8 on 2 cores; the agent sent what it was given. Up to three
        // tries for it alone: an agent that broke cancellation fails all.
        let tries = if case == "cancel_after_begin" { 3 } else { 1 };
        let mut last = Ok(());
        for _ in 0..tries {
            last = s.peers.interop_client(s.interop_port, case);
            if last.is_ok() {
                break;
            }
        }
        if let Err(output) = last {
            failed.push(format!("{case}: {output}"));
        }
    }
    assert!(
        failed.is_empty(),
        "interop cases failed through the agent:\n{}",
        failed.join("\n")
    );
}

/// All four RPC kinds of grpc-go's interop TestService, with small (16 B)
/// and large (1 MiB) messages, at 1, 16 and 64 concurrent streams.
#[test]
fn all_four_kinds_small_and_large_at_1_16_and_64_streams() {
    let s = setup();
    const MIB: usize = 1 << 20;
    for (size_label, size, messages) in [("16 B", 16, 20), ("1 MiB", MIB, 2)] {
        let body = peers::base64(&vec![0x5a; size]);
        let unary = format!(r#"{{"response_size":{size},"payload":{{"body":"{body}"}}}}"#);
        let params = vec![format!(r#"{{"size":{size}}}"#); messages].join(",");
        let server_stream = format!(r#"{{"response_parameters":[{params}]}}"#);
        let client_stream = format!(
            "[{}]",
            vec![format!(r#"{{"payload":{{"body":"{body}"}}}}"#); messages].join(",")
        );
        let bidi = format!(
            "[{}]",
            vec![
                format!(
                    r#"{{"response_parameters":[{{"size":{size}}}],"payload":{{"body":"{body}"}}}}"#
                );
                messages
            ]
            .join(",")
        );
        let kinds = [
            ("unary", "UnaryCall", unary),
            ("server-streaming", "StreamingOutputCall", server_stream),
            ("client-streaming", "StreamingInputCall", client_stream),
            ("bidirectional", "FullDuplexCall", bidi),
        ];
        for (kind, method, data) in &kinds {
            for streams in [1, 16, 64] {
                let calls = if size == MIB {
                    (streams * 2).max(8)
                } else {
                    (streams * 25).max(100)
                };
                let ghz = Ghz::new(&format!("grpc.testing.TestService.{method}"), data)
                    .streams(streams)
                    .calls(calls)
                    .timeout(Duration::from_secs(60));
                let label = format!("{kind} {size_label} x{streams}");
                let (direct, _) = compare(&s, &label, &ghz, s.interop, s.interop_port);
                assert_eq!(direct.ok, direct.count, "{label} failed direct: {direct}");
            }
        }
    }
    let metrics = s.agent.metrics();
    for reason in ["transport", "protocol"] {
        let destroyed = peers::metric(
            &metrics,
            "tidepool_pool_cx_destroy_total",
            &["default/interop", &format!("reason=\"{reason}\"")],
        );
        assert_eq!(
            destroyed, 0.0,
            "the interop pool lost connections ({reason})"
        );
    }
}

/// A closed port beside grpc-go's interop server in one pool: grpc-go's
/// client and ghz see every call succeed, because a dial refused before
/// anything was sent is retried on the live address; the retries are
/// counted.
#[test]
fn a_closed_port_beside_a_live_server_costs_grpc_go_no_call() {
    let peers = Peers::find();
    let interop = peers::free_port();
    let _server = peers.start("interop-server", &["-port", &interop.to_string()], interop);
    let (closed, listen) = (peers::free_port(), peers::free_port());
    let pools = format!(
        r#"
apiVersion: tidepool.dev/v1alpha1
kind: ConnectionPool
metadata: {{name: halfdead, namespace: default}}
spec:
  target: {{addresses: ["127.0.0.1:{closed}", "127.0.0.1:{interop}"]}}
  size: 10
  maxStreams: 100
  listenPort: {listen}
"#
    );
    let agent = Agent::start(&pools, &[listen]);
    for case in [
        "empty_unary",
        "large_unary",
        "client_streaming",
        "ping_pong",
    ] {
        if let Err(output) = peers.interop_client(listen, case) {
            panic!("{case} failed through the agent: {output}");
        }
    }
    // 16 streams at once: the balancer picks the closed port for some of
    // them (and again each time its dial backoff ends).
    let run = Ghz::new(
        "grpc.testing.TestService.UnaryCall",
        r#"{"response_size":16}"#,
    )
    .streams(16)
    .calls(800)
    .run(&peers, listen);
    assert!(
        run.count == 800 && run.ok == run.count,
        "calls failed: {run}"
    );
    let metrics = agent.metrics();
    let closed = format!("127.0.0.1:{closed}");
    let refused = peers::metric(
        &metrics,
        "tidepool_pool_cx_connect_fail_total",
        &["default/halfdead", &closed],
    );
    let retried = peers::metric(
        &metrics,
        "tidepool_proxy_retries_total",
        &["default/halfdead", "reason=\"connect_refused\""],
    );
    eprintln!("closed port: {refused} refused dials, {retried} streams retried");
    // Every caller waiting on a refused dial is retried, so at least one
    // retry per refused dial.
    assert!(refused >= 1.0, "the closed port was never dialed");
    assert!(
        retried >= refused,
        "{retried} retries for {refused} refused dials"
    );
}
