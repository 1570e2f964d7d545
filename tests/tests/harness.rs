//! The control-plane harness fails with a message that says what went wrong
//! and what to do, instead of hanging.
#![allow(clippy::disallowed_types)] // std::time::Instant: wall-clock deadlines against real processes.

use std::process::Command;

use tidepool_e2e::repo_root;

#[test]
fn build_without_go_says_to_install_it() {
    let out = Command::new("bash")
        .arg(repo_root().join("tests/cluster/build.sh"))
        .env("GO", "/nonexistent/go")
        .output()
        .expect("bash runs");
    assert!(!out.status.success());
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        msg.contains("go command is not installed") && msg.contains("Install Go"),
        "{msg}"
    );
}

#[test]
fn tpcluster_without_binaries_says_how_to_build_them() {
    let Ok(bins) = std::env::var("TIDEPOOL_CLUSTER_BIN") else {
        eprintln!("TIDEPOOL_CLUSTER_BIN is unset (make e2e sets it); nothing to check");
        return;
    };
    let empty = tempfile::tempdir().expect("tempdir");
    let out = Command::new(format!("{bins}/tpcluster"))
        .args(["run", "--bin-dir"])
        .arg(empty.path())
        .output()
        .expect("tpcluster runs");
    assert!(!out.status.success());
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        msg.contains("etcd is missing") && msg.contains("tests/cluster/build.sh"),
        "{msg}"
    );
}

#[test]
fn tpcluster_that_cannot_start_a_server_reports_it_and_cleans_up() {
    let Ok(bins) = std::env::var("TIDEPOOL_CLUSTER_BIN") else {
        eprintln!("TIDEPOOL_CLUSTER_BIN is unset (make e2e sets it); nothing to check");
        return;
    };
    // An "etcd" that exits at once: tpcluster must notice, say so, and not hang.
    let fake = tempfile::tempdir().expect("tempdir");
    for name in ["etcd", "kube-apiserver"] {
        let path = fake.path().join(name);
        std::fs::write(&path, "#!/bin/sh\necho 'cannot start' >&2\nexit 3\n").expect("write");
        Command::new("chmod")
            .arg("+x")
            .arg(&path)
            .status()
            .expect("chmod");
    }
    let state = tempfile::tempdir().expect("tempdir");
    let state_dir = state.path().join("state");
    let started = std::time::Instant::now();
    let out = Command::new(format!("{bins}/tpcluster"))
        .args(["run", "--bin-dir"])
        .arg(fake.path())
        .arg("--state-dir")
        .arg(&state_dir)
        .output()
        .expect("tpcluster runs");
    assert!(!out.status.success());
    assert!(
        started.elapsed().as_secs() < 30,
        "tpcluster took {:?} to give up",
        started.elapsed()
    );
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        msg.contains("etcd did not become healthy") && msg.contains("exited"),
        "{msg}"
    );
    assert!(
        !state_dir.exists(),
        "tpcluster left {} behind",
        state_dir.display()
    );
}
