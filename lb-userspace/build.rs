//! Builds the BPF object (lb-ebpf) with the nightly toolchain and bpf-linker,
//! so the agent can embed it. `cargo xtask setup` installs both.
//!
//! The same steps as aya-build's `build_ebpf`, plus `-C target-cpu=v3`
//! (aya-build sets RUSTFLAGS with no way to add one): BPF instruction set
//! v3 has 32-bit jumps and ALU ops, so the programs take fewer
//! instructions and the verifier fewer states; kernels have it since 5.1,
//! and the agent needs 6.6 (tcx) anyway. Do not rely on its atomics with
//! fetch: this LLVM emitted a plain add whose result it then used.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

const PACKAGE: &str = "lb-ebpf";
/// BPF instruction set (jmp32 and alu32 since v3).
const BPF_CPU: &str = "v3";

fn main() -> Result<()> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../lb-ebpf");
    println!("cargo:rerun-if-changed={}", root.display());
    println!("cargo:rerun-if-changed=../lb-common/src");
    println!("cargo:rerun-if-env-changed=LB_SKIP_EBPF_BUILD");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let dst = out_dir.join(PACKAGE);
    if env::var_os("LB_SKIP_EBPF_BUILD").is_some() {
        // For tools that only need the crate to type-check (clippy of the
        // userspace crates without a nightly toolchain).
        if !dst.exists() {
            std::fs::write(&dst, [])?;
        }
        return Ok(());
    }
    let target = match env::var("CARGO_CFG_TARGET_ENDIAN")?.as_str() {
        "little" => "bpfel-unknown-none",
        "big" => "bpfeb-unknown-none",
        other => bail!("unsupported endianness {other}"),
    };
    let arch = env::var("CARGO_CFG_TARGET_ARCH")?;
    let target_dir = out_dir.join("ebpf-target");
    build(&root, target, &arch, &target_dir)?;
    let built = target_dir.join(target).join("release").join(PACKAGE);
    std::fs::copy(&built, &dst)
        .with_context(|| format!("copying {} to {}", built.display(), dst.display()))?;
    Ok(())
}

fn build(root: &Path, target: &str, arch: &str, target_dir: &Path) -> Result<()> {
    let mut rustflags = OsString::new();
    for (i, flag) in [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
        format!("-Ctarget-cpu={BPF_CPU}"),
    ]
    .iter()
    .enumerate()
    {
        if i > 0 {
            rustflags.push("\x1f");
        }
        rustflags.push(flag);
    }
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--package", PACKAGE])
        .args(["--bins", "--release", "--target", target])
        .args(["-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(root)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        // The outer build's compiler and wrappers are the stable ones.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS");
    let out = cmd
        .output()
        .with_context(|| format!("running {cmd:?} (is rustup installed?)"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Compiler warnings of the BPF crate show; progress lines only on failure.
    for line in stderr.lines() {
        if !out.status.success() || line.starts_with("warning") {
            println!("cargo:warning={line}");
        }
    }
    if !out.status.success() {
        bail!(
            "building {PACKAGE} failed ({}): see the warnings above",
            out.status
        );
    }
    Ok(())
}
