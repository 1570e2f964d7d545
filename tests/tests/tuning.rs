//! Tuning advice on the local control plane: a real agent observes a load
//! of known concurrency through it (37 streams held open against
//! `maxStreams: 20`) on a real gRPC backend that advertises 100 streams
//! per connection, the real operator advises from its reports, `kubectl`
//! shows the advice, and `spec.tuning.mode: Apply` runs it live while
//! calls and the 37 streams go on, with no call failed.
//!
//! The windows are short for a test: agents observe over 20 s
//! (`--observe-window`), the operator advises after 10 s (`--advice-after`)
//! and applies at most every 5 s (`--tuning-interval`).
#![allow(clippy::disallowed_types)] // std::time::Instant: wall-clock deadlines against real processes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use kube::api::Api;
use tidepool_crds::ConnectionPool;
use tidepool_e2e::grpc;
use tidepool_e2e::objects::{apply_service, apply_slice};
use tidepool_e2e::procs::{Agent, Operator, OperatorOptions, eventually, free_port, published};
use tidepool_e2e::{kubectl, kubectl_stdin, setup};

/// The streams the load holds open at once.
const STREAMS: usize = 37;
/// What the backend advertises per connection.
const SERVER_MAX_STREAMS: u32 = 100;

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[tokio::test]
async fn a_known_load_gets_the_expected_advice_and_apply_runs_it_without_a_failed_call()
-> Result<()> {
    let (ns, client) = setup::world("tuning", 1).await?;
    // One backend advertising 100 streams, behind Service `api`.
    let port = free_port("127.0.0.2")?;
    let backend = grpc::start_backend_with(
        format!("127.0.0.2:{port}").parse()?,
        Duration::from_millis(200),
        Some(SERVER_MAX_STREAMS),
    )
    .await?;
    apply_service(&client, &ns, "api", &[("grpc", 50051)]).await?;
    apply_slice(
        &client,
        &ns,
        "api",
        "api-2",
        "grpc",
        port,
        &[(&published("127.0.0.2"), true)],
    )
    .await?;
    let mut options = OperatorOptions::new(&ns);
    options.extra = vec!["--advice-after=10s".into(), "--tuning-interval=5s".into()];
    let operator = Operator::start(&options).await?;
    let token = {
        let (ns, sa) = (&operator.options.namespace, &operator.options.agent_sa);
        tidepool_e2e::identity::apply_service_account(&client, ns, sa).await?;
        tidepool_e2e::identity::agent_token(&client, ns, sa, &setup::node(ns, 1)).await?
    };
    let agent = Agent::start_with(
        &operator.join(),
        &setup::node(&ns, 1),
        "127.0.9.1",
        Some(&token),
        &["--observe-window=20s".into()],
    )
    .await?;
    operator.wait_connected(1, Duration::from_secs(30)).await?;
    let explain = |e: anyhow::Error| {
        e.context(format!(
            "operator log:\n{}\nagent log:\n{}",
            tail(&operator.proc.log()),
            tail(&agent.proc.log())
        ))
    };
    setup::apply_pool(&ns, "").await?;
    let pools = Api::<ConnectionPool>::namespaced(client.clone(), &ns);
    setup::condition(&pools, "api", "Ready", "True", Duration::from_secs(20))
        .await
        .map_err(explain)?;
    let authority = format!("api.{ns}");

    // Before any traffic has been observed for 10 s: no advice, and the
    // column says so.
    let p = pools.get("api").await?;
    let summary = p
        .status
        .and_then(|s| s.recommendation)
        .map(|r| r.summary)
        .unwrap_or_default();
    assert!(summary.starts_with("observing"), "{summary}");

    // The load: 37 watches held open through the agent, and unary calls
    // beside them, counted.
    let channel = grpc::streaming_channel(agent.proxy, &authority)?;
    let mut watches = Vec::new();
    for _ in 0..STREAMS {
        watches.push(grpc::watch(&channel).await?);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (calls, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let unary = {
        let (stop, calls, failed) = (stop.clone(), calls.clone(), failed.clone());
        let channel = grpc::channel(agent.proxy, &authority)?;
        tokio::spawn(async move {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                calls.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = grpc::try_check(&channel).await {
                    failed.fetch_add(1, Ordering::Relaxed);
                    errors.push(format!("{}: {}", e.code(), e.message()));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            errors
        })
    };

    // The advice, once 10 s are observed: 37 streams need one connection
    // at the server's 100 (two at the spec's 20); size 2 is 2× headroom.
    let p = eventually(
        Duration::from_secs(60),
        "an advice with settings",
        || async {
            let p = pools.get("api").await.ok()?;
            p.status
                .as_ref()?
                .recommendation
                .as_ref()?
                .size
                .is_some()
                .then_some(p)
        },
    )
    .await
    .map_err(explain)?;
    let r = p.status.unwrap().recommendation.unwrap();
    assert_eq!(
        (r.size, r.max_idle, r.max_streams),
        (Some(2), Some(1), Some(100)),
        "{r:?}"
    );
    assert_eq!(r.summary, "size 100→2, maxIdle 50→1, maxStreams 20→100");
    let reasons = r.reasons.unwrap();
    // 37 watches, and the one unary call the load has in flight at a time.
    assert!(
        ["peak 37 ", "peak 38 "]
            .iter()
            .any(|p| reasons.size.starts_with(p))
            && reasons.size.contains("concurrent streams per address over"),
        "{reasons:?}"
    );
    assert!(
        reasons.size.contains("(2 in use at peak, of size 100)"),
        "{reasons:?}"
    );
    assert_eq!(
        reasons.max_streams,
        "server advertises 100 streams per connection; maxStreams 20 forces 5× the connections"
    );

    // Where people see it: the ADVICE column, describe, an Event.
    let table = kubectl(&["get", "cpool", "-n", &ns]).await?.ok()?;
    println!("$ kubectl get cpool\n{table}");
    assert!(
        table.lines().next().unwrap_or("").contains("ADVICE"),
        "{table}"
    );
    assert!(
        table.contains("size 100→2, maxIdle 50→1, maxStreams 20→100"),
        "{table}"
    );
    let described = kubectl(&["describe", "cpool", "api", "-n", &ns])
        .await?
        .ok()?;
    println!("$ kubectl describe cpool api\n{described}");
    assert!(
        described.contains("Recommendation:") && described.contains("AdviceDiffers"),
        "{described}"
    );
    let events = eventually(
        Duration::from_secs(20),
        "an AdviceChanged event",
        || async {
            let out = kubectl(&[
                "get",
                "events",
                "-n",
                &ns,
                "--field-selector",
                "reason=AdviceChanged",
                "-o",
                "name",
            ])
            .await
            .ok()?
            .ok()
            .ok()?;
            (!out.trim().is_empty()).then_some(out)
        },
    )
    .await
    .map_err(explain)?;
    assert!(!events.is_empty());

    // Apply, within bounds: the agent runs the advice live.
    kubectl_stdin(
        &["apply", "-f", "-"],
        Some(&format!(
            "apiVersion: tidepool.dev/v1alpha1\nkind: ConnectionPool\nmetadata: {{name: api, namespace: {ns}}}\nspec:\n  target: {{service: {{name: api, port: grpc}}}}\n  tuning: {{mode: Apply, size: {{min: 1, max: 50}}}}\n"
        )),
    )
    .await?
    .ok()?;
    eventually(
        Duration::from_secs(30),
        "the agent running size 2, maxIdle 1, maxStreams 100",
        || async {
            let p = agent.pool(&ns, "api").await?;
            let s = &p["settings"];
            (s["size"] == 2 && s["maxIdle"] == 1 && s["maxStreams"] == 100).then_some(())
        },
    )
    .await
    .map_err(explain)?;
    let p = setup::condition(&pools, "api", "Tuned", "True", Duration::from_secs(30))
        .await
        .map_err(explain)?;
    let status = p.status.unwrap();
    let tuned = status.tuned.context("status.tuned after Apply")?;
    assert_eq!((tuned.size, tuned.max_idle, tuned.max_streams), (2, 1, 100));
    assert_eq!(status.recommendation.unwrap().summary, "ok");
    assert_eq!(p.spec.size, 100, "the spec stays as written");

    // Every stream of the load survived the change: each watch still gets
    // the backend's flips.
    for (i, w) in watches.iter_mut().enumerate() {
        match tokio::time::timeout(Duration::from_secs(5), w.message()).await {
            Ok(Ok(Some(_))) => {}
            other => bail!("watch {i} after the apply: {other:?}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let errors = unary.await?;
    let (calls, failed) = (
        calls.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    println!("unary calls during observation and apply: {calls}, failed {failed}");
    assert!(calls > 100, "the load ran: {calls} calls");
    assert_eq!(failed, 0, "no call may fail across the apply: {errors:?}");

    // Bounds that cross are refused at admission, naming both fields.
    let refused = kubectl_stdin(
        &["apply", "-f", "-"],
        Some(&format!(
            "apiVersion: tidepool.dev/v1alpha1\nkind: ConnectionPool\nmetadata: {{name: api, namespace: {ns}}}\nspec:\n  target: {{service: {{name: api, port: grpc}}}}\n  tuning: {{mode: Apply, size: {{min: 8, max: 4}}}}\n"
        )),
    )
    .await?;
    assert!(!refused.success);
    assert!(
        refused
            .stderr
            .contains("spec.tuning.size.min must be less than or equal to spec.tuning.size.max"),
        "{}",
        refused.stderr
    );
    drop(watches);
    backend.stop();
    Ok(())
}
