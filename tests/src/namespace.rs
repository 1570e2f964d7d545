//! A namespace per test, and the CRD installed once per process.

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use tokio::sync::OnceCell;

use crate::{cluster, kubectl, repo_root};

/// A namespace that belongs to one test.
///
/// The local control plane runs no namespace controller, so a deleted
/// namespace would stay Terminating; the whole control plane is removed at
/// the end of the run instead. On a real cluster, call [`cleanup`].
///
/// [`cleanup`]: TestNamespace::cleanup
pub struct TestNamespace {
    /// The namespace's name, `tp-<prefix>-<random>`.
    pub name: String,
}

impl TestNamespace {
    /// Creates a fresh namespace named after `prefix`.
    pub async fn new(prefix: &str) -> Result<Self> {
        let client = cluster()?.client().await?;
        let name = format!("tp-{prefix}-{:08x}", rand_u32());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"tidepool.dev/e2e": "true"}}
        }))?;
        Api::<Namespace>::all(client)
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {name} failed"))?;
        Ok(Self { name })
    }

    /// Deletes the namespace (on clusters that have a namespace controller).
    pub async fn cleanup(self) -> Result<()> {
        if !cluster()?.is_local() {
            kubectl(&["delete", "namespace", &self.name, "--wait=false"])
                .await?
                .ok()?;
        }
        Ok(())
    }
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now()) as u32
}

static CRD: OnceCell<()> = OnceCell::const_new();

/// Installs the ConnectionPool CRD from the chart (once per process) and
/// waits until the API server serves it.
pub async fn ensure_crd() -> Result<()> {
    CRD.get_or_try_init(|| async {
        let file = repo_root().join(tidepool_crds::crd::CHART_CRD_PATH);
        let file = file.to_str().context("the repository path is not UTF-8")?;
        let out = kubectl(&["apply", "--server-side", "--force-conflicts", "-f", file]).await?;
        if !out.success {
            bail!(
                "installing the CRD from {file} failed: {}",
                out.stderr.trim()
            );
        }
        kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd/connectionpools.tidepool.dev",
            "--timeout=30s",
        ])
        .await?
        .ok()
        .context("the ConnectionPool CRD did not become Established")?;
        Ok(())
    })
    .await
    .copied()
}
