//! Sets the cfg `real_qdrant` when a real Qdrant server can be started by the
//! tests (see `src/real_qdrant.rs`): `QDRANT_BIN` names a `qdrant` binary,
//! `TANDEM_QDRANT_START` a start script, or the workspace has
//! `../shared/qdrant/start` beside it.
//!
//! Tests that cannot run without a real server are marked
//! `#[cfg_attr(not(real_qdrant), ignore = "needs a real Qdrant server: …")]`:
//! without one, cargo lists them as *ignored* with that reason instead of
//! letting them pass without testing anything.
//!
//! The script runs again when either variable changes, and when a server it
//! found changes or disappears. A path that does not exist cannot be watched
//! (cargo would rerun the script, and rebuild this package, on every build), so
//! after `../shared/qdrant` appears on a machine that had none, set one of the
//! variables or `touch tests/build.rs`.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(real_qdrant)");
    println!("cargo::rerun-if-env-changed=QDRANT_BIN");
    println!("cargo::rerun-if-env-changed=TANDEM_QDRANT_START");
    println!("cargo::rerun-if-changed=build.rs");
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let named = |var: &str| {
        std::env::var_os(var)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .filter(|p| p.is_file())
    };
    let default_script = Path::new(&manifest).join("../../shared/qdrant/start");
    let found = named("QDRANT_BIN")
        .or_else(|| named("TANDEM_QDRANT_START"))
        .or_else(|| default_script.is_file().then_some(default_script));
    if let Some(server) = found {
        println!("cargo::rerun-if-changed={}", server.display());
        println!("cargo::rustc-cfg=real_qdrant");
    }
}
