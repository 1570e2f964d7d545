//! Standalone mode end to end: pools from a file of ConnectionPool
//! manifests, reloaded on change, an invalid file refused with the last good
//! configuration kept, the admin endpoints, and the real binary serving and
//! draining on SIGTERM.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use tidepool_agent::standalone;
use tidepool_testkit::*;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(30);

fn manifest(name: &str, addresses: &[String], extra: &str) -> String {
    let list = addresses
        .iter()
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "---\napiVersion: tidepool.dev/v1alpha1\nkind: ConnectionPool\nmetadata: {{name: {name}, namespace: shop}}\n\
         spec: {{target: {{addresses: [{list}]}}, size: 4, maxStreams: 10{extra}}}\n"
    )
}

/// A plain HTTP/1.0 GET: status and body.
async fn served_by(
    app: &tidepool_agent::app::App,
    authority: &str,
) -> Result<String, tonic::Status> {
    let mut client = Client::connect(app.proxy_addr(), authority).await;
    let response = client.unary(request(Bytes::from_static(b"x"), &[])).await?;
    Ok(backend_of(response.metadata()))
}

#[tokio::test]
async fn the_file_is_reloaded_when_it_changes_and_a_bad_one_is_refused() {
    timeout(LIMIT, async {
        let one = Backend::start("one").await;
        let two = Backend::start("two").await;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pools.yaml");
        std::fs::write(&file, manifest("echo", &[one.address()], "")).unwrap();

        let app = agent().await;
        assert_eq!(http_get(app.admin_addr(), "/readyz").await.0, 503);
        assert_eq!(standalone::load_and_apply(&file, app.runtime()).unwrap(), 1);
        let stop = CancellationToken::new();
        tokio::spawn(standalone::watch(
            file.clone(),
            app.runtime().clone(),
            Duration::from_millis(50),
            stop.clone(),
        ));
        assert_eq!(served_by(&app, "echo.shop:50051").await.unwrap(), "one");
        assert_eq!(http_get(app.admin_addr(), "/readyz").await.0, 200);

        // A change: echo moves to backend two, a new pool appears.
        std::fs::write(
            &file,
            manifest("echo", &[two.address()], "") + &manifest("other", &[one.address()], ""),
        )
        .unwrap();
        let mut reloaded = false;
        for _ in 0..100 {
            if served_by(&app, "other.shop").await.is_ok() {
                reloaded = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert!(reloaded, "the new pool never appeared");
        assert_eq!(served_by(&app, "echo.shop").await.unwrap(), "two");

        // An invalid file: refused, the last good configuration runs on.
        std::fs::write(&file, manifest("echo", &[one.address()], ", maxIdle: 9")).unwrap();
        let err = standalone::load(&file).unwrap_err().to_string();
        assert!(
            err.contains(&file.display().to_string())
                && err.contains("shop/echo")
                && err.contains("spec.maxIdle"),
            "{err}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(served_by(&app, "echo.shop").await.unwrap(), "two");
        assert!(served_by(&app, "other.shop").await.is_ok());
        let (_, metrics) = http_get(app.admin_addr(), "/metrics").await;
        assert!(
            metrics.contains("tidepool_config_applies_total{result=\"error\"} 1"),
            "{metrics}"
        );
        stop.cancel();
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn admin_endpoints_report_health_metrics_and_per_address_occupancy() {
    timeout(LIMIT, async {
        let backend = Backend::start("one").await;
        let app = agent().await;
        app.runtime()
            .apply(vec![
                pool("echo", &[backend.address()])
                    .size(3)
                    .max_streams(7)
                    .build(),
            ])
            .unwrap();
        let mut client = Client::connect(app.proxy_addr(), "echo").await;
        let mut held = client
            .hold(request(Bytes::from_static(b"x"), &[]))
            .await
            .unwrap()
            .into_inner();
        held.message().await.unwrap().unwrap();
        client
            .unary(request(Bytes::from_static(b"y"), &[("x-fail-code", "5")]))
            .await
            .unwrap_err();

        assert_eq!(
            http_get(app.admin_addr(), "/healthz").await,
            (200, "ok\n".to_owned())
        );
        let (status, body) = http_get(app.admin_addr(), "/pools").await;
        assert_eq!(status, 200);
        let pools: serde_json::Value = serde_json::from_str(&body).unwrap();
        let pool = &pools[0];
        assert_eq!(pool["name"], "echo");
        assert_eq!(pool["settings"]["size"], 3);
        assert_eq!(pool["settings"]["maxStreams"], 7);
        assert_eq!(pool["addresses"][0]["address"], backend.address());
        assert_eq!(pool["addresses"][0]["streams"], 1);
        assert_eq!(pool["addresses"][0]["connections"], 1);

        let (_, metrics) = http_get(app.admin_addr(), "/metrics").await;
        for line in [
            "tidepool_proxy_streams_active{pool=\"default/echo\"} 1",
            "tidepool_proxy_streams_total{pool=\"default/echo\",code=\"NOT_FOUND\"} 1",
            "tidepool_pool_rq_active{pool=\"default/echo\",address=\"",
            "tidepool_proxy_connections_active{listener=\"shared\"} 1",
        ] {
            assert!(metrics.contains(line), "no {line} in\n{metrics}");
        }
        drop(held);
    })
    .await
    .unwrap();
}

fn agent_binary() -> &'static str {
    env!("CARGO_BIN_EXE_tidepool-agent")
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[tokio::test]
async fn the_binary_serves_a_file_and_drains_on_sigterm() {
    // The default: one worker thread.
    serves_a_file_and_drains_on_sigterm(None).await;
}

/// `--worker-threads 0`: one per CPU, on the work-stealing scheduler.
#[tokio::test]
async fn the_binary_on_a_thread_per_cpu_serves_and_drains_on_sigterm() {
    serves_a_file_and_drains_on_sigterm(Some("0")).await;
}

/// One worker thread runs on tokio's current-thread scheduler (see
/// `main.rs`): the same behaviour, signal handling and drain included.
#[tokio::test]
async fn the_binary_on_one_worker_thread_serves_and_drains_on_sigterm() {
    serves_a_file_and_drains_on_sigterm(Some("1")).await;
}

async fn serves_a_file_and_drains_on_sigterm(worker_threads: Option<&str>) {
    timeout(LIMIT, async {
        let backend = Backend::start("one").await;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pools.yaml");
        write(&file, &manifest("echo", &[backend.address()], ""));
        let (port, admin_port) = (free_port(), free_port());
        let mut command = Command::new(agent_binary());
        if let Some(threads) = worker_threads {
            command.env("TIDEPOOL_WORKER_THREADS", threads);
        }
        let mut child = command
            .arg("--standalone")
            .arg(&file)
            .env("TIDEPOOL_LISTEN", format!("127.0.0.1:{port}"))
            .env("TIDEPOOL_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
            .env("TIDEPOOL_DRAIN_TIMEOUT", "10s")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
        let mut ready = false;
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(admin).await.is_ok()
                && http_get(admin, "/readyz").await.0 == 200
            {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(ready, "the agent never became ready");

        let mut client = Client::connect(proxy, "echo.shop").await;
        let slow = tokio::spawn(async move {
            client
                .unary(request(
                    Bytes::from_static(b"slow"),
                    &[("x-sleep-ms", "1000")],
                ))
                .await
                .map(|r| r.into_inner())
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let killed = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(killed.success());
        // The stream in flight finishes.
        assert_eq!(slow.await.unwrap().unwrap().as_ref(), b"slow");
        // Then the process exits by itself, cleanly.
        let mut status = None;
        for _ in 0..200 {
            if let Some(s) = child.try_wait().unwrap() {
                status = Some(s);
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let status = status.unwrap_or_else(|| {
            let _ = child.kill();
            panic!("the agent did not exit after draining")
        });
        assert!(status.success(), "{status}");
        assert!(tokio::net::TcpStream::connect(proxy).await.is_err());
    })
    .await
    .unwrap();
}

#[test]
fn the_binary_refuses_an_invalid_file_naming_file_resource_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad-pools.yaml");
    write(
        &file,
        &manifest("echo", &["127.0.0.1:1".to_owned()], ", maxIdle: 5"),
    );
    let output = Command::new(agent_binary())
        .arg("--standalone")
        .arg(&file)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for part in ["bad-pools.yaml", "shop/echo", "spec.maxIdle"] {
        assert!(stderr.contains(part), "no {part} in {stderr}");
    }
}

/// A long-lived task that ends while the agent serves is a fault: it is
/// named on `/healthz`, and [`App::run`], whose error `main` returns (so
/// the process exits non-zero), ends with it.
#[tokio::test]
async fn a_long_lived_task_ending_fails_healthz_and_ends_the_agent_with_an_error() {
    use tidepool_agent::app::RunError;
    timeout(LIMIT, async {
        let mut app = agent().await;
        let admin = app.admin_addr();
        let (end, ended) = tokio::sync::oneshot::channel::<()>();
        app.supervise("standalone file watch", async move {
            let _ = ended.await;
        });
        assert_eq!(http_get(admin, "/healthz").await, (200, "ok\n".to_owned()));

        end.send(()).unwrap();
        let exit = app.fault().await;
        let why = "task standalone file watch returned before the agent stopped";
        assert_eq!(exit.to_string(), why);
        assert_eq!(
            http_get(admin, "/healthz").await,
            (500, format!("failing: {why}\n")),
            "/healthz names the task that ended"
        );

        app.supervise("control stream", async {});
        let never = || std::future::pending::<std::io::Result<&'static str>>();
        let err = app
            .run(never, Duration::ZERO, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(&err, RunError::TaskExited(e) if e.task == "control stream"), "{err}");
        assert_eq!(
            err.to_string(),
            "the agent's task control stream returned before the agent stopped; exiting so the kubelet restarts it"
        );
    })
    .await
    .unwrap();
}

/// `--observe-window` reaches every pool the file declares (the binary's
/// flag becomes [`AppOptions::observe_window`] through `Config`).
#[tokio::test]
async fn the_observe_window_reaches_every_pool() {
    use tidepool_agent::app::{App, AppOptions};
    use tidepool_agent::config::{Args, Config};
    use tidepool_agent::pool::ObserveWindow;

    let config = Config::from_args(
        <Args as clap::Parser>::try_parse_from([
            "tidepool-agent",
            "--standalone",
            "pools.yaml",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--observe-window",
            "20s",
        ])
        .unwrap(),
    )
    .unwrap();
    let options = AppOptions::from(&config);
    assert_eq!(
        options.observe_window,
        ObserveWindow::new(Duration::from_secs(20)).unwrap()
    );
    let app = App::start(options).await.unwrap();
    let pools = standalone::parse(
        Path::new("pools.yaml"),
        &(manifest("a", &["127.0.0.1:1".to_owned()], "")
            + &manifest("b", &["127.0.0.1:2".to_owned()], "")),
    )
    .unwrap();
    app.runtime().apply(pools).unwrap();
    for (key, entry) in &app.runtime().table().pools {
        assert_eq!(
            entry.pool.window().length(),
            Duration::from_secs(20),
            "{key}"
        );
    }
    assert_eq!(app.runtime().table().pools.len(), 2);
}
