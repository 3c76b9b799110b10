//! `cargo xtask lint`: formatting and clippy, warnings as errors, with the
//! workspace's lint table: on the host crates, and on lb-ebpf for its BPF
//! target with the nightly (the flags lb-userspace's build.rs builds it
//! with), which `cargo clippy --workspace` cannot reach.

use std::process::Command;

use anyhow::{Context, Result};

use crate::{cargo, output, sh, workspace_root};

/// The BPF CPU version lb-userspace/build.rs compiles for.
const BPF_CPU: &str = "v3";

pub fn lint() -> Result<()> {
    add_components()?;
    println!("[lint] cargo fmt --check");
    sh(cargo().args(["fmt", "--all", "--check"])).context("run `cargo fmt --all`")?;
    println!("[lint] clippy: host crates");
    sh(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "lb-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    println!("[lint] clippy: lb-ebpf on bpfel-unknown-none");
    sh(&mut bpf_clippy())
}

/// clippy and rustfmt where they are missing (the nightly is installed
/// with the minimal profile).
fn add_components() -> Result<()> {
    for (toolchain, component) in [
        ("stable", "clippy"),
        ("stable", "rustfmt"),
        ("nightly", "clippy"),
    ] {
        let installed = output(Command::new("rustup").args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            toolchain,
        ]))
        .unwrap_or_default();
        if !installed.lines().any(|l| l.starts_with(component)) {
            println!("[lint] adding {component} to {toolchain}");
            sh(Command::new("rustup").args([
                "component",
                "add",
                "--toolchain",
                toolchain,
                component,
            ]))?;
        }
    }
    Ok(())
}

fn bpf_clippy() -> Command {
    let arch = std::env::consts::ARCH;
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        format!("-Ctarget-cpu={BPF_CPU}"),
    ]
    .join("\x1f");
    let mut c = Command::new("rustup");
    c.current_dir(workspace_root().join("lb-ebpf"))
        .args(["run", "nightly", "cargo", "clippy"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--", "-D", "warnings"])
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    c
}
