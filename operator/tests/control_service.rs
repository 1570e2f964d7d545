//! The control service in-process, over real gRPC on loopback, without an
//! API server: the Node list and desired pools are filled by hand. Bad
//! clients (garbage bytes, no Hello, an unknown node, a non-leader replica)
//! are refused with a clear status, and a good agent beside them is served
//! undisturbed. A node's pod map reaches its agent ahead of the first
//! snapshot and again whenever it changes, and no other node's does.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf as _, BufMut as _};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::store;
use kube::runtime::watcher;
use prometheus_client::registry::Registry;
use tidepool_crds::control::pb;
use tidepool_crds::control::pb::agent_message::Kind;
use tidepool_crds::control::pb::control_client::ControlClient;
use tidepool_crds::control::pb::control_server::ControlServer;
use tidepool_operator::agents::Agents;
use tidepool_operator::clients::{NodeClients, node_maps};
use tidepool_operator::control::ControlService;
use tidepool_operator::desired::{Desired, Entry};
use tidepool_operator::metrics::Metrics;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

/// Raw bytes on the wire, to send what no agent would.
#[derive(Debug, Clone, Default)]
struct RawCodec;

#[derive(Debug, Clone, Default)]
struct Raw;

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let v = src.chunk().to_vec();
        src.advance(v.len());
        Ok(Some(v))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

struct Server {
    channel: Channel,
    agents: Arc<Agents>,
    desired: Arc<Desired>,
    clients: Arc<NodeClients>,
    leading: watch::Sender<bool>,
    stop: CancellationToken,
}

async fn server() -> Server {
    let (nodes, mut writer) = store::<Node>();
    let node: Node =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "n1"}})).unwrap();
    writer.apply_watcher_event(&watcher::Event::Apply(node));
    let agents = Arc::new(Agents::default());
    let desired = Arc::new(Desired::default());
    desired.set(
        "ns/p".into(),
        Entry {
            pool: pb::Pool {
                namespace: "ns".into(),
                name: "p".into(),
                generation: 1,
                ..Default::default()
            },
            resolution: Ok(()),
        },
    );
    let clients = Arc::new(NodeClients::default());
    let (leading, leading_rx) = watch::channel(true);
    let (_init_tx, initialized) = watch::channel(true);
    let stop = CancellationToken::new();
    let service = ControlService {
        agents: agents.clone(),
        desired: desired.clone(),
        nodes,
        leading: leading_rx,
        initialized,
        clients: clients.clone(),
        fanout: Arc::new(Semaphore::new(4)),
        metrics: Metrics::new(&mut Registry::default()),
        stop: stop.clone(),
        auth: None,
        max_session: None,
        fence: tidepool_operator::leader::Fence::always(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let s = stop.clone();
    tokio::spawn(async move {
        // Keep the store's writer alive as long as the server.
        let _writer = writer;
        let _init = _init_tx;
        tonic::transport::Server::builder()
            .add_service(ControlServer::new(service))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), s.cancelled_owned())
            .await
    });
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Server {
        channel,
        agents,
        desired,
        clients,
        leading,
        stop,
    }
}

fn hello(node: &str) -> pb::AgentMessage {
    pb::AgentMessage {
        kind: Some(Kind::Hello(pb::Hello {
            node: node.into(),
            pod: "pod".into(),
            ..Default::default()
        })),
    }
}

/// Opens a session sending `first`; returns the refusal, if any.
async fn open(
    channel: &Channel,
    first: pb::AgentMessage,
) -> Result<
    (
        mpsc::Sender<pb::AgentMessage>,
        tonic::Streaming<pb::OperatorMessage>,
    ),
    tonic::Status,
> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(first).await.unwrap();
    let inbound = ControlClient::new(channel.clone())
        .session(ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, inbound))
}

async fn next_message(
    inbound: &mut tonic::Streaming<pb::OperatorMessage>,
) -> pb::operator_message::Kind {
    let m = tokio::time::timeout(Duration::from_secs(5), inbound.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    m.kind.expect("an operator message has a kind")
}

async fn next_snapshot(inbound: &mut tonic::Streaming<pb::OperatorMessage>) -> pb::Snapshot {
    match next_message(inbound).await {
        pb::operator_message::Kind::Snapshot(s) => s,
        other => panic!("expected a snapshot, got {other:?}"),
    }
}

async fn next_map(inbound: &mut tonic::Streaming<pb::OperatorMessage>) -> pb::NodeClients {
    match next_message(inbound).await {
        pb::operator_message::Kind::Clients(c) => c,
        other => panic!("expected a pod map, got {other:?}"),
    }
}

/// A running pod of `namespace` on `node` with this IP.
fn pod(namespace: &str, name: &str, node: &str, ip: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"nodeName": node, "containers": []},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    }))
    .unwrap()
}

#[tokio::test]
async fn a_node_gets_its_own_pod_map_first_and_each_change_only() {
    let s = server().await;
    let mut pods = vec![
        pod("shop", "a", "n1", "10.1.0.5"),
        pod("dev", "b", "n2", "10.2.0.5"),
    ];
    s.clients.update(node_maps(&pods));

    let (_tx, mut inbound) = open(&s.channel, hello("n1")).await.unwrap();
    let first = next_map(&mut inbound).await;
    assert_eq!(
        first.pods,
        [pb::PodAddress {
            ip: "10.1.0.5".into(),
            namespace: "shop".into()
        }],
        "n1's own pods only"
    );
    assert_eq!(next_snapshot(&mut inbound).await.pools.len(), 1);

    // A pod starts on n1: the whole new map follows.
    pods.push(pod("billing", "c", "n1", "10.1.0.6"));
    assert_eq!(s.clients.update(node_maps(&pods)), 1);
    let second = next_map(&mut inbound).await;
    assert_eq!(second.pods.len(), 2);
    assert_ne!(second.version, first.version);

    // A change on n2 only: n1 hears nothing.
    pods.push(pod("dev", "d", "n2", "10.2.0.6"));
    assert_eq!(s.clients.update(node_maps(&pods)), 1);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), inbound.message())
            .await
            .is_err(),
        "another node's change reached n1"
    );
    s.stop.cancel();
}

/// Waits until the registry has `node`'s Ack of `version`.
async fn acked(agents: &Agents, node: &str, version: &str) {
    for _ in 0..500 {
        if agents.with(|a| {
            a.get(node)
                .and_then(|a| a.applied.as_ref())
                .is_some_and(|s| s.version == version)
        }) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{node} never acknowledged {version}");
}

fn answer(snapshot: &pb::Snapshot, error: Option<&str>) -> pb::AgentMessage {
    let (version, nonce) = (snapshot.version.clone(), snapshot.nonce.clone());
    pb::AgentMessage {
        kind: Some(match error {
            None => Kind::Ack(pb::Ack { version, nonce }),
            Some(e) => Kind::Nack(pb::Nack {
                version,
                nonce,
                error: e.into(),
                pools: vec![],
            }),
        }),
    }
}

fn pool(name: &str, generation: i64) -> Entry {
    Entry {
        pool: pb::Pool {
            namespace: "ns".into(),
            name: name.into(),
            generation,
            ..Default::default()
        },
        resolution: Ok(()),
    }
}

#[tokio::test]
async fn an_agent_that_understands_deltas_gets_only_what_changed() {
    let s = server().await;
    s.desired.set("ns/q".into(), pool("q", 1));
    let mut h = hello("n1");
    if let Some(Kind::Hello(h)) = &mut h.kind {
        h.deltas = true;
    }
    let (tx, mut inbound) = open(&s.channel, h).await.unwrap();

    // The first send is whole, whatever the agent says.
    let first = next_snapshot(&mut inbound).await;
    assert!(first.base_version.is_empty());
    assert_eq!(first.pools.len(), 2);
    tx.send(answer(&first, None)).await.unwrap();
    acked(&s.agents, "n1", &first.version).await;

    // One pool changes, one goes: a delta from what the agent acknowledged.
    s.desired.set("ns/p".into(), pool("p", 2));
    s.desired.remove("ns/q");
    let current = s.desired.snapshot();
    s.agents.offer(&current);
    let delta = next_snapshot(&mut inbound).await;
    assert_eq!(delta.version, current.version);
    assert_eq!(delta.base_version, first.version);
    assert_eq!(
        delta.pools.iter().map(|p| p.key()).collect::<Vec<_>>(),
        ["ns/p"]
    );
    assert_eq!(delta.pools[0].generation, 2);
    assert_eq!(delta.removed, ["ns/q"]);

    // The agent refuses the delta: the same version comes again, whole.
    tx.send(answer(&delta, Some("delta snapshot for another base")))
        .await
        .unwrap();
    let whole = next_snapshot(&mut inbound).await;
    assert_eq!(whole.version, current.version);
    assert!(whole.base_version.is_empty() && whole.removed.is_empty());
    assert_eq!(whole.pools.len(), 1);
    assert_ne!(whole.nonce, delta.nonce);
    s.agents.with(|a| assert!(a["n1"].rejected.is_none()));

    // Refused whole too: recorded, and not sent again.
    tx.send(answer(&whole, Some("bad"))).await.unwrap();
    for _ in 0..500 {
        if s.agents.with(|a| a["n1"].rejected.is_some()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s.agents.with(|a| {
        let n1 = &a["n1"];
        assert_eq!(
            n1.rejected.as_ref().unwrap().snapshot.version,
            current.version
        );
        assert_eq!(n1.applied.as_ref().unwrap().version, first.version);
    });
    assert_eq!(s.agents.offer(&current), 0);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), inbound.message())
            .await
            .is_err(),
        "nothing more is sent"
    );
    s.stop.cancel();
}

#[tokio::test]
async fn bad_clients_are_refused_clearly_and_a_good_agent_is_undisturbed() {
    let s = server().await;

    // A good agent: gets the snapshot, acknowledges it.
    let (tx, mut inbound) = open(&s.channel, hello("n1")).await.unwrap();
    let snapshot = next_snapshot(&mut inbound).await;
    assert_eq!(snapshot.pools.len(), 1);
    tx.send(pb::AgentMessage {
        kind: Some(Kind::Ack(pb::Ack {
            version: snapshot.version.clone(),
            nonce: snapshot.nonce,
        })),
    })
    .await
    .unwrap();

    // Garbage bytes where the Hello should be.
    let (gtx, grx) = mpsc::channel(1);
    gtx.send(vec![0xff, 0xff, 0xff, 0xff]).await.unwrap();
    let mut grpc = tonic::client::Grpc::new(s.channel.clone());
    grpc.ready().await.unwrap();
    let err = grpc
        .streaming(
            tonic::Request::new(ReceiverStream::new(grx)),
            "/tidepool.control.v1.Control/Session".parse().unwrap(),
            RawCodec,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("could not be read"),
        "{}",
        err.message()
    );

    // Not a Hello first.
    let err = open(
        &s.channel,
        pb::AgentMessage {
            kind: Some(Kind::Ack(pb::Ack::default())),
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "the first message on a control stream must be a Hello; got Ack"
    );

    // A node the operator does not serve.
    let err = open(&s.channel, hello("ghost")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("\"ghost\"")
            && err.message().contains("not a node this operator serves"),
        "{}",
        err.message()
    );

    // A second Hello on an open stream ends that stream only.
    let (btx, mut binbound) = open(&s.channel, hello("n1")).await.unwrap();
    let _ = next_snapshot(&mut binbound).await;
    btx.send(hello("n1")).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), binbound.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .contains("Hello is not allowed after the Hello"),
        "{}",
        err.message()
    );

    // That second session had replaced the first (same node); reconnect the
    // good agent and check it is served as before.
    drop((tx, inbound));
    let (tx, mut inbound) = open(&s.channel, hello("n1")).await.unwrap();
    let first = next_snapshot(&mut inbound).await;
    tx.send(pb::AgentMessage {
        kind: Some(Kind::Ack(pb::Ack {
            version: first.version.clone(),
            nonce: first.nonce,
        })),
    })
    .await
    .unwrap();
    s.desired.set(
        "ns/q".into(),
        Entry {
            pool: pb::Pool {
                namespace: "ns".into(),
                name: "q".into(),
                generation: 1,
                ..Default::default()
            },
            resolution: Ok(()),
        },
    );
    // Offer what the pusher would. This agent's Hello did not say it
    // understands deltas: it gets every pool.
    acked(&s.agents, "n1", &first.version).await;
    s.agents.offer(&s.desired.snapshot());
    let second = next_snapshot(&mut inbound).await;
    assert_eq!(second.pools.len(), 2);
    assert!(second.base_version.is_empty());
    assert_eq!(s.agents.len(), 1);

    // A replica that is not the leader refuses new streams.
    s.leading.send_replace(false);
    let err = open(&s.channel, hello("n1")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("not the leader"),
        "{}",
        err.message()
    );
    s.stop.cancel();
}
