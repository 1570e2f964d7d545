//! The ConnectionPool API on a real kube-apiserver, through the real kubectl:
//! the CRD from the chart installs, the example applies, printer columns and
//! `kubectl explain` read well, bad resources are refused with messages that
//! name the field, and a status written by server-side apply shows.

use anyhow::Result;
use kube::api::{Api, Patch, PatchParams};
use tidepool_crds::ConnectionPool;
use tidepool_e2e::{TestNamespace, cluster, ensure_crd, kubectl, kubectl_stdin, repo_root};

/// A pool manifest named `name` with the given `spec` lines (YAML, indented
/// by four spaces under `spec:`).
fn manifest(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: tidepool.dev/v1alpha1\nkind: ConnectionPool\nmetadata:\n  name: {name}\nspec:\n{spec}\n"
    )
}

const TARGET: &str = "    target: {service: {name: payments-grpc, port: 50051}}";

#[tokio::test]
async fn crd_installs_from_the_chart_with_status_and_short_name() -> Result<()> {
    ensure_crd().await?;
    let out = kubectl(&[
        "get",
        "crd",
        "connectionpools.tidepool.dev",
        "-o",
        "jsonpath={.spec.names.shortNames[0]} {.spec.scope} {.spec.versions[0].name} {.spec.versions[0].subresources.status} {.status.conditions[?(@.type==\"Established\")].status}",
    ])
    .await?
    .ok()?;
    assert_eq!(out, "cpool Namespaced v1alpha1 {} True");
    Ok(())
}

#[tokio::test]
async fn example_applies_and_defaults_fill_in() -> Result<()> {
    ensure_crd().await?;
    let ns = TestNamespace::new("example").await?;
    let example = std::fs::read_to_string(repo_root().join("examples/connectionpool.yaml"))?;
    let example = example.replace("namespace: shop", &format!("namespace: {}", ns.name));
    kubectl_stdin(&["apply", "-f", "-"], Some(&example))
        .await?
        .ok()?;

    // A minimal pool gets go-micro's defaults from the schema.
    kubectl_stdin(
        &["apply", "-n", &ns.name, "-f", "-"],
        Some(&manifest("minimal", TARGET)),
    )
    .await?
    .ok()?;
    let got = kubectl(&[
        "get",
        "cpool",
        "minimal",
        "-n",
        &ns.name,
        "-o",
        "jsonpath={.spec.size} {.spec.ttl} {.spec.maxStreams} {.spec.whenFull} {.spec.acquireTimeout}",
    ])
    .await?
    .ok()?;
    assert_eq!(got, "100 1m 20 Overflow 1s");
    Ok(())
}

#[tokio::test]
async fn get_prints_the_pool_health_columns() -> Result<()> {
    ensure_crd().await?;
    let ns = TestNamespace::new("columns").await?;
    kubectl_stdin(
        &["apply", "-n", &ns.name, "-f", "-"],
        Some(&manifest("payments", TARGET)),
    )
    .await?
    .ok()?;
    let out = kubectl(&["get", "connectionpools", "-n", &ns.name])
        .await?
        .ok()?;
    let header: Vec<&str> = out
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "NAME",
            "TARGET",
            "SIZE",
            "STREAMS",
            "CONNECTIONS",
            "SYNCED",
            "DESIRED",
            "READY",
            "LOCAL",
            "ADVICE",
            "AGE"
        ]
    );
    assert!(
        out.lines()
            .nth(1)
            .unwrap_or_default()
            .starts_with("payments "),
        "{out}"
    );
    Ok(())
}

#[tokio::test]
async fn explain_teaches_every_field() -> Result<()> {
    ensure_crd().await?;
    let cases = [
        ("connectionpool.spec.ttl", "How long a connection lives"),
        (
            "connectionpool.spec.size",
            "Connections kept per backend address",
        ),
        ("connectionpool.spec.maxIdle", "Idle connections"),
        (
            "connectionpool.spec.maxStreams",
            "SETTINGS_MAX_CONCURRENT_STREAMS",
        ),
        ("connectionpool.spec.whenFull", "RESOURCE_EXHAUSTED"),
        (
            "connectionpool.spec.target.service.port",
            "name of one of the",
        ),
        (
            "connectionpool.spec.target.addresses",
            "IPv6 hosts in brackets",
        ),
        ("connectionpool.status.addresses", "at most 50 entries"),
        ("connectionpool.spec.clients", "PERMISSION_DENIED"),
        (
            "connectionpool.spec.clients.namespaces",
            "an empty list is not",
        ),
        (
            "connectionpool.spec.nodeLocalService",
            "internalTrafficPolicy: Local",
        ),
        (
            "connectionpool.spec.nodeLocalService.port",
            "they may not share a `listenPort`",
        ),
    ];
    // The API server publishes a new CRD's OpenAPI a moment after it is
    // Established; wait for it (bounded) before reading descriptions.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while !kubectl(&["explain", "connectionpool"]).await?.success {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the CRD's OpenAPI was not published within 30s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    for (field, words) in cases {
        let out = kubectl(&["explain", field]).await?.ok()?;
        // kubectl wraps descriptions; compare with whitespace collapsed.
        let flat = out.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            flat.contains(words),
            "kubectl explain {field} lacks {words:?}:\n{out}"
        );
    }
    Ok(())
}

/// Each bad spec, and the field the API server's message must name.
const INVALID: &[(&str, &str, &str)] = &[
    (
        "size-zero",
        "    target: {addresses: ['10.0.0.1:50051']}\n    size: 0",
        "spec.size",
    ),
    (
        "size-string",
        "    target: {addresses: ['10.0.0.1:50051']}\n    size: ten",
        "spec.size",
    ),
    (
        "streams-zero",
        "    target: {addresses: ['10.0.0.1:50051']}\n    maxStreams: 0",
        "spec.maxStreams",
    ),
    (
        "idle-negative",
        "    target: {addresses: ['10.0.0.1:50051']}\n    maxIdle: -1",
        "spec.maxIdle",
    ),
    (
        "idle-over-size",
        "    target: {addresses: ['10.0.0.1:50051']}\n    size: 10\n    maxIdle: 20",
        "spec.maxIdle",
    ),
    (
        "ttl-short",
        "    target: {addresses: ['10.0.0.1:50051']}\n    ttl: 500ms",
        "spec.ttl",
    ),
    (
        "ttl-garbage",
        "    target: {addresses: ['10.0.0.1:50051']}\n    ttl: forever",
        "spec.ttl",
    ),
    (
        "timeout-garbage",
        "    target: {addresses: ['10.0.0.1:50051']}\n    acquireTimeout: soon",
        "spec.acquireTimeout",
    ),
    (
        "listen-port",
        "    target: {addresses: ['10.0.0.1:50051']}\n    listenPort: 70000",
        "spec.listenPort",
    ),
    (
        "when-full",
        "    target: {addresses: ['10.0.0.1:50051']}\n    whenFull: Sometimes",
        "spec.whenFull",
    ),
    (
        "svc-port-zero",
        "    target: {service: {name: s, port: 0}}",
        "spec.target.service.port",
    ),
    (
        "svc-port-high",
        "    target: {service: {name: s, port: 65536}}",
        "spec.target.service.port",
    ),
    (
        "svc-port-name",
        "    target: {service: {name: s, port: Not_A_Name}}",
        "spec.target.service.port",
    ),
    (
        "both-targets",
        "    target: {service: {name: s, port: 80}, addresses: ['10.0.0.1:50051']}",
        "spec.target",
    ),
    ("no-target", "    target: {}", "spec.target"),
    (
        "empty-addresses",
        "    target: {addresses: []}",
        "spec.target.addresses",
    ),
    (
        "ipv6-unbracketed",
        "    target: {addresses: ['fd00::7:50051']}",
        "spec.target.addresses[0]",
    ),
    (
        "address-port-zero",
        "    target: {addresses: ['10.0.0.1:50051', '10.0.0.2:0']}",
        "spec.target.addresses[1]",
    ),
    (
        "address-no-port",
        "    target: {addresses: ['10.0.0.1']}",
        "spec.target.addresses[0]",
    ),
    (
        "address-duplicate",
        "    target: {addresses: ['10.0.0.1:50051', '10.0.0.1:50051']}",
        "spec.target.addresses[1]",
    ),
    (
        "clients-empty",
        "    target: {addresses: ['10.0.0.1:50051']}\n    clients: {namespaces: []}",
        "spec.clients.namespaces",
    ),
    (
        "clients-no-list",
        "    target: {addresses: ['10.0.0.1:50051']}\n    clients: {}",
        "spec.clients.namespaces",
    ),
    (
        "clients-upper-case",
        "    target: {addresses: ['10.0.0.1:50051']}\n    clients: {namespaces: [shop, Billing]}",
        "spec.clients.namespaces[1]",
    ),
    (
        "clients-underscore",
        "    target: {addresses: ['10.0.0.1:50051']}\n    clients: {namespaces: [my_shop]}",
        "spec.clients.namespaces[0]",
    ),
    (
        "clients-too-long",
        "    target: {addresses: ['10.0.0.1:50051']}\n    clients: {namespaces: [aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa]}",
        "spec.clients.namespaces[0]",
    ),
    (
        "clients-duplicate",
        "    target: {addresses: ['10.0.0.1:50051']}\n    clients: {namespaces: [shop, billing, shop]}",
        "spec.clients.namespaces[2]",
    ),
    (
        "clients-not-a-list",
        "    target: {addresses: ['10.0.0.1:50051']}\n    clients: {namespaces: shop}",
        "spec.clients.namespaces",
    ),
    (
        "clients-unknown-field",
        "    target: {addresses: ['10.0.0.1:50051']}\n    clients: {namespace: [shop]}",
        "spec.clients.namespace",
    ),
    (
        "local-no-listen-port",
        "    target: {addresses: ['10.0.0.1:50051']}\n    nodeLocalService: {name: pooled}",
        "spec.nodeLocalService",
    ),
    (
        "local-own-backend",
        "    target: {service: {name: payments, port: 50051}}\n    listenPort: 16001\n    nodeLocalService: {name: payments}",
        "spec.nodeLocalService.name",
    ),
    (
        "local-bad-name",
        "    target: {addresses: ['10.0.0.1:50051']}\n    listenPort: 16001\n    nodeLocalService: {name: 1pooled}",
        "spec.nodeLocalService.name",
    ),
    (
        "local-name-too-long",
        "    target: {addresses: ['10.0.0.1:50051']}\n    listenPort: 16001\n    nodeLocalService: {name: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa}",
        "spec.nodeLocalService.name",
    ),
    (
        "local-port-zero",
        "    target: {addresses: ['10.0.0.1:50051']}\n    listenPort: 16001\n    nodeLocalService: {name: pooled, port: 0}",
        "spec.nodeLocalService.port",
    ),
    (
        "local-port-too-big",
        "    target: {addresses: ['10.0.0.1:50051']}\n    listenPort: 16001\n    nodeLocalService: {name: pooled, port: 65536}",
        "spec.nodeLocalService.port",
    ),
    (
        "unknown-field",
        "    target: {addresses: ['10.0.0.1:50051']}\n    poolSize: 5",
        "spec.poolSize",
    ),
];

#[tokio::test]
async fn invalid_pools_are_refused_naming_the_field() -> Result<()> {
    ensure_crd().await?;
    let ns = TestNamespace::new("invalid").await?;
    let mut failures = Vec::new();
    for (name, spec, field) in INVALID {
        let out = kubectl_stdin(
            &["apply", "-n", &ns.name, "-f", "-"],
            Some(&manifest(name, spec)),
        )
        .await?;
        if out.success {
            failures.push(format!("{name}: accepted, but it breaks a rule on {field}"));
        } else if !out.stderr.contains(&format!("{field}:"))
            && !out.stderr.contains(&format!("\"{field}\""))
        {
            failures.push(format!(
                "{name}: refused, but the message does not name {field}: {}",
                out.stderr.trim()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Nothing half-created.
    let listed = kubectl(&["get", "cpool", "-n", &ns.name, "-o", "name"])
        .await?
        .ok()?;
    assert_eq!(listed.trim(), "");
    Ok(())
}

#[tokio::test]
async fn valid_edge_cases_are_accepted() -> Result<()> {
    ensure_crd().await?;
    let ns = TestNamespace::new("valid").await?;
    let cases = [
        (
            "ipv6",
            "    target: {addresses: ['[fd00::7]:50051', 'backend.example.com:443']}",
        ),
        (
            "named-port",
            "    target: {service: {name: s, port: grpc-web}}",
        ),
        (
            "tight",
            "    target: {addresses: ['10.0.0.1:1']}\n    size: 1\n    maxIdle: 0\n    maxStreams: 1\n    ttl: 1s\n    whenFull: Wait\n    acquireTimeout: 250ms\n    listenPort: 65535",
        ),
        (
            "long-ttl",
            "    target: {addresses: ['10.0.0.1:65535']}\n    ttl: 1h30m",
        ),
        (
            "clients",
            "    target: {addresses: ['10.0.0.1:1']}\n    clients: {namespaces: [shop, billing-2, a, 0ops]}",
        ),
        (
            "local-service",
            "    target: {service: {name: payments, port: 50051}}\n    listenPort: 16001\n    nodeLocalService: {name: payments-pooled, port: 50051}",
        ),
        (
            "local-service-default-port",
            "    target: {addresses: ['10.0.0.1:1']}\n    listenPort: 65535\n    nodeLocalService: {name: a}",
        ),
        (
            "clients-longest-name",
            "    target: {addresses: ['10.0.0.1:1']}\n    clients: {namespaces: [aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa]}",
        ),
    ];
    for (name, spec) in cases {
        let out = kubectl_stdin(
            &["apply", "-n", &ns.name, "-f", "-"],
            Some(&manifest(name, spec)),
        )
        .await?;
        assert!(out.success, "{name} was refused: {}", out.stderr);
    }
    Ok(())
}

#[tokio::test]
async fn status_written_by_server_side_apply_shows_in_columns() -> Result<()> {
    ensure_crd().await?;
    let ns = TestNamespace::new("status").await?;
    kubectl_stdin(
        &["apply", "-n", &ns.name, "-f", "-"],
        Some(&manifest("payments", TARGET)),
    )
    .await?
    .ok()?;

    let client = cluster()?.client().await?;
    let api: Api<ConnectionPool> = Api::namespaced(client, &ns.name);
    let status = serde_json::json!({
        "apiVersion": "tidepool.dev/v1alpha1",
        "kind": "ConnectionPool",
        "status": {
            "observedGeneration": 1,
            "target": "payments-grpc:50051",
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "AllAgentsSynced",
                "message": "3 of 3 agents run generation 1", "observedGeneration": 1,
                "lastTransitionTime": "2026-11-27T09:00:00Z"
            }],
            "agents": {"desired": 3, "synced": 3, "rejected": 0},
            "totals": {"addresses": 2, "connections": 9, "streams": 131, "idle": 2, "busy": 4, "overflow": 0},
            "addresses": [
                {"address": "10.0.3.7:50051", "connections": 5, "busy": 2, "idle": 1, "streams": 70, "nodes": 3},
                {"address": "10.0.3.8:50051", "connections": 4, "busy": 2, "idle": 1, "streams": 61, "nodes": 3}
            ]
        }
    });
    api.patch_status(
        "payments",
        &PatchParams::apply("tidepool-operator").force(),
        &Patch::Apply(&status),
    )
    .await?;

    let out = kubectl(&["get", "cpool", "payments", "-n", &ns.name, "--no-headers"])
        .await?
        .ok()?;
    let cols: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(
        &cols[..8],
        [
            "payments",
            "payments-grpc:50051",
            "100",
            "131",
            "9",
            "3",
            "3",
            "True"
        ],
        "{out}"
    );

    // The status subresource is the only way status changes: a spec apply
    // does not wipe it, and the operator's field manager owns it.
    kubectl_stdin(
        &["apply", "-n", &ns.name, "-f", "-"],
        Some(&manifest("payments", &format!("{TARGET}\n    size: 7"))),
    )
    .await?
    .ok()?;
    let pool = api.get("payments").await?;
    assert_eq!(pool.spec.size, 7);
    assert_eq!(
        pool.status.and_then(|s| s.totals).map(|t| t.streams),
        Some(131)
    );
    let managers = kubectl(&[
        "get",
        "cpool",
        "payments",
        "-n",
        &ns.name,
        "--show-managed-fields",
        "-o",
        "jsonpath={.metadata.managedFields[?(@.subresource==\"status\")].manager}",
    ])
    .await?
    .ok()?;
    assert_eq!(managers, "tidepool-operator");
    Ok(())
}

#[tokio::test]
async fn a_status_that_breaks_the_schema_is_refused() -> Result<()> {
    ensure_crd().await?;
    let ns = TestNamespace::new("badstatus").await?;
    kubectl_stdin(
        &["apply", "-n", &ns.name, "-f", "-"],
        Some(&manifest("p", TARGET)),
    )
    .await?
    .ok()?;
    let client = cluster()?.client().await?;
    let api: Api<ConnectionPool> = Api::namespaced(client, &ns.name);
    let addresses: Vec<_> = (0..51)
        .map(|i| serde_json::json!({"address": format!("10.0.0.{i}:1"), "connections": 1, "busy": 0, "idle": 1, "streams": 0, "nodes": 1}))
        .collect();
    let status = serde_json::json!({
        "apiVersion": "tidepool.dev/v1alpha1", "kind": "ConnectionPool",
        "status": {"addresses": addresses}
    });
    let err = api
        .patch_status(
            "p",
            &PatchParams::apply("tidepool-operator").force(),
            &Patch::Apply(&status),
        )
        .await
        .expect_err("51 addresses exceed the cap of 50");
    assert!(err.to_string().contains("status.addresses"), "{err}");
    Ok(())
}
