//! The control stream's threats, each against a real operator process on
//! the local control plane, with real tokens from the TokenRequest API
//! (bound to Pods on the test's Nodes), over real TLS:
//! - identities that are not an agent's on its own node (forged node, a
//!   token of another node, no token, wrong audience, another
//!   ServiceAccount, an unbound token, expired and revoked tokens, malformed
//!   headers) are refused with their gRPC codes;
//! - sessions end with their token, and agents rejoin with the refreshed one
//!   and get nothing resent;
//! - plain text and stalled handshakes on the TLS port;
//! - an operator the agent does not trust never sees its token;
//! - serving certificates rotate and the CA rolls over with agents
//!   connected, and none is dropped;
//! - two replicas racing on the empty CA Secret end with one CA;
//! - a CA Secret with garbage in it stops the operator, naming it.
//!
//! Each test also shows the good agents were not disturbed.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use base64::Engine as _;
use futures::StreamExt as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use tidepool_crds::control::pb;
use tidepool_crds::control::pb::control_client::ControlClient;
use tidepool_e2e::identity::{
    AGENT_SA, AUDIENCE, agent_token, apply_pod, apply_service_account, token,
};
use tidepool_e2e::procs::{Agent, Join, Operator, OperatorOptions, eventually};
use tidepool_e2e::{cluster, setup};
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// A namespace with nodes `<ns>-n1..n<nodes>` and the agent ServiceAccount.
async fn world(prefix: &str, nodes: u8) -> Result<(String, kube::Client)> {
    let (ns, client) = setup::world(prefix, nodes).await?;
    apply_service_account(&client, &ns, AGENT_SA).await?;
    Ok((ns, client))
}

fn options(ns: &str, extra: &[&str]) -> OperatorOptions {
    OperatorOptions {
        extra: extra.iter().map(|s| s.to_string()).collect(),
        ..OperatorOptions::new(ns)
    }
}

/// Opens a control stream as a client that writes its own headers, sends a
/// Hello for `node`, and says whether the operator accepted it. A failure
/// to connect at all is `Unavailable` with "transport" in its message.
async fn open(op: &Operator, node: &str, authorization: &[&str]) -> Result<(), tonic::Status> {
    open_at(&op.join(), node, authorization).await
}

async fn open_at(join: &Join, node: &str, authorization: &[&str]) -> Result<(), tonic::Status> {
    let transport =
        |e: &dyn std::fmt::Display| tonic::Status::unavailable(format!("transport: {e}"));
    let (ca, name) = join.tls.clone().ok_or_else(|| transport(&"no TLS"))?;
    let bundle = std::fs::read(&ca).map_err(|e| transport(&e))?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(bundle))
        .domain_name(name);
    let channel = Endpoint::from_shared(join.url.clone())
        .map_err(|e| transport(&e))?
        .tls_config(tls)
        .map_err(|e| transport(&e))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| transport(&format!("{e}: {:?}", std::error::Error::source(&e))))?;
    let hello = pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Hello(pb::Hello {
            node: node.into(),
            pod: "probe".into(),
            version: String::new(),
            agent_version: "security-test".into(),
            deltas: true,
            clients: true,
        })),
    };
    // The request stream ends a moment after the Hello, so an accepted
    // probe does not stay registered.
    let end = futures::stream::once(tokio::time::sleep(Duration::from_millis(300)))
        .filter_map(|()| async { None });
    let mut request = tonic::Request::new(futures::stream::iter(vec![hello]).chain(end));
    for value in authorization {
        request.metadata_mut().append(
            "authorization",
            MetadataValue::try_from(*value).map_err(|e| transport(&e))?,
        );
    }
    let mut client = ControlClient::new(channel);
    match tokio::time::timeout(Duration::from_secs(15), client.session(request)).await {
        Err(_) => Err(tonic::Status::deadline_exceeded("no answer in 15 s")),
        Ok(r) => r.map(|_| ()),
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Asserts a refusal's code and that its message names `needle`.
fn refused(r: Result<(), tonic::Status>, code: Code, needle: &str, what: &str) -> Result<()> {
    match r {
        Ok(()) => bail!("{what}: accepted, expected {code:?}"),
        Err(s) if s.code() == code && s.message().contains(needle) => Ok(()),
        Err(s) => bail!(
            "{what}: got {:?} {:?}, expected {code:?} naming {needle:?}",
            s.code(),
            s.message()
        ),
    }
}

/// A log without its colours.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// How often the operator logged `node`'s agent connecting and
/// disconnecting.
fn sessions(op: &Operator, node: &str) -> (usize, usize) {
    let log = plain(&op.proc.log());
    let of = |what: &str| {
        log.lines()
            .filter(|l| l.contains(what) && l.contains(&format!("node={node}")))
            .count()
    };
    (of("agent connected"), of("agent disconnected"))
}

async fn metric_or_zero(op: &Operator, name: &str) -> f64 {
    op.metric(name).await.unwrap_or(0.0)
}

/// A token with the same claims as `token` but expired an hour ago, signed
/// with the local control plane's service-account key (TokenRequest cannot
/// mint one: its minimum is ten minutes).
fn expired_copy(token: &str) -> Result<String> {
    let key_pem = std::fs::read_to_string(cluster()?.kubeconfig().with_file_name("sa.key"))?;
    let body: String = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let der = base64::engine::general_purpose::STANDARD.decode(body)?;
    let key =
        ring::signature::RsaKeyPair::from_der(&der).map_err(|e| anyhow::anyhow!("sa.key: {e}"))?;
    let mut parts = token.split('.');
    let (header, payload) = (parts.next().context("jwt")?, parts.next().context("jwt")?);
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut claims: serde_json::Value = serde_json::from_slice(&b64.decode(payload)?)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    claims["iat"] = (now - 7200).into();
    claims["nbf"] = (now - 7200).into();
    claims["exp"] = (now - 3600).into();
    let signing_input = format!("{header}.{}", b64.encode(serde_json::to_vec(&claims)?));
    let mut sig = vec![0u8; key.public().modulus_len()];
    key.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        signing_input.as_bytes(),
        &mut sig,
    )
    .map_err(|e| anyhow::anyhow!("signing: {e}"))?;
    Ok(format!("{signing_input}.{}", b64.encode(sig)))
}

#[tokio::test]
async fn every_identity_but_the_agents_own_is_refused_with_its_code() -> Result<()> {
    let (ns, client) = world("authn", 3).await?;
    let (n1, n2, n3) = (format!("{ns}-n1"), format!("{ns}-n2"), format!("{ns}-n3"));
    // A short cache, for the revocation case at the end.
    let op = Operator::start(&options(&ns, &["--token-review-cache-ttl=1s"])).await?;
    let mut good = Agent::start(&op, &n1, "127.0.241.1").await?;
    op.wait_connected(1, Duration::from_secs(30)).await?;

    let t1 = agent_token(&client, &ns, AGENT_SA, &n1).await?;
    let t2 = agent_token(&client, &ns, AGENT_SA, &n2).await?;
    let t3 = agent_token(&client, &ns, AGENT_SA, &n3).await?;
    // A good token is accepted by the same client (the harness works), on
    // a node of its own (a second session of n1 would replace the agent's).
    open(&op, &n3, &[&bearer(&t3)])
        .await
        .map_err(|s| anyhow::anyhow!("an agent's own token was refused: {s:?}"))?;

    // 1. A forged node: n1's token claiming n2.
    refused(
        open(&op, &n2, &[&bearer(&t1)]).await,
        Code::PermissionDenied,
        &format!("bound to a pod on node \"{n1}\""),
        "forged node",
    )?;
    // 2. A token for another node (n2's) used as n1.
    refused(
        open(&op, &n1, &[&bearer(&t2)]).await,
        Code::PermissionDenied,
        &format!("claims node \"{n1}\""),
        "another node's token",
    )?;
    // 3. No token at all (what an agent built before authentication sends).
    refused(
        open(&op, &n1, &[]).await,
        Code::Unauthenticated,
        "no authorization header",
        "no token",
    )?;
    // 4. Wrong audience: the API server's own, and another one.
    let pod_uid = apply_pod(&client, &ns, &format!("agent-{n1}"), AGENT_SA, &n1).await?;
    let bound = Some((format!("agent-{n1}"), pod_uid));
    let bound_ref = bound.as_ref().map(|(n, u)| (n.as_str(), u.as_str()));
    let api_aud = token(&client, &ns, AGENT_SA, "", bound_ref, 3600).await?;
    refused(
        open(&op, &n1, &[&bearer(&api_aud)]).await,
        Code::Unauthenticated,
        "not accepted by the API server",
        "API-server audience",
    )?;
    let other = token(&client, &ns, AGENT_SA, "other.example", bound_ref, 3600).await?;
    refused(
        open(&op, &n1, &[&bearer(&other)]).await,
        Code::Unauthenticated,
        "not accepted by the API server",
        "other audience",
    )?;
    // 5. Another ServiceAccount, with our audience, on the right node: any
    //    pod author can ask for any audience.
    apply_service_account(&client, &ns, "workload").await?;
    let w_uid = apply_pod(&client, &ns, "workload-1", "workload", &n1).await?;
    let workload = token(
        &client,
        &ns,
        "workload",
        AUDIENCE,
        Some(("workload-1", &w_uid)),
        3600,
    )
    .await?;
    refused(
        open(&op, &n1, &[&bearer(&workload)]).await,
        Code::PermissionDenied,
        &format!("system:serviceaccount:{ns}:workload"),
        "another ServiceAccount",
    )?;
    // 6. An unbound token of the right ServiceAccount and audience.
    let unbound = token(&client, &ns, AGENT_SA, AUDIENCE, None, 3600).await?;
    refused(
        open(&op, &n1, &[&bearer(&unbound)]).await,
        Code::PermissionDenied,
        "names no single node",
        "unbound token",
    )?;
    // 7a. An expired token, validly signed.
    if cluster()?.is_local() {
        let expired = expired_copy(&t1)?;
        refused(
            open(&op, &n1, &[&bearer(&expired)]).await,
            Code::Unauthenticated,
            "expired",
            "expired token",
        )?;
    }
    // Malformed headers: garbage, the wrong scheme, two tokens, a huge one.
    refused(
        open(&op, &n1, &["Bearer not-a-jwt"]).await,
        Code::Unauthenticated,
        "not accepted",
        "garbage token",
    )?;
    refused(
        open(&op, &n1, &[&format!("Basic {t1}")]).await,
        Code::Unauthenticated,
        "Bearer",
        "Basic scheme",
    )?;
    refused(
        open(&op, &n1, &[&bearer(&t1), &bearer(&t2)]).await,
        Code::Unauthenticated,
        "2 authorization headers",
        "two tokens",
    )?;
    let huge = format!("Bearer {}", "x".repeat(64 * 1024));
    match open(&op, &n1, &[&huge]).await {
        Err(s) if s.code() != Code::Ok => {}
        other => bail!("a 64 KiB token: {other:?}"),
    }
    // 7b. Revoked: the bound pod is deleted; once the operator's short
    //     cache and the API server's have let go, the token is refused.
    Api::<Pod>::namespaced(client.clone(), &ns)
        .delete(
            &format!("agent-{n2}"),
            &DeleteParams::default().grace_period(0),
        )
        .await?;
    eventually(Duration::from_secs(30), "the revoked token refused", || async {
        matches!(open(&op, &n2, &[&bearer(&t2)]).await, Err(s) if s.code() == Code::Unauthenticated).then_some(())
    })
    .await?;

    // Each refusal was counted under its reason, and the good agent never
    // noticed: one session, still connected, nothing registered for n2.
    for reason in [
        "node_mismatch",
        "no_token",
        "unauthenticated",
        "wrong_service_account",
        "no_node_claim",
        "malformed",
    ] {
        let n = op
            .metric(&format!(
                "tidepool_operator_auth_refusals_total{{reason=\"{reason}\"}}"
            ))
            .await
            .with_context(|| format!("no refusal counted as {reason}"))?;
        assert!(n >= 1.0, "{reason}: {n}");
    }
    op.wait_connected(1, Duration::from_secs(30)).await?;
    assert_eq!(
        sessions(&op, &n1).1,
        0,
        "the good agent was disconnected:\n{}",
        op.proc.log()
    );
    assert!(good.proc.is_running());
    let log = plain(&op.proc.log());
    assert!(
        !log.contains(&t1) && !log.contains(&t2),
        "a token reached the log"
    );
    assert!(
        log.contains("control stream refused: authentication")
            && log.contains(&format!("claimed_node=\"{n2}\""))
    );
    Ok(())
}

#[tokio::test]
async fn sessions_end_with_their_token_and_agents_rejoin_with_the_refreshed_one() -> Result<()> {
    let (ns, client) = world("session", 1).await?;
    let n1 = format!("{ns}-n1");
    let op = Operator::start(&options(&ns, &["--control-max-session=3s"])).await?;
    let agent = Agent::start(&op, &n1, "127.0.242.1").await?;
    op.wait_connected(1, Duration::from_secs(30)).await?;
    eventually(
        Duration::from_secs(10),
        "the first snapshot acknowledged",
        || async {
            (metric_or_zero(&op, "tidepool_operator_snapshots_sent_total").await >= 1.0)
                .then_some(())
        },
    )
    .await?;
    let sent = metric_or_zero(&op, "tidepool_operator_snapshots_sent_total").await;
    // The kubelet refreshes the token file: a new token (a new JTI).
    let fresh = agent_token(&client, &ns, AGENT_SA, &n1).await?;
    std::fs::write(&agent.token_file, &fresh)?;
    eventually(
        Duration::from_secs(20),
        "two sessions ended at their cap",
        || async {
            (metric_or_zero(&op, "tidepool_operator_sessions_expired_total").await >= 2.0)
                .then_some(())
        },
    )
    .await
    .with_context(|| op.proc.log())?;
    op.wait_connected(1, Duration::from_secs(30)).await?;
    // The agent rejoined each time, with the new token's id in the log...
    let credentials: std::collections::BTreeSet<String> = plain(&op.proc.log())
        .lines()
        .filter(|l| l.contains("agent connected"))
        .filter_map(|l| l.split("credential=").nth(1))
        .filter_map(|s| s.split_whitespace().next())
        .map(str::to_string)
        .collect();
    assert!(
        credentials.len() >= 2,
        "one token id across rejoins: {credentials:?}"
    );
    // ...and since its Hello named the version it runs, nothing was resent.
    assert_eq!(
        metric_or_zero(&op, "tidepool_operator_snapshots_sent_total").await,
        sent
    );
    assert!(
        agent
            .proc
            .log()
            .contains("redialing with the refreshed token")
    );
    Ok(())
}

#[tokio::test]
async fn the_tls_port_refuses_plain_text_and_stalled_handshakes() -> Result<()> {
    let (ns, _client) = world("plaintext", 3).await?;
    let (n1, n2, n3) = (format!("{ns}-n1"), format!("{ns}-n2"), format!("{ns}-n3"));
    let op = Operator::start(&options(&ns, &["--tls-handshake-timeout=2s"])).await?;
    let _good = Agent::start(&op, &n1, "127.0.243.1").await?;
    op.wait_connected(1, Duration::from_secs(30)).await?;
    // An h2c agent (what this version's agents spoke before TLS).
    let plain = Agent::start_with(
        &Join {
            url: op.url(),
            tls: None,
        },
        &n2,
        "127.0.243.2",
        None,
        &[],
    )
    .await?;
    eventually(
        Duration::from_secs(15),
        "the plain-text agent failing",
        || async { plain.proc.log().contains("no control stream").then_some(()) },
    )
    .await?;
    eventually(
        Duration::from_secs(10),
        "the handshake failure counted",
        || async {
            (metric_or_zero(
                &op,
                "tidepool_operator_tls_handshake_failures_total{reason=\"handshake\"}",
            )
            .await
                >= 1.0)
                .then_some(())
        },
    )
    .await?;
    // Fifty clients that connect and never speak: each is closed after
    // the handshake timeout, and the port keeps serving meanwhile.
    let mut stalled = Vec::new();
    for _ in 0..50 {
        stalled.push(tokio::net::TcpStream::connect(op.control).await?);
    }
    let t3 = agent_token(&cluster()?.client().await?, &ns, AGENT_SA, &n3).await?;
    open(&op, &n3, &[&bearer(&t3)])
        .await
        .map_err(|s| anyhow::anyhow!("a good client behind stalled ones: {s:?}"))?;
    for mut s in stalled {
        use tokio::io::AsyncReadExt as _;
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await??;
        assert_eq!(n, 0, "a stalled client got bytes instead of a close");
    }
    assert!(
        metric_or_zero(
            &op,
            "tidepool_operator_tls_handshake_failures_total{reason=\"timeout\"}"
        )
        .await
            >= 50.0
    );
    assert_eq!(op.connected_agents().await, Some(1.0));
    assert_eq!(
        sessions(&op, &n2).0,
        0,
        "the plain-text agent was registered"
    );
    assert_eq!(sessions(&op, &n1).1, 0);
    Ok(())
}

#[tokio::test]
async fn agents_refuse_an_operator_they_do_not_trust_and_never_send_it_a_token() -> Result<()> {
    let (ns, client) = world("trust", 2).await?;
    let n2 = format!("{ns}-n2");
    let real = Operator::start(&options(&ns, &[])).await?;
    // The impostor: a real operator with a CA of its own, in another
    // namespace, where agents would never have its bundle.
    let (other_ns, _) = world("impostor", 0).await?;
    let impostor = Operator::start(&OperatorOptions {
        node_selector: format!("tidepool.dev/e2e-group={ns}"),
        ..options(&other_ns, &[])
    })
    .await?;
    // An agent with the real CA and name, pointed at the impostor's port.
    let fooled = Join {
        url: format!("https://{}", impostor.control),
        tls: real.join().tls,
    };
    let token = agent_token(&client, &ns, AGENT_SA, &n2).await?;
    let victim = Agent::start_with(&fooled, &n2, "127.0.244.3", Some(&token), &[]).await?;
    eventually(
        Duration::from_secs(15),
        "the agent refusing the impostor's certificate",
        || async {
            let log = victim.proc.log();
            (log.contains("UnknownIssuer") || log.contains("unknown issuer")).then_some(())
        },
    )
    .await
    .with_context(|| victim.proc.log())?;
    // The impostor saw a failed handshake and not one request: no stream,
    // no token to review.
    assert!(
        metric_or_zero(
            &impostor,
            "tidepool_operator_tls_handshake_failures_total{reason=\"handshake\"}"
        )
        .await
            >= 1.0
    );
    assert_eq!(
        metric_or_zero(&impostor, "tidepool_operator_token_reviews_total").await,
        0.0
    );
    assert_eq!(
        metric_or_zero(&impostor, "tidepool_operator_refused_streams_total").await,
        0.0
    );
    // The right CA but a name the certificate does not carry.
    let wrong_name = Join {
        url: format!("https://{}", real.control),
        tls: real
            .join()
            .tls
            .map(|(ca, _)| (ca, "someone-else.example".into())),
    };
    let reviews = metric_or_zero(&real, "tidepool_operator_token_reviews_total").await;
    let misled = Agent::start_with(&wrong_name, &n2, "127.0.244.4", Some(&token), &[]).await?;
    eventually(
        Duration::from_secs(15),
        "the agent refusing a certificate for another name",
        || async {
            let log = misled.proc.log();
            (log.contains("NotValidForName") || log.contains("not valid for name")).then_some(())
        },
    )
    .await
    .with_context(|| misled.proc.log())?;
    assert_eq!(
        metric_or_zero(&real, "tidepool_operator_token_reviews_total").await,
        reviews
    );
    assert_eq!(real.connected_agents().await, Some(0.0));
    Ok(())
}

async fn bundle_certs(client: &kube::Client, ns: &str) -> Result<usize> {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get("tidepool-control-ca")
        .await?;
    Ok(cm
        .data
        .and_then(|d| d.get("ca.crt").cloned())
        .unwrap_or_default()
        .matches("BEGIN CERTIFICATE")
        .count())
}

#[tokio::test]
async fn certificates_rotate_and_the_ca_rolls_over_without_dropping_agents() -> Result<()> {
    let (ns, client) = world("rotate", 3).await?;
    let (n1, n2, n3) = (format!("{ns}-n1"), format!("{ns}-n2"), format!("{ns}-n3"));
    let op = Operator::start(&options(
        &ns,
        &[
            "--control-cert-ttl=10s",
            "--ca-check-interval=1s",
            "--ca-rollover-overlap=4s",
        ],
    ))
    .await?;
    let _a1 = Agent::start(&op, &n1, "127.0.245.1").await?;
    let _a2 = Agent::start(&op, &n2, "127.0.245.2").await?;
    op.wait_connected(2, Duration::from_secs(30)).await?;
    // Two serving-certificate renewals (at half of 10 s each).
    eventually(
        Duration::from_secs(30),
        "two certificate renewals",
        || async {
            (metric_or_zero(&op, "tidepool_operator_control_cert_renewals_total").await >= 2.0)
                .then_some(())
        },
    )
    .await?;
    // A new connection gets the new certificate and is accepted.
    let t3 = agent_token(&client, &ns, AGENT_SA, &n3).await?;
    open(&op, &n3, &[&bearer(&t3)])
        .await
        .map_err(|s| anyhow::anyhow!("after rotation: {s:?}"))?;

    // The CA rolls over: a person asks, the next CA is published beside
    // the current one, and agents (the kubelet) pick the bundle up.
    let old_bundle = std::fs::read_to_string(&op.ca_file)?;
    let stale = op.ca_file.with_file_name("stale-ca.crt");
    std::fs::write(&stale, &old_bundle)?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    secrets
        .patch(
            "tidepool-control-ca",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"annotations": {"tidepool.dev/ca-rollover": "requested"}}})),
        )
        .await?;
    eventually(Duration::from_secs(20), "two CAs in the bundle", || async {
        (bundle_certs(&client, &ns).await.ok()? == 2).then_some(())
    })
    .await
    .with_context(|| op.proc.log())?;
    op.refresh_ca().await?;
    // After the overlap the new CA signs; the old one stays trusted.
    eventually(Duration::from_secs(20), "the next CA signing", || async {
        let s = secrets.get("tidepool-control-ca").await.ok()?;
        s.data?.contains_key("previous.crt").then_some(())
    })
    .await
    .with_context(|| op.proc.log())?;
    eventually(Duration::from_secs(10), "a certificate from the new CA", || async {
        // A client trusting only the old CA is refused once the leaf is
        // from the new one.
        let old_only = Join {
            url: op.join().url,
            tls: op.join().tls.map(|(_, n)| (stale.clone(), n)),
        };
        matches!(open_at(&old_only, &n3, &[&bearer(&t3)]).await, Err(s) if s.message().contains("transport")).then_some(())
    })
    .await?;
    open(&op, &n3, &[&bearer(&t3)])
        .await
        .map_err(|s| anyhow::anyhow!("with the new bundle: {s:?}"))?;
    // After one certificate lifetime the old CA leaves the bundle.
    eventually(Duration::from_secs(30), "the old CA retired", || async {
        (bundle_certs(&client, &ns).await.ok()? == 1).then_some(())
    })
    .await
    .with_context(|| op.proc.log())?;
    // Throughout, the agents' streams stayed up: one session each.
    assert_eq!(op.connected_agents().await, Some(2.0));
    for n in [&n1, &n2] {
        assert_eq!(sessions(&op, n), (1, 0), "{n}:\n{}", op.proc.log());
    }
    let log = plain(&op.proc.log());
    for step in [
        "published the next control CA beside the current one",
        "the next control CA now signs",
        "retired the previous control CA",
    ] {
        assert!(log.contains(step), "no {step:?} in:\n{log}");
    }
    Ok(())
}

#[tokio::test]
async fn two_replicas_racing_on_an_empty_secret_end_with_one_ca() -> Result<()> {
    let (ns, client) = world("race", 1).await?;
    let n1 = format!("{ns}-n1");
    // The chart's empty Secret.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let empty: Secret =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "tidepool-control-ca"}}))?;
    secrets.create(&PostParams::default(), &empty).await?;
    let kubeconfig = cluster()?.kubeconfig().to_path_buf();
    let (oa, ob) = (
        OperatorOptions {
            identity: "replica-a".into(),
            ..options(&ns, &[])
        },
        OperatorOptions {
            identity: "replica-b".into(),
            ..options(&ns, &[])
        },
    );
    let (a, b) = tokio::join!(
        Operator::spawn_as(&oa, &kubeconfig),
        Operator::spawn_as(&ob, &kubeconfig),
    );
    let (a, b) = (a?, b?);
    let ready = |op: &Operator| {
        let admin = op.admin;
        async move {
            eventually(Duration::from_secs(30), "a replica ready", || async {
                matches!(
                    tidepool_e2e::procs::http_get(admin, "/readyz").await,
                    Ok((200, _))
                )
                .then_some(())
            })
            .await
        }
    };
    ready(&a).await.with_context(|| a.proc.log())?;
    ready(&b).await.with_context(|| b.proc.log())?;
    let secret = secrets.get("tidepool-control-ca").await?;
    let data = secret.data.context("the Secret is still empty")?;
    let ca = String::from_utf8(data["ca.crt"].0.clone())?;
    assert_eq!(ca.matches("BEGIN CERTIFICATE").count(), 1);
    assert!(!data.contains_key("next.crt"));
    // Both serve certificates from that one CA: the bundle verifies both,
    // and the standby answers over TLS that it is not the leader.
    a.refresh_ca().await?;
    assert_eq!(std::fs::read_to_string(&a.ca_file)?, ca);
    let token = agent_token(&client, &ns, AGENT_SA, &n1).await?;
    eventually(Duration::from_secs(30), "one replica leading", || async {
        let (ra, rb) = (a.wait_leading_once().await, b.wait_leading_once().await);
        (ra != rb).then_some(())
    })
    .await?;
    let mut answers = Vec::new();
    for op in [&a, &b] {
        let join = Join {
            url: format!("https://{}", op.control),
            tls: a.join().tls,
        };
        answers.push(open_at(&join, &n1, &[&bearer(&token)]).await);
    }
    let leaders = answers.iter().filter(|r| r.is_ok()).count();
    let standby = answers
        .iter()
        .filter(|r| matches!(r, Err(s) if s.code() == Code::Unavailable && s.message().contains("not the leader")))
        .count();
    assert_eq!((leaders, standby), (1, 1), "{answers:?}");
    let created = [&a, &b]
        .iter()
        .filter(|op| plain(&op.proc.log()).contains("created the control CA"))
        .count();
    assert_eq!(created, 1, "both replicas claim to have created the CA");
    Ok(())
}

#[tokio::test]
async fn a_ca_secret_with_garbage_stops_the_operator_naming_it() -> Result<()> {
    let (ns, client) = world("garbage", 1).await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let garbage = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("tidepool-control-ca".into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([
            (
                "ca.crt".to_string(),
                ByteString(
                    b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"
                        .to_vec(),
                ),
            ),
            ("ca.key".to_string(), ByteString(b"hello".to_vec())),
        ])),
        ..Default::default()
    };
    secrets.create(&PostParams::default(), &garbage).await?;
    let kubeconfig = cluster()?.kubeconfig().to_path_buf();
    let mut op = Operator::spawn_as(&options(&ns, &[]), &kubeconfig).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while op.proc.is_running() {
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the operator kept running over a garbage CA:\n{}",
                op.proc.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = op.proc.log();
    assert!(
        log.contains(&format!("Secret {ns}/tidepool-control-ca key \"ca.crt\""))
            && log.contains("never mints a second CA"),
        "{log}"
    );
    // Nothing was written over it.
    let after = secrets.get("tidepool-control-ca").await?;
    assert_eq!(after.data, garbage.data);
    Ok(())
}
