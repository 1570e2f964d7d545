//! Writes the ConnectionPool CRD into the chart, or checks that it is current.
//!
//! `crdgen` writes; `crdgen --check` exits non-zero when the committed file
//! differs from what the code generates.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let check = std::env::args().skip(1).any(|a| a == "--check");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = root.join(tidepool_crds::crd::CHART_CRD_PATH);
    let want = match tidepool_crds::crd::render() {
        Ok(y) => y,
        Err(e) => {
            eprintln!("crdgen: rendering the CRD failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    if check {
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        if have == want {
            println!("crdgen: {} is current", path.display());
            ExitCode::SUCCESS
        } else {
            eprintln!(
                "crdgen: {} differs from the code in crds/src/v1alpha1.rs; run `make gen` and commit the result",
                path.display()
            );
            ExitCode::FAILURE
        }
    } else {
        if let Err(e) = std::fs::write(&path, want) {
            eprintln!("crdgen: writing {} failed: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("crdgen: wrote {}", path.display());
        ExitCode::SUCCESS
    }
}
