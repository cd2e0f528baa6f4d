//! Builds the agent (`libkal_agent.so`, crate `kal-agent`) for embedding in the `kal`
//! binary, so that `cargo install --path crates/kal` alone gives a working kal: at first use
//! kal writes it out (see `kal::agent::embedded`). A separate target directory under
//! `OUT_DIR` keeps this nested build from waiting on the outer one's lock.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let here = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let agent = here.join("../kal-agent");
    for dir in [
        "../kal-agent/src",
        "../kal-agent/Cargo.toml",
        "../kal-proto/src",
    ] {
        println!("cargo:rerun-if-changed={dir}");
    }
    println!("cargo:rerun-if-env-changed=KAL_EMBED_AGENT");
    let dest = out.join("libkal_agent.so");
    // KAL_EMBED_AGENT=path embeds a prebuilt agent instead of building one.
    if let Some(prebuilt) = std::env::var_os("KAL_EMBED_AGENT") {
        std::fs::copy(&prebuilt, &dest).expect("cannot copy KAL_EMBED_AGENT");
        return;
    }
    let target_dir = out.join("agent-target");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--quiet", "--manifest-path"])
        .arg(agent.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        // The outer build's settings are not the agent's.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_PROFILE_RELEASE_DEBUG")
        .status()
        .expect("cannot run cargo to build the agent");
    assert!(status.success(), "building the agent (kal-agent) failed");
    std::fs::copy(target_dir.join("release/libkal_agent.so"), &dest)
        .expect("cannot copy the agent built");
}
