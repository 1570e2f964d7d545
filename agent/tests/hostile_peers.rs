//! Peers that break HTTP/2's rules or abuse its limits, written frame by
//! frame: the agent must close the offending connection cleanly (GOAWAY with
//! the right code, counted), keep its memory bounded, and keep serving
//! everyone else.
//!
//! The well-behaved traffic beside them is grpc-go's route_guide server and
//! ghz (`tests/peers/build.sh`, `TIDEPOOL_PEERS_BIN`).
#![allow(clippy::disallowed_types)] // std::time::Instant: deadlines in plain threads, outside any tokio runtime.

mod peers;

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use peers::{Agent, Ghz, Peers, Proc};

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const ENHANCE_YOUR_CALM: u32 = 0xb;
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK header block of literal fields without indexing.
fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        assert!(name.len() < 127 && value.len() < 127);
        out.push(0x00);
        out.push(u8::try_from(name.len()).unwrap());
        out.extend_from_slice(name.as_bytes());
        out.push(u8::try_from(value.len()).unwrap());
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// A gRPC request's HEADERS frame on `stream`, not ending it.
fn request_headers(stream: u32, authority: &str) -> Vec<u8> {
    let block = header_block(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/routeguide.RouteGuide/RecordRoute"),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]);
    frame(HEADERS, END_HEADERS, stream, &block)
}

/// Reads frames until a GOAWAY arrives (its error code) or `timeout`
/// passes or the connection ends (`None`).
fn read_goaway(tcp: &mut TcpStream, timeout: Duration) -> Option<u32> {
    tcp.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    while Instant::now() < deadline {
        match tcp.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
        let mut at = 0;
        while buf.len() >= at + 9 {
            let len = usize::from(buf[at]) << 16
                | usize::from(buf[at + 1]) << 8
                | usize::from(buf[at + 2]);
            if buf.len() < at + 9 + len {
                break;
            }
            if buf[at + 3] == GOAWAY {
                let p = &buf[at + 9..at + 9 + len];
                return Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
            }
            at += 9 + len;
        }
    }
    // The connection may have ended right after the GOAWAY was parsed above;
    // look once more at what arrived.
    None
}

/// A client connection to the agent that has sent its preface and
/// SETTINGS.
fn hostile_client(port: u16) -> TcpStream {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp.write_all(PREFACE).unwrap();
    tcp.write_all(&frame(SETTINGS, 0, 0, &[])).unwrap();
    tcp
}

/// How the raw backend answers a stream's HEADERS.
#[derive(Clone, Copy)]
enum Backend {
    /// Never answers, never reads: no WINDOW_UPDATE, ever.
    Silent,
    /// Answers with response headers, then floods empty DATA frames.
    FloodEmptyData,
}

/// A raw HTTP/2 backend on a thread of its own: it does the handshake and
/// answers PINGs (so the agent's pool takes the connection), then behaves
/// as `mode` says. Counts the connections it accepted.
fn raw_backend(mode: Backend) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { return };
            count.fetch_add(1, Ordering::SeqCst);
            thread::spawn(move || serve_raw(tcp, mode));
        }
    });
    (port, accepted)
}

fn serve_raw(mut tcp: TcpStream, mode: Backend) {
    let mut preface = [0u8; 24];
    if tcp.read_exact(&mut preface).is_err() {
        return;
    }
    let _ = tcp.write_all(&frame(SETTINGS, 0, 0, &[]));
    loop {
        let mut head = [0u8; 9];
        if tcp.read_exact(&mut head).is_err() {
            return;
        }
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        if tcp.read_exact(&mut payload).is_err() {
            return;
        }
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let reply = match (kind, mode) {
            (SETTINGS, _) if flags & ACK == 0 => frame(SETTINGS, ACK, 0, &[]),
            (PING, _) if flags & ACK == 0 => frame(PING, ACK, 0, &payload),
            (HEADERS, Backend::FloodEmptyData) => {
                // :status 200 (static index 8), then content-type.
                let mut block = vec![0x88];
                block.extend(header_block(&[("content-type", "application/grpc")]));
                let mut out = frame(HEADERS, END_HEADERS, stream, &block);
                for _ in 0..1000 {
                    out.extend(frame(DATA, 0, stream, &[]));
                }
                out
            }
            _ => continue,
        };
        if tcp.write_all(&reply).is_err() {
            return;
        }
    }
}

const POOLS: &str = r#"
apiVersion: tidepool.dev/v1alpha1
kind: ConnectionPool
metadata: {name: rg, namespace: default}
spec:
  target: {addresses: ["127.0.0.1:{RG}"]}
  listenPort: {RG_PORT}
---
apiVersion: tidepool.dev/v1alpha1
kind: ConnectionPool
metadata: {name: bad, namespace: default}
spec:
  target: {addresses: ["127.0.0.1:{BAD}"]}
  size: 4
  maxStreams: 100
"#;

struct Setup {
    peers: Peers,
    _route_guide: Proc,
    agent: Agent,
    rg_port: u16,
    bad: u16,
    bad_accepts: Arc<AtomicUsize>,
}

fn setup(bad: Backend) -> Setup {
    let peers = Peers::find();
    let rg = peers::free_port();
    let route_guide = peers.start("route-guide-server", &["-port", &rg.to_string()], rg);
    let (bad_port, bad_accepts) = raw_backend(bad);
    let rg_port = peers::free_port();
    let pools = POOLS
        .replace("{RG_PORT}", &rg_port.to_string())
        .replace("{RG}", &rg.to_string())
        .replace("{BAD}", &bad_port.to_string());
    let agent = Agent::start(&pools, &[rg_port]);
    Setup {
        peers,
        _route_guide: route_guide,
        agent,
        rg_port,
        bad: bad_port,
        bad_accepts,
    }
}

/// ghz unary calls to the good pool; panics unless every one is OK.
fn good_traffic_is_unaffected(s: &Setup, label: &str) {
    let run = Ghz::new(
        "routeguide.RouteGuide.GetFeature",
        r#"{"latitude":409146138,"longitude":-746188906}"#,
    )
    .streams(16)
    .calls(800)
    .run(&s.peers, s.rg_port);
    assert_eq!(
        run.ok, run.count,
        "{label}: the well-behaved client failed: {run}"
    );
    assert_eq!(run.count, 800, "{label}: {run}");
}

#[test]
fn a_client_flooding_empty_data_frames_gets_goaway_enhance_your_calm_alone() {
    let mut s = setup(Backend::Silent);
    let mut tcp = hostile_client(s.agent.port);
    tcp.write_all(&request_headers(1, "bad.default")).unwrap();
    let mut flood = Vec::new();
    for _ in 0..1000 {
        flood.extend(frame(DATA, 0, 1, &[]));
    }
    // The agent may close the connection before it has read all of it.
    let _ = tcp.write_all(&flood);
    let code = read_goaway(&mut tcp, Duration::from_secs(10));
    assert_eq!(
        code,
        Some(ENHANCE_YOUR_CALM),
        "the flood of empty DATA frames got no GOAWAY ENHANCE_YOUR_CALM"
    );
    good_traffic_is_unaffected(&s, "after the empty-frame flood");
    let metrics = s.agent.metrics();
    assert_eq!(
        peers::metric(
            &metrics,
            "tidepool_proxy_client_goaway_total",
            &["reason=\"ENHANCE_YOUR_CALM\""]
        ),
        1.0,
        "{metrics}"
    );
    assert!(s.agent.running());
}

#[test]
fn a_client_flooding_tiny_data_frames_is_bounded_in_memory_and_disturbs_no_one() {
    let mut s = setup(Backend::Silent);
    // Warm the good path so its connections and buffers exist before the
    // baseline is read.
    good_traffic_is_unaffected(&s, "before the flood");
    let before = s.agent.rss_kib();

    // 100 streams to a backend that never reads, then 1-byte DATA frames
    // round-robin: 900,000 of them, 900 KB of data, within the 1 MiB
    // connection window the agent offers. Unbounded per-frame buffering
    // would cost hundreds of MiB.
    const STREAMS: u32 = 100;
    const FRAMES: u32 = 900_000;
    let mut tcp = hostile_client(s.agent.port);
    let mut reader = tcp.try_clone().unwrap();
    let writer = thread::spawn(move || {
        let mut out = Vec::new();
        for i in 0..STREAMS {
            out.extend(request_headers(1 + 2 * i, "bad.default"));
        }
        for n in 0..FRAMES {
            out.extend(frame(DATA, 0, 1 + 2 * (n % STREAMS), b"x"));
            if out.len() > 64 * 1024 {
                if tcp.write_all(&out).is_err() {
                    return false;
                }
                out.clear();
            }
        }
        tcp.write_all(&out).is_ok()
    });
    // While the flood runs, everyone else is served.
    good_traffic_is_unaffected(&s, "during the tiny-frame flood");
    let _finished = writer.join().unwrap();
    // Either the agent took it all in (coalesced, held by flow control) or
    // it closed the connection with ENHANCE_YOUR_CALM; nothing else.
    let code = read_goaway(&mut reader, Duration::from_secs(2));
    assert!(
        code.is_none() || code == Some(ENHANCE_YOUR_CALM),
        "unexpected GOAWAY code {code:?}"
    );
    let after = s.agent.rss_kib();
    let grown_mib = after.saturating_sub(before) / 1024;
    eprintln!("agent RSS {before} KiB before, {after} KiB after the flood (GOAWAY {code:?})");
    assert!(
        grown_mib < 64,
        "the agent's memory grew by {grown_mib} MiB under a flood of 1-byte frames"
    );
    good_traffic_is_unaffected(&s, "after the tiny-frame flood");
    assert!(s.agent.running());
    assert!(s.bad_accepts.load(Ordering::SeqCst) >= 1);
}

#[test]
fn a_backend_flooding_empty_data_frames_is_evicted_and_counted_and_other_pools_are_unaffected() {
    let mut s = setup(Backend::FloodEmptyData);
    // A stream to the bad pool: its backend answers with a flood.
    let mut tcp = hostile_client(s.agent.port);
    tcp.write_all(&request_headers(1, "bad.default")).unwrap();
    tcp.write_all(&frame(DATA, END_STREAM, 1, &[0, 0, 0, 0, 0]))
        .unwrap();
    good_traffic_is_unaffected(&s, "beside the flooding backend");
    let evicted = (0..100).any(|_| {
        let metrics = s.agent.metrics();
        let protocol = peers::metric(
            &metrics,
            "tidepool_pool_cx_destroy_total",
            &["default/bad", "reason=\"protocol\""],
        );
        if protocol >= 1.0 {
            return true;
        }
        thread::sleep(Duration::from_millis(100));
        false
    });
    assert!(
        evicted,
        "the flooding backend's connection was not evicted as a protocol error: {}",
        s.agent.metrics()
    );
    // The client's connection to the agent is not the one at fault: it
    // stays open (no GOAWAY to it).
    assert_eq!(read_goaway(&mut tcp, Duration::from_millis(500)), None);
    let log = s.agent.log();
    assert!(
        log.contains("ENHANCE_YOUR_CALM") && log.contains(&format!("127.0.0.1:{}", s.bad)),
        "no log line names the backend and the h2 reason:\n{log}"
    );
    assert!(s.agent.running());
}
