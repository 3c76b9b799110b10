//! `cargo xtask setup`: makes a fresh machine ready, cheaply when it is:
//! the nightly with rust-src, bpf-linker against the nightly's LLVM, the
//! Debian packages, bpffs. Says what it does, and stops with a clear
//! message when something cannot be had.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{output, say, sh};

/// Debian packages the tests and the demo use, with a binary that tells
/// whether each is installed.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("ethtool", "ethtool"),
    ("util-linux", "nsenter"),
    ("bpftool", "bpftool"),
    // The kube-proxy rule sets the benchmark compares against are tested.
    ("iptables", "iptables-legacy-restore"),
    ("nftables", "nft"),
    // The agent's image is built and run in the tests (deploy/image/).
    ("podman", "podman"),
    ("buildah", "buildah"),
    ("runc", "runc"),
    // A throwaway cluster CA for the in-cluster config of the image test.
    ("openssl", "openssl"),
];

pub fn setup() -> Result<()> {
    let sysroot = nightly_sysroot()?;
    rust_src(&sysroot)?;
    bpf_linker(&sysroot)?;
    install_missing("system packages", APT_PACKAGES)?;
    bpffs()
}

/// The nightly toolchain compiles the BPF object (build-std needs it).
fn nightly_sysroot() -> Result<PathBuf> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is required (https://rustup.rs) and was not found")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        say("installing the nightly toolchain (BPF object needs -Z build-std)");
        sh(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))
        .context("no nightly toolchain and it could not be installed")?;
    }
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("rustc +nightly does not run")?;
    Ok(PathBuf::from(sysroot.trim()))
}

/// rust-src: build-std=core compiles core for bpfel-unknown-none.
fn rust_src(sysroot: &Path) -> Result<()> {
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        say("rust-src for nightly: present");
        return Ok(());
    }
    say("adding rust-src to the nightly toolchain");
    sh(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
        .context("rust-src could not be installed for the nightly toolchain")
}

/// bpf-linker, built against the nightly's own LLVM: bitcode from one LLVM
/// major cannot be linked by another.
fn bpf_linker(sysroot: &Path) -> Result<()> {
    let verbose =
        output(Command::new("rustc").args(["+nightly", "-vV"])).context("rustc +nightly -vV")?;
    let llvm_major = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("cannot read the nightly's LLVM version")?
        .to_owned();
    let llvm_dir = link_nightly_llvm(sysroot)?;
    let linker_runs = || {
        output(Command::new("rustup").args(["run", "nightly", "bpf-linker", "--version"]))
            .is_some_and(|v| v.starts_with("bpf-linker"))
    };
    if linker_runs() {
        say(&format!(
            "bpf-linker: present (LLVM {llvm_major} from the nightly)"
        ));
        return Ok(());
    }
    say(&format!(
        "building bpf-linker against the nightly's LLVM {llvm_major} (about 2 minutes)"
    ));
    sh(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--force",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{llvm_major}"))
        .env("LLVM_PREFIX", llvm_dir.parent().expect("lib has a parent")))
    .context("bpf-linker could not be built")?;
    if !linker_runs() {
        bail!("bpf-linker was installed but does not run (is ~/.cargo/bin on PATH?)");
    }
    Ok(())
}

/// Links every libLLVM of the nightly into ~/.local/lib/rust-llvm/lib:
/// libLLVM.so for building bpf-linker, the versioned names for its
/// run-time loader (its rpath points there). Returns that folder.
fn link_nightly_llvm(sysroot: &Path) -> Result<PathBuf> {
    let llvm_dir = home()?.join(".local/lib/rust-llvm/lib");
    std::fs::create_dir_all(&llvm_dir)?;
    for entry in std::fs::read_dir(sysroot.join("lib"))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("libLLVM") {
            continue;
        }
        let mut links = vec![llvm_dir.join(&name)];
        if name.starts_with("libLLVM.so.") {
            links.push(llvm_dir.join("libLLVM.so"));
        }
        for link in links {
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(entry.path(), &link)?;
        }
    }
    Ok(llvm_dir)
}

/// Installs the Debian packages of `packages` (package, binary) whose
/// binary is missing.
pub fn install_missing(what: &str, packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(_, bin)| !have(bin))
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        say(&format!("{what}: present"));
        return Ok(());
    }
    say(&format!(
        "installing Debian packages: {}",
        missing.join(" ")
    ));
    if !have("apt-get") {
        bail!(
            "missing {} and apt-get is not available: install them by hand",
            missing.join(" ")
        );
    }
    apt_install(&missing)
}

/// bpffs, where the agent pins its maps.
fn bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        say("bpffs: mounted at /sys/fs/bpf");
    } else if is_root() {
        say("mounting bpffs at /sys/fs/bpf");
        sh(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    } else {
        say("bpffs is not mounted at /sys/fs/bpf and this is not root: the agent mounts it when run as root");
    }
    Ok(())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|u| u.trim() == "0")
}

fn have(binary: &str) -> bool {
    env::var_os("PATH")
        .is_some_and(|paths| env::split_paths(&paths).any(|dir| dir.join(binary).is_file()))
}

fn home() -> Result<PathBuf> {
    env::var_os("HOME")
        .map(PathBuf::from)
        .context("HOME is not set")
}

/// `apt-get update` and `apt-get install` of `packages`, non-interactively.
fn apt_install(packages: &[&str]) -> Result<()> {
    sh(Command::new("apt-get")
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    sh(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("apt-get install failed (root is required)")
}
