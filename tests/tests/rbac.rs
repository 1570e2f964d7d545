//! The chart grants the operator what it needs: `helm install` the chart,
//! run the operator as the chart's own ServiceAccount (a token from the
//! TokenRequest API; the API server authorizes with RBAC) and run its main
//! scenario — a pool over a Service reaches every agent and its status turns
//! Ready. Then take away a rule the code needs and see the operator fail
//! with a permissions error. (Its own test binary: helm installs the CRD.)

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};
use kube::api::Api;
use tidepool_crds::ConnectionPool;
use tidepool_e2e::grpc;
use tidepool_e2e::helm::{chart_dir, helm};
use tidepool_e2e::procs::{Agent, Operator, OperatorOptions, eventually};
use tidepool_e2e::setup;
use tidepool_e2e::{TestNamespace, cluster, kubectl, kubectl_stdin};

const SA: &str = "tp-tidepool-operator";

/// A kubeconfig that authenticates as ServiceAccount `sa` in `ns` with a
/// token from the TokenRequest API, for the same server as the admin's.
async fn service_account_kubeconfig(dir: &Path, ns: &str, sa: &str) -> Result<PathBuf> {
    let token = kubectl(&["create", "token", sa, "-n", ns, "--duration=1h"])
        .await?
        .ok()?;
    let admin: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(cluster()?.kubeconfig())?)?;
    let server = admin["clusters"][0]["cluster"]["server"]
        .as_str()
        .context("no server")?;
    let ca = admin["clusters"][0]["cluster"]["certificate-authority-data"]
        .as_str()
        .context("no CA")?;
    let config = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: '{server}', certificate-authority-data: '{ca}'}}\n\
         users:\n- name: {sa}\n  user: {{token: '{}'}}\ncontexts:\n- name: c\n  context: {{cluster: c, user: {sa}, namespace: {ns}}}\ncurrent-context: c\n",
        token.trim()
    );
    let path = dir.join(format!("{sa}.kubeconfig"));
    std::fs::write(&path, config)?;
    Ok(path)
}

async fn helm_install(ns: &str) -> Result<()> {
    helm(&["install", "tp", &chart_dir(), "--namespace", ns], true)
        .await?
        .ok()
        .context("helm install failed")?;
    Ok(())
}

#[tokio::test]
async fn the_chart_grants_the_operator_enough_and_a_missing_rule_shows() -> Result<()> {
    let ns = TestNamespace::new("rbac").await?.name;
    helm_install(&ns).await?;
    let client = cluster()?.client().await?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = service_account_kubeconfig(dir.path(), &ns, SA).await?;

    // The chart's identity is not the admin: it may not, say, read Secrets.
    let can = kubectl(&[
        "auth",
        "can-i",
        "list",
        "secrets",
        "-n",
        &ns,
        "--as",
        &format!("system:serviceaccount:{ns}:{SA}"),
    ])
    .await?;
    assert_eq!(can.stdout.trim(), "no");
    // What the control stream needs, and not a byte more: reviews, and the
    // one CA Secret and ConfigMap by name.
    let me = format!("system:serviceaccount:{ns}:{SA}");
    for (verb, what, want) in [
        ("create", "tokenreviews.authentication.k8s.io", "yes"),
        ("get", "secret/tp-tidepool-control-ca", "yes"),
        ("update", "secret/tp-tidepool-control-ca", "yes"),
        ("get", "configmap/tp-tidepool-control-ca", "yes"),
        ("get", "secret/some-other-secret", "no"),
        ("update", "secret/some-other-secret", "no"),
        ("create", "secrets", "no"),
        ("delete", "secret/tp-tidepool-control-ca", "no"),
        ("list", "configmaps", "no"),
    ] {
        let can = kubectl(&["auth", "can-i", verb, what, "-n", &ns, "--as", &me]).await?;
        assert_eq!(can.stdout.trim(), want, "can-i {verb} {what}");
    }

    // The world: two nodes, one backend behind Service `api`.
    setup::add_nodes(&client, &ns, 1..=2).await?;
    let _backend = setup::backends_behind_service(&client, &ns, 1).await?;

    let options = OperatorOptions {
        // The chart's own objects and ServiceAccount.
        ca_name: "tp-tidepool-control-ca".into(),
        agent_sa: "tp-tidepool-agent".into(),
        ..OperatorOptions::new(&ns)
    };
    let operator = Operator::spawn_as(&options, &kubeconfig).await?;
    operator.wait_ready().await?;
    let agents = setup::start_agents(&operator, 250, 1..=2).await?;
    setup::apply_pool(&ns, "").await?;

    // The main scenario, as the chart's ServiceAccount.
    let api: Api<ConnectionPool> = Api::namespaced(client.clone(), &ns);
    let pool = setup::condition(&api, "api", "Ready", "True", Duration::from_secs(30))
        .await
        .with_context(|| format!("operator log:\n{}", operator.proc.log()))?;
    let agents_status = pool
        .status
        .as_ref()
        .and_then(|s| s.agents.clone())
        .context("no agents in status")?;
    assert_eq!((agents_status.desired, agents_status.synced), (2, 2));
    for agent in &agents {
        let channel = grpc::channel(agent.proxy, &format!("api.{ns}:50051"))?;
        grpc::check(&channel)
            .await
            .with_context(|| format!("a call through {} failed", agent.node))?;
    }
    // It created Events and took its Lease as that identity.
    kubectl(&["get", "lease", "-n", &ns, "tidepool-operator"])
        .await?
        .ok()
        .context("no Lease")?;

    // helm upgrade (before any rule is changed by hand, which would
    // conflict with Helm's server-side apply) leaves the CA the operator wrote (the chart never sets
    // its data), and the agents stay connected.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &ns);
    let ca_before = secrets.get("tp-tidepool-control-ca").await?.data;
    assert!(
        ca_before.as_ref().is_some_and(|d| d.contains_key("ca.crt")),
        "the operator did not fill the CA Secret"
    );
    helm(
        &[
            "upgrade",
            "tp",
            &chart_dir(),
            "--namespace",
            &ns,
            "--set",
            "operator.logLevel=debug",
        ],
        true,
    )
    .await?
    .ok()
    .context("helm upgrade failed")?;
    assert_eq!(
        secrets.get("tp-tidepool-control-ca").await?.data,
        ca_before,
        "helm upgrade changed the CA"
    );
    let cm: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client.clone(), &ns);
    assert!(
        cm.get("tp-tidepool-control-ca")
            .await?
            .data
            .is_some_and(|d| d.contains_key("ca.crt"))
    );
    assert_eq!(
        operator
            .metric("tidepool_operator_connected_agents")
            .await?,
        2.0
    );

    // Take away the status rule: the operator can no longer write status,
    // and says so with a permissions error; nothing else breaks.
    let role = kubectl(&["get", "clusterrole", SA, "-o", "json"])
        .await?
        .ok()?;
    let mut role: serde_json::Value = serde_json::from_str(&role)?;
    let rules = role["rules"].as_array_mut().context("rules")?;
    let before = rules.len();
    rules.retain(|r| r["resources"] != serde_json::json!(["connectionpools/status"]));
    assert_eq!(
        rules.len(),
        before - 1,
        "the chart's ClusterRole has no connectionpools/status rule"
    );
    kubectl_stdin(&["replace", "-f", "-"], Some(&role.to_string()))
        .await?
        .ok()?;

    let status_before = api.get("api").await?.status;
    kubectl(&[
        "patch",
        "cpool",
        "api",
        "-n",
        &ns,
        "--type=merge",
        "-p",
        r#"{"spec":{"maxStreams":7}}"#,
    ])
    .await?
    .ok()?;
    eventually(
        Duration::from_secs(30),
        "a permissions error in the operator's log",
        || async {
            let log = operator.proc.log();
            (log.contains("forbidden") || log.contains("Forbidden")).then_some(())
        },
    )
    .await
    .with_context(|| format!("operator log:\n{}", operator.proc.log()))?;
    let log = operator.proc.log();
    assert!(
        log.contains("connectionpools/status") || log.contains("status"),
        "the error does not say what was refused:\n{log}"
    );
    // Status stayed as it was: the write was refused, not half-done.
    let after = api.get("api").await?;
    assert_eq!(
        after.status.as_ref().and_then(|s| s.observed_generation),
        status_before.and_then(|s| s.observed_generation)
    );
    // The agents still got the new settings: only status writing needs that rule.
    for agent in &agents {
        eventually(
            Duration::from_secs(10),
            "the agent applying maxStreams 7",
            || async {
                let p = agent.pool(&ns, "api").await?;
                p.to_string().contains("\"maxStreams\":7").then_some(())
            },
        )
        .await?;
    }

    // Take away the tokenreviews rule: a new agent is refused, and the
    // operator says which permission it lacks; the agents already in stay.
    let role = kubectl(&["get", "clusterrole", SA, "-o", "json"])
        .await?
        .ok()?;
    let mut role: serde_json::Value = serde_json::from_str(&role)?;
    let rules = role["rules"].as_array_mut().context("rules")?;
    let before = rules.len();
    rules.retain(|r| r["resources"] != serde_json::json!(["tokenreviews"]));
    assert_eq!(
        rules.len(),
        before - 1,
        "the chart's ClusterRole has no tokenreviews rule"
    );
    kubectl_stdin(&["replace", "-f", "-"], Some(&role.to_string()))
        .await?
        .ok()?;
    setup::add_nodes(&client, &ns, 3..=3).await?;
    let late = Agent::start(&operator, &format!("{ns}-n3"), "127.0.250.3").await?;
    eventually(
        Duration::from_secs(30),
        "the late agent refused for lack of a review",
        || async {
            let log = late.proc.log();
            (log.contains("Unavailable")
                && log.contains("could not be reviewed")
                && log.contains("forbidden"))
            .then_some(())
        },
    )
    .await
    .with_context(|| {
        format!(
            "agent log:\n{}\noperator log:\n{}",
            late.proc.log(),
            operator.proc.log()
        )
    })?;
    assert_eq!(
        operator
            .metric("tidepool_operator_connected_agents")
            .await?,
        2.0
    );

    // helm uninstall removes the CA objects with the release.
    helm(&["uninstall", "tp", "--namespace", &ns], true)
        .await?
        .ok()
        .context("helm uninstall failed")?;
    assert!(
        secrets.get_opt("tp-tidepool-control-ca").await?.is_none(),
        "the CA Secret outlived the release"
    );
    assert!(
        cm.get_opt("tp-tidepool-control-ca").await?.is_none(),
        "the CA ConfigMap outlived the release"
    );
    Ok(())
}
