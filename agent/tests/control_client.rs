//! The agent's control client against an in-process fake operator (a real
//! tonic server speaking the control protocol) and a real agent runtime:
//! Hello, atomic apply with Ack, an invalid snapshot Nacked with the last
//! good configuration kept, reports, deltas merged (or Nacked when their
//! base is not what runs), the node's pod map taken whole and kept across
//! a redial, and a redial that says which version the agent runs.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use clap::Parser as _;

use futures::Stream;
use tidepool_agent::config::{Args, Config, Mode};
use tidepool_agent::control::{self, ControlOptions};
use tidepool_crds::control::pb;
use tidepool_crds::control::pb::agent_message::Kind;
use tidepool_crds::control::pb::control_server::{Control, ControlServer};
use tidepool_testkit::{agent, pool};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

/// One agent session as the test sees it: what the agent sends, and a
/// sender for what the operator answers.
type Session = (
    Streaming<pb::AgentMessage>,
    mpsc::Sender<Result<pb::OperatorMessage, Status>>,
);

/// A fake operator: hands each session's inbound messages to the test and
/// lets it send snapshots.
#[derive(Clone)]
struct FakeOperator {
    sessions: mpsc::Sender<Session>,
}

#[tonic::async_trait]
impl Control for FakeOperator {
    type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::OperatorMessage, Status>> + Send>>;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let (tx, rx) = mpsc::channel(8);
        self.sessions
            .send((request.into_inner(), tx))
            .await
            .map_err(|_| Status::unavailable("test over"))?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

type Sessions = mpsc::Receiver<Session>;

async fn start_operator(addr: SocketAddr) -> (Sessions, CancellationToken, SocketAddr) {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel(8);
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ControlServer::new(FakeOperator { sessions: tx }))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                s.cancelled().await
            }),
    );
    (rx, stop, addr)
}

async fn next(inbound: &mut Streaming<pb::AgentMessage>) -> Kind {
    tokio::time::timeout(Duration::from_secs(5), inbound.message())
        .await
        .expect("the agent answers within 5s")
        .expect("the stream is readable")
        .expect("the stream is open")
        .kind
        .expect("a message has a kind")
}

/// The next message that is not a Report.
async fn next_answer(inbound: &mut Streaming<pb::AgentMessage>) -> Kind {
    loop {
        match next(inbound).await {
            Kind::Report(_) => continue,
            k => return k,
        }
    }
}

/// A full snapshot of pool `shop/api` of this size (its generation) on one
/// backend, behind Service `api` port 50051.
fn snapshot(version: &str, size: i32, backend: &str) -> pb::OperatorMessage {
    let api = pool("api", &[backend.into()])
        .namespace("shop")
        .service("api", 50051)
        .size(size)
        .generation(i64::from(size))
        .pb();
    delta(version, "", vec![api], &[])
}

/// A snapshot message; with `base` empty, a full one.
fn delta(version: &str, base: &str, pools: Vec<pb::Pool>, removed: &[&str]) -> pb::OperatorMessage {
    pb::OperatorMessage {
        kind: Some(pb::operator_message::Kind::Snapshot(pb::Snapshot {
            version: version.into(),
            nonce: format!("nonce-{version}"),
            pools,
            base_version: base.into(),
            removed: removed.iter().map(|r| r.to_string()).collect(),
        })),
    }
}

#[tokio::test]
async fn snapshots_are_acked_or_nacked_whole_and_a_redial_says_what_runs() {
    let (mut sessions, operator_stop, addr) = start_operator("127.0.0.1:0".parse().unwrap()).await;
    let app = agent().await;
    let runtime = app.runtime().clone();
    let stop = CancellationToken::new();
    let mut options = ControlOptions::new(format!("http://{addr}"), "node-a", "agent-a");
    options.report_check = Duration::from_millis(100);
    options.backoff_min = Duration::from_millis(50);
    options.backoff_max = Duration::from_millis(200);
    tokio::spawn(control::run(options, runtime.clone(), stop.clone()));

    // Hello first, with no version yet.
    let (mut inbound, tx) = sessions.recv().await.unwrap();
    let Kind::Hello(hello) = next(&mut inbound).await else {
        panic!("the first message must be a Hello")
    };
    assert_eq!(
        (
            hello.node.as_str(),
            hello.pod.as_str(),
            hello.version.as_str()
        ),
        ("node-a", "agent-a", "")
    );
    assert!(hello.deltas, "the agent says it understands deltas");
    assert!(hello.clients, "the agent says it enforces spec.clients");

    // A good snapshot: applied and acked.
    tx.send(Ok(snapshot("v1", 3, "127.0.0.2:50051")))
        .await
        .unwrap();
    assert_eq!(
        next_answer(&mut inbound).await,
        Kind::Ack(pb::Ack {
            version: "v1".into(),
            nonce: "nonce-v1".into()
        })
    );
    assert_eq!(runtime.table().pools["shop/api"].settings.size, 3);

    // A report follows the apply, with the pool and its declared address.
    let report = loop {
        if let Kind::Report(r) = next(&mut inbound).await
            && !r.pools.is_empty()
        {
            break r;
        }
    };
    assert_eq!(
        (report.pools[0].uid.as_str(), report.pools[0].generation),
        ("uid-api", 3)
    );
    assert_eq!(report.pools[0].addresses[0].address, "127.0.0.2:50051");
    // Unused, the address is observed idle for as long as the pool ran
    // (less than a bucket of the default 10-minute window here).
    let observed = report.pools[0].addresses[0].observed.as_ref();
    assert_eq!(
        observed.map(|o| (o.window_seconds, o.peak_streams, o.waits)),
        Some((0, 0, 0))
    );

    // The node's pod map: not answered, so the Nack below (the agent reads
    // in order) shows it was taken; a bad IP is left out.
    let pod = |ip: &str, namespace: &str| pb::PodAddress {
        ip: ip.into(),
        namespace: namespace.into(),
    };
    tx.send(Ok(pb::OperatorMessage {
        kind: Some(pb::operator_message::Kind::Clients(pb::NodeClients {
            version: "c1".into(),
            pods: vec![
                pod("10.1.0.5", "shop"),
                pod("fd00::5", "dev"),
                pod("10.1.0.x", "dev"),
            ],
        })),
    }))
    .await
    .unwrap();

    // An invalid one (size 0): nacked naming the field; nothing changed.
    tx.send(Ok(snapshot("v2", 0, "127.0.0.3:50051")))
        .await
        .unwrap();
    let Kind::Nack(nack) = next_answer(&mut inbound).await else {
        panic!("an invalid snapshot must be nacked")
    };
    assert_eq!(nack.version, "v2");
    assert!(nack.error.contains("spec.size"), "{}", nack.error);
    assert_eq!(nack.pools, ["shop/api"]);
    let table = runtime.table();
    assert_eq!(table.pools["shop/api"].settings.size, 3);
    assert_eq!(
        table.pools["shop/api"].config.addresses,
        ["127.0.0.2:50051"]
    );
    let clients = runtime.clients();
    assert_eq!(clients.version, "c1");
    assert_eq!(
        clients.entries(),
        [
            ("10.1.0.5".parse().unwrap(), "shop"),
            ("fd00::5".parse().unwrap(), "dev")
        ]
    );

    // A delta for a version the agent does not run: nacked naming both
    // versions, nothing applied.
    let web = pool("web", &["127.0.0.4:50051".into()])
        .namespace("shop")
        .service("web", 50051)
        .size(2)
        .generation(2)
        .pb();
    let add_web = |base| delta("v3", base, vec![web.clone()], &[]);
    tx.send(Ok(add_web("v2"))).await.unwrap();
    let Kind::Nack(nack) = next_answer(&mut inbound).await else {
        panic!("a delta on another base must be nacked")
    };
    assert!(
        nack.error.contains("v2") && nack.error.contains("runs v1"),
        "{}",
        nack.error
    );
    assert!(!runtime.table().pools.contains_key("shop/web"));

    // A delta on v1 adding a pool: merged, applied, acked; api is kept.
    tx.send(Ok(add_web("v1"))).await.unwrap();
    assert_eq!(
        next_answer(&mut inbound).await,
        Kind::Ack(pb::Ack {
            version: "v3".into(),
            nonce: "nonce-v3".into()
        })
    );
    let table = runtime.table();
    assert_eq!(table.pools["shop/api"].settings.size, 3);
    assert_eq!(table.pools["shop/web"].settings.size, 2);

    // And one removing api: web stays.
    tx.send(Ok(delta("v4", "v3", vec![], &["shop/api"])))
        .await
        .unwrap();
    assert!(matches!(next_answer(&mut inbound).await, Kind::Ack(_)));
    let table = runtime.table();
    assert!(!table.pools.contains_key("shop/api"));
    assert!(table.pools.contains_key("shop/web"));

    // The operator goes away: the agent keeps its pool and redials; when
    // the operator is back, the Hello says it runs v4.
    operator_stop.cancel();
    drop((inbound, tx, sessions));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(runtime.table().pools.contains_key("shop/web"));
    let (mut sessions, operator_stop, _) = start_operator(addr).await;
    let (mut inbound, _tx) = tokio::time::timeout(Duration::from_secs(5), sessions.recv())
        .await
        .unwrap()
        .unwrap();
    let Kind::Hello(hello) = next(&mut inbound).await else {
        panic!("the first message must be a Hello")
    };
    assert_eq!(hello.version, "v4");
    // The pod map is kept meanwhile: the pods did not go away with the
    // operator.
    assert_eq!(runtime.clients().version, "c1");
    assert_eq!(runtime.clients().len(), 2);

    stop.cancel();
    operator_stop.cancel();
    app.shutdown(Duration::from_secs(1)).await;
}

#[test]
fn operator_mode_needs_a_node_name() {
    let parse = |args: &[&str]| Config::from_args(Args::try_parse_from(args).unwrap());
    let err = parse(&["tidepool-agent", "--operator", "https://op:15010"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("NODE_NAME"), "{err}");
    let config = parse(&[
        "tidepool-agent",
        "--operator",
        "http://op:15010",
        "--insecure-control",
        "true",
        "--node-name",
        "n1",
    ])
    .unwrap();
    assert_eq!(
        config.mode,
        Mode::Operator {
            url: "http://op:15010".into(),
            security: None,
            node: "n1".into(),
            pod: String::new()
        }
    );
    assert!(
        Args::try_parse_from(["tidepool-agent", "--operator", "u", "--standalone", "f"]).is_err()
    );
}
