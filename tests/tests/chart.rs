//! The Helm chart, with the real helm: it lints, renders restricted and
//! least-privilege objects, refuses bad values by name, and installs into a
//! real API server. (Its own test binary, so its cluster has no CRD that
//! helm did not install.)

use anyhow::{Context, Result, bail};
use serde_yaml::Value;
use tidepool_e2e::helm::{chart_dir as chart, helm};
use tidepool_e2e::{TestNamespace, kubectl, kubectl_stdin};

/// `helm template` with `extra` arguments, parsed into documents.
async fn render(extra: &[&str]) -> Result<Vec<Value>> {
    render_in("tidepool-system", extra).await
}

/// `helm template` into namespace `ns`.
async fn render_in(ns: &str, extra: &[&str]) -> Result<Vec<Value>> {
    let chart = chart();
    let mut args = vec!["template", "tp", chart.as_str(), "--namespace", ns];
    args.extend_from_slice(extra);
    let out = helm(&args, false).await?;
    if !out.success {
        bail!("helm template failed: {}", out.stderr);
    }
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&out.stdout) {
        let v = Value::deserialize(doc)?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

use serde::Deserialize;

fn find<'a>(docs: &'a [Value], kind: &str, name_suffix: &str) -> &'a Value {
    docs.iter()
        .find(|d| {
            d["kind"] == kind
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with(name_suffix))
        })
        .unwrap_or_else(|| panic!("no {kind} named *{name_suffix} in the chart"))
}

#[tokio::test]
async fn lint_passes() -> Result<()> {
    let out = helm(&["lint", "--strict", &chart()], false).await?;
    assert!(
        out.success,
        "helm lint failed:\n{}{}",
        out.stdout, out.stderr
    );
    Ok(())
}

#[tokio::test]
async fn pods_meet_the_restricted_profile_with_probes_and_resources() -> Result<()> {
    let docs = render(&[]).await?;
    for (kind, name) in [("Deployment", "-operator"), ("DaemonSet", "-agent")] {
        let w = find(&docs, kind, name);
        let pod = &w["spec"]["template"]["spec"];
        assert_eq!(
            pod["securityContext"]["runAsNonRoot"],
            Value::Bool(true),
            "{kind}"
        );
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
            "{kind}"
        );
        for c in pod["containers"].as_sequence().expect("containers") {
            let sc = &c["securityContext"];
            assert_eq!(sc["allowPrivilegeEscalation"], Value::Bool(false), "{kind}");
            assert_eq!(sc["readOnlyRootFilesystem"], Value::Bool(true), "{kind}");
            assert_eq!(sc["capabilities"]["drop"][0], "ALL", "{kind}");
            assert!(
                c["resources"]["requests"]["cpu"].is_string(),
                "{kind} has no cpu request"
            );
            assert!(
                c["resources"]["limits"]["memory"].is_string(),
                "{kind} has no memory limit"
            );
            assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{kind}");
            assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{kind}");
        }
        for label in ["name", "instance", "version", "managed-by", "component"] {
            let key = format!("app.kubernetes.io/{label}");
            assert!(
                w["spec"]["template"]["metadata"]["labels"][key.as_str()].is_string(),
                "{kind} lacks {key}"
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn agent_runs_on_every_node_without_a_host_port_and_no_api_token() -> Result<()> {
    let docs = render(&[]).await?;
    let ds = find(&docs, "DaemonSet", "-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], Value::Bool(false));
    assert_eq!(pod["tolerations"][0]["operator"], "Exists");
    let c = &pod["containers"][0];
    // The way in is a node-local Service: no hostPort, so the successor
    // surges beside each agent.
    assert_eq!(c["ports"][0]["hostPort"], Value::Null);
    assert_eq!(c["ports"][0]["containerPort"], Value::from(15000));
    let rolling = &ds["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!(
        (
            rolling["maxSurge"].clone(),
            rolling["maxUnavailable"].clone()
        ),
        (Value::from(1), Value::from(0))
    );
    // With the hostPort path, one node's agent stops before its successor
    // starts (two cannot hold one host port).
    let docs = render(&["--set", "agent.hostPort=true"]).await?;
    let ds = find(&docs, "DaemonSet", "-agent");
    assert_eq!(
        ds["spec"]["template"]["spec"]["containers"][0]["ports"][0]["hostPort"],
        Value::from(15000)
    );
    let rolling = &ds["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!(
        (
            rolling["maxSurge"].clone(),
            rolling["maxUnavailable"].clone()
        ),
        (Value::Null, Value::from(1))
    );
    let docs = render(&[]).await?;
    let pod = &find(&docs, "DaemonSet", "-agent")["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let env = c["env"].as_sequence().expect("env");
    let field = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .map(|e| e["valueFrom"]["fieldRef"]["fieldPath"].clone())
            .unwrap_or(Value::Null)
    };
    assert_eq!(field("NODE_NAME"), "spec.nodeName");
    assert_eq!(field("HOST_IP"), "status.hostIP");
    let operator = env
        .iter()
        .find(|e| e["name"] == "TIDEPOOL_OPERATOR")
        .expect("TIDEPOOL_OPERATOR");
    assert_eq!(
        operator["value"],
        "https://tp-tidepool-operator.tidepool-system.svc:15010"
    );

    let threads = env
        .iter()
        .find(|e| e["name"] == "TIDEPOOL_WORKER_THREADS")
        .expect("TIDEPOOL_WORKER_THREADS");
    assert_eq!(threads["value"], "1", "the default is one worker thread");

    // Tolerations are configurable.
    let docs = render(&["--set", "agent.tolerations=null"]).await?;
    assert!(
        find(&docs, "DaemonSet", "-agent")["spec"]["template"]["spec"]["tolerations"].is_null()
    );

    // So is the number of worker threads (0: one per CPU).
    let docs = render(&["--set", "agent.workerThreads=0"]).await?;
    let env =
        &find(&docs, "DaemonSet", "-agent")["spec"]["template"]["spec"]["containers"][0]["env"];
    let threads = env
        .as_sequence()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "TIDEPOOL_WORKER_THREADS")
        .expect("TIDEPOOL_WORKER_THREADS");
    assert_eq!(threads["value"], "0");
    Ok(())
}

/// The chart's `logLevel` values must reach the binaries: the variable the
/// chart sets is the one each binary reads, so a bad value there stops the
/// binary at start, naming the value (a variable the binary ignored would
/// let it start, logging at its default).
#[tokio::test]
async fn log_levels_reach_the_binaries_and_a_bad_one_stops_them() -> Result<()> {
    let docs = render(&[
        "--set",
        "operator.logLevel=debug",
        "--set",
        "agent.logLevel=warn",
    ])
    .await?;
    let bins = tidepool_e2e::procs::bin_dir().await?;
    for (kind, suffix, level, binary, args) in [
        (
            "Deployment",
            "-operator",
            "debug",
            "tidepool-operator",
            &[][..],
        ),
        (
            "DaemonSet",
            "-agent",
            "warn",
            "tidepool-agent",
            &["--standalone", "/nonexistent/pools.yaml"][..],
        ),
    ] {
        let env = find(&docs, kind, suffix)["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_sequence()
            .expect("env")
            .clone();
        let var = env
            .iter()
            .find(|e| e["value"] == level)
            .and_then(|e| e["name"].as_str())
            .with_context(|| format!("the {kind} sets no variable to its logLevel {level:?}"))?
            .to_string();
        // Only the chart's variable is set; a binary that ignored it would
        // go on and fail later (no pools file, no cluster), or run: the
        // timeout ends that.
        let run = tokio::process::Command::new(bins.join(binary))
            .args(args)
            .env_remove("TIDEPOOL_LOG")
            .env("KUBECONFIG", "/nonexistent/kubeconfig")
            .env(&var, "verbose")
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(std::time::Duration::from_secs(20), run)
            .await
            .with_context(|| format!("{binary} with {var}=verbose still ran after 20 s"))?
            .with_context(|| format!("running {binary}"))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("\"verbose\""),
            "{binary} with {var}=verbose (the variable the chart sets for logLevel) should refuse to start naming the value; exit {:?}, stderr:\n{stderr}",
            out.status.code()
        );
    }
    Ok(())
}

/// Both operator replicas are Ready when warm, so the control Service must
/// not route by readiness alone: it selects the leader's role label, which
/// the operator writes on its own pod (`TIDEPOOL_POD_NAME`).
#[tokio::test]
async fn the_control_service_routes_agents_to_the_leader_only() -> Result<()> {
    let docs = render(&[]).await?;
    let svc = find(&docs, "Service", "-operator");
    assert_eq!(svc["spec"]["selector"]["tidepool.dev/role"], "leader");
    assert_eq!(
        svc["spec"]["selector"]["app.kubernetes.io/component"],
        "operator"
    );
    let env =
        &find(&docs, "Deployment", "-operator")["spec"]["template"]["spec"]["containers"][0]["env"];
    let pod = env
        .as_sequence()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "TIDEPOOL_POD_NAME")
        .context("the operator is not told its pod name, so it cannot label its role")?;
    assert_eq!(pod["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");
    Ok(())
}

#[tokio::test]
async fn rbac_grants_exactly_what_the_operator_calls() -> Result<()> {
    let docs = render(&[]).await?;
    let rules = |d: &Value| -> Vec<String> {
        d["rules"]
            .as_sequence()
            .expect("rules")
            .iter()
            .flat_map(|r| {
                let groups: Vec<_> = r["apiGroups"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .map(|g| g.as_str().unwrap().to_owned())
                    .collect();
                let resources: Vec<_> = r["resources"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .map(|g| g.as_str().unwrap().to_owned())
                    .collect();
                let verbs: Vec<_> = r["verbs"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .map(|g| g.as_str().unwrap().to_owned())
                    .collect();
                let names: Vec<_> = r["resourceNames"]
                    .as_sequence()
                    .map(|n| n.iter().map(|x| x.as_str().unwrap().to_owned()).collect())
                    .unwrap_or_default();
                let names = if names.is_empty() {
                    String::new()
                } else {
                    format!("[{}]", names.join(","))
                };
                let mut out = Vec::new();
                for g in &groups {
                    for res in &resources {
                        out.push(format!("{g}/{res}{names}: {}", verbs.join(",")));
                    }
                }
                out
            })
            .collect()
    };
    let mut cluster_rules = rules(find(&docs, "ClusterRole", "-operator"));
    cluster_rules.sort();
    assert_eq!(
        cluster_rules,
        [
            "/nodes: list,watch",
            "/pods: list,watch",
            "/services: list,watch,create,patch,delete",
            "authentication.k8s.io/tokenreviews: create",
            "discovery.k8s.io/endpointslices: list,watch,create,patch,delete",
            "events.k8s.io/events: create,patch",
            "tidepool.dev/connectionpools/status: patch",
            "tidepool.dev/connectionpools: list,watch",
        ]
    );
    assert_eq!(
        rules(find(&docs, "Role", "-operator-leader")),
        [
            "coordination.k8s.io/leases: get,create,update",
            "/pods: patch",
            "/secrets[tp-tidepool-control-ca]: get,update",
            "/configmaps[tp-tidepool-control-ca]: get,update",
        ]
    );
    // No wildcard anywhere.
    let all = serde_yaml::to_string(&docs)?;
    assert!(
        !all.contains("'*'") && !all.contains("\"*\""),
        "a wildcard rule crept in"
    );
    Ok(())
}

#[tokio::test]
async fn the_control_stream_is_secured_by_the_chart_and_renders_reproducibly() -> Result<()> {
    // Two renders are byte-identical: no certificate or key is generated
    // at render time (the operator makes them).
    let chart = chart();
    let args = ["template", "tp", chart.as_str(), "--namespace", "tp"];
    let (a, b) = (helm(&args, false).await?, helm(&args, false).await?);
    assert!(a.success, "{}", a.stderr);
    assert_eq!(a.stdout, b.stdout, "helm template is not reproducible");
    let docs = render_in("tp", &[]).await?;
    // The CA objects exist, empty.
    for kind in ["Secret", "ConfigMap"] {
        let d = find(&docs, kind, "-control-ca");
        assert!(
            d.get("data").is_none() && d.get("stringData").is_none(),
            "{kind} has data"
        );
    }
    let spec = &find(&docs, "DaemonSet", "-agent")["spec"]["template"]["spec"];
    assert_eq!(spec["automountServiceAccountToken"], false);
    let sources = spec["volumes"]
        .as_sequence()
        .context("agent volumes")?
        .iter()
        .find(|v| v["name"] == "control")
        .context("no control volume")?["projected"]["sources"]
        .clone();
    let token = &sources[0]["serviceAccountToken"];
    assert_eq!(token["audience"], "control.tidepool.dev");
    assert_eq!(token["expirationSeconds"], 3600);
    assert_eq!(sources[1]["configMap"]["name"], "tp-tidepool-control-ca");
    let container = &spec["containers"][0];
    let mount = container["volumeMounts"]
        .as_sequence()
        .context("mounts")?
        .iter()
        .find(|m| m["name"] == "control")
        .context("control not mounted")?;
    assert!(
        mount.get("subPath").is_none(),
        "a subPath mount never updates"
    );
    let env = |name: &str| -> Option<String> {
        container["env"]
            .as_sequence()?
            .iter()
            .find(|e| e["name"] == name)?["value"]
            .as_str()
            .map(str::to_owned)
    };
    assert_eq!(
        env("TIDEPOOL_OPERATOR").as_deref(),
        Some("https://tp-tidepool-operator.tp.svc:15010")
    );
    assert_eq!(
        env("TIDEPOOL_OPERATOR_SERVER_NAME").as_deref(),
        Some("tp-tidepool-operator.tp.svc")
    );
    assert!(env("TIDEPOOL_INSECURE_CONTROL").is_none());
    // Settings follow values.
    let docs = render(&[
        "--set",
        "control.auth.audience=ctl.example",
        "--set",
        "control.auth.tokenExpirationSeconds=7200",
    ])
    .await?;
    let spec = &find(&docs, "DaemonSet", "-agent")["spec"]["template"]["spec"];
    let token = &spec["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(token["audience"], "ctl.example");
    assert_eq!(token["expirationSeconds"], 7200);
    let op_env =
        &find(&docs, "Deployment", "-operator")["spec"]["template"]["spec"]["containers"][0]["env"];
    assert!(
        op_env
            .as_sequence()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "TIDEPOOL_CONTROL_AUDIENCE" && e["value"] == "ctl.example")
    );
    Ok(())
}

#[tokio::test]
async fn bad_values_fail_naming_the_value() -> Result<()> {
    let cases = [
        (vec!["--set", "agent.proxyPort=70000"], "/agent/proxyPort"),
        (vec!["--set", "agent.proxyPort=grpc"], "/agent/proxyPort"),
        (
            vec!["--set", "agent.workerThreads=-1"],
            "/agent/workerThreads",
        ),
        (vec!["--set", "operator.replicas=0"], "/operator/replicas"),
        (
            vec!["--set", "operator.logLevel=loud"],
            "/operator/logLevel",
        ),
        (vec!["--set", "agent.hostPrt=true"], "hostPrt"),
        (
            vec!["--set", "operator.image.pullPolicy=Sometimes"],
            "/operator/image/pullPolicy",
        ),
        (
            vec!["--set", "operator.podDisruptionBudget.minAvailable=2"],
            "operator.podDisruptionBudget.minAvailable",
        ),
        (
            vec!["--set", "control.auth.tokenExpirationSeconds=60"],
            "/control/auth/tokenExpirationSeconds",
        ),
        (
            vec!["--set", "control.auth.audience="],
            "/control/auth/audience",
        ),
        (
            vec!["--set", "agent.drainDelaySeconds=30"],
            "agent.drainDelaySeconds (30) must be less than agent.terminationGracePeriodSeconds (30)",
        ),
        (
            vec!["--set", "agent.drainDelaySeconds=-1"],
            "/agent/drainDelaySeconds",
        ),
        // No value turns TLS or authentication off.
        (vec!["--set", "control.tls.enabled=false"], "tls"),
        (vec!["--set", "control.auth.enabled=false"], "enabled"),
    ];
    for (args, named) in cases {
        let chart = chart();
        let mut all = vec!["template", "tp", chart.as_str()];
        all.extend(args.iter().copied());
        let out = helm(&all, false).await?;
        assert!(!out.success, "{args:?} was accepted");
        assert!(
            out.stderr.contains(named),
            "{args:?}: the error does not name {named}: {}",
            out.stderr
        );
    }
    Ok(())
}

#[tokio::test]
async fn install_is_accepted_by_a_real_api_server_and_meets_restricted_pod_security() -> Result<()>
{
    let ns = TestNamespace::new("helm").await?;
    // PodSecurity admission evaluates workload templates in warn mode.
    kubectl(&[
        "label",
        "namespace",
        &ns.name,
        "pod-security.kubernetes.io/warn=restricted",
    ])
    .await?
    .ok()?;
    let warnings = |extra: &'static [&'static str]| {
        let ns = ns.name.clone();
        async move {
            let docs = render_in(&ns, extra).await?;
            let rendered = docs
                .iter()
                .filter(|d| d["kind"] == "Deployment" || d["kind"] == "DaemonSet")
                .map(serde_yaml::to_string)
                .collect::<Result<Vec<_>, _>>()?
                .join("---\n");
            let dry = kubectl_stdin(
                &["apply", "--dry-run=server", "-n", &ns, "-f", "-"],
                Some(&rendered),
            )
            .await?;
            anyhow::ensure!(dry.success, "{}", dry.stderr);
            Ok::<_, anyhow::Error>(
                dry.stderr
                    .lines()
                    .filter(|l| l.contains("PodSecurity"))
                    .map(str::to_owned)
                    .collect::<Vec<_>>(),
            )
        }
    };
    // By default everything is restricted. The hostPort path is the one
    // thing outside the restricted (indeed the baseline) profile.
    let default = warnings(&[]).await?;
    assert!(default.is_empty(), "{default:?}");
    let with = warnings(&["--set", "agent.hostPort=true"]).await?;
    assert_eq!(with.len(), 1, "{with:?}");
    assert!(
        with[0].contains("hostPort (container \"agent\" uses hostPort 15000)")
            && !with[0].contains(", "),
        "{with:?}"
    );

    let chart = chart();
    let out = helm(&["install", "tp", &chart, "--namespace", &ns.name], true).await?;
    assert!(out.success, "helm install failed: {}", out.stderr);
    assert!(
        out.stdout.contains("kubectl get connectionpools"),
        "NOTES.txt is missing:\n{}",
        out.stdout
    );
    for obj in [
        "crd/connectionpools.tidepool.dev",
        "clusterrole/tp-tidepool-operator",
        "clusterrolebinding/tp-tidepool-operator",
    ] {
        kubectl(&["get", obj])
            .await?
            .ok()
            .with_context(|| format!("{obj} was not created"))?;
    }
    for obj in [
        "deployment/tp-tidepool-operator",
        "daemonset/tp-tidepool-agent",
        "service/tp-tidepool-operator",
        "serviceaccount/tp-tidepool-operator",
        "serviceaccount/tp-tidepool-agent",
        "role/tp-tidepool-operator-leader",
        "rolebinding/tp-tidepool-operator-leader",
        "poddisruptionbudget/tp-tidepool-operator",
    ] {
        kubectl(&["get", "-n", &ns.name, obj])
            .await?
            .ok()
            .with_context(|| format!("{obj} was not created"))?;
    }
    // The CRD outlives an uninstall (resource-policy: keep).
    let out = helm(&["uninstall", "tp", "--namespace", &ns.name], true).await?;
    assert!(out.success, "helm uninstall failed: {}", out.stderr);
    kubectl(&["get", "crd/connectionpools.tidepool.dev"])
        .await?
        .ok()
        .context("uninstall removed the CRD")?;
    Ok(())
}
