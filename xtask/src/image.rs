//! `cargo xtask image`: the agent's container image, built offline. No
//! base image is pulled: the image holds the agent (stripped, its BPF
//! object embedded) and the C runtime libraries it links (as `ldd` names
//! them), copied from this machine, on `FROM scratch`
//! (`deploy/image/Containerfile`).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{cargo, output, sh, target_dir, workspace_root};

/// The tag `cargo xtask image` gives by default, the DaemonSet's `image:`.
pub const DEFAULT_TAG: &str = "localhost/lb-agent:latest";

/// What `cargo xtask image` was asked for.
#[derive(Debug, PartialEq, Eq)]
pub struct ImageRequest {
    /// A debug build instead of a release one (quicker, for tests).
    pub debug: bool,
    pub tag: String,
    /// Also write the image as an OCI archive here (for `kind load
    /// image-archive`, `ctr images import`, `k3s ctr images import`).
    pub save: Option<PathBuf>,
    /// Use this agent binary instead of building one.
    pub agent_bin: Option<PathBuf>,
}

impl ImageRequest {
    pub fn parse(args: &[String]) -> Result<Self> {
        let mut request = Self {
            debug: false,
            tag: DEFAULT_TAG.into(),
            save: None,
            agent_bin: None,
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
            match arg.as_str() {
                "--debug" => request.debug = true,
                "--release" => request.debug = false,
                "--tag" => request.tag.clone_from(value()?),
                "--save" => request.save = Some(value()?.into()),
                "--agent-bin" => request.agent_bin = Some(value()?.into()),
                other => bail!("image: unknown argument {other}"),
            }
        }
        Ok(request)
    }
}

/// Podman with the project's settings (`deploy/image/containers.conf`).
pub fn podman() -> Command {
    let mut c = Command::new("podman");
    c.env(
        "CONTAINERS_CONF",
        workspace_root().join("deploy/image/containers.conf"),
    );
    c
}

/// Builds the image; returns its tag.
pub fn build(request: &ImageRequest) -> Result<String> {
    let root = workspace_root();
    let profile = if request.debug { "debug" } else { "release" };
    let agent = if let Some(path) = &request.agent_bin {
        path.clone()
    } else {
        let mut c = cargo();
        c.args(["build", "-p", "lb-userspace", "--bin", "lb-agent"]);
        if !request.debug {
            c.arg("--release");
        }
        sh(&mut c)?;
        target_dir().join(profile).join("lb-agent")
    };
    let context = target_dir().join("image").join(profile);
    assemble_rootfs(&agent, &context.join("rootfs"))?;
    sh(podman()
        .args(["build", "--quiet", "--file"])
        .arg(root.join("deploy/image/Containerfile"))
        .args(["--tag", &request.tag])
        .arg(&context))?;
    let size = output(podman().args(["image", "inspect", "--format", "{{.Size}}", &request.tag]))
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    println!(
        "[image] {} built from {} ({:.1} MB)",
        request.tag,
        agent.display(),
        size as f64 / 1e6
    );
    if let Some(path) = &request.save {
        let _ = fs::remove_file(path);
        sh(podman()
            .args(["save", "--format", "oci-archive", "--output"])
            .arg(path)
            .arg(&request.tag))?;
        println!("[image] saved to {}", path.display());
    }
    Ok(request.tag.clone())
}

/// Lays out the image's files: the stripped agent in /usr/local/bin and
/// every library it loads at the path the loader looks for it.
fn assemble_rootfs(agent: &Path, rootfs: &Path) -> Result<()> {
    let _ = fs::remove_dir_all(rootfs);
    let bin = rootfs.join("usr/local/bin");
    fs::create_dir_all(&bin)?;
    for dir in ["etc", "tmp"] {
        fs::create_dir_all(rootfs.join(dir))?;
    }
    let target = bin.join("lb-agent");
    sh(Command::new("strip")
        .args(["--strip-debug", "-o"])
        .arg(&target)
        .arg(agent))
    .context("stripping the agent (binutils)")?;
    let ldd = output(Command::new("ldd").arg(agent))
        .with_context(|| format!("ldd {}", agent.display()))?;
    if let Some(missing) = ldd.lines().find(|l| l.contains("not found")) {
        bail!(
            "{}: a library is missing: {}",
            agent.display(),
            missing.trim()
        );
    }
    for library in linked_libraries(&ldd) {
        let inside = rootfs.join(library.strip_prefix("/")?);
        fs::create_dir_all(inside.parent().expect("an absolute file path"))?;
        // fs::copy follows symbolic links: the file lands where ldd says.
        fs::copy(&library, &inside)
            .with_context(|| format!("copying {} into the image", library.display()))?;
    }
    Ok(())
}

/// The files `ldd` says a binary loads (the loader included; the vDSO,
/// which the kernel provides, left out).
fn linked_libraries(ldd: &str) -> Vec<PathBuf> {
    ldd.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, resolved)) => resolved.trim(),
                None => line,
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_libraries_and_loader_without_the_vdso() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007fc4)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007fc4)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007fc4)\n";
        assert_eq!(
            linked_libraries(ldd),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn arguments_parse_and_unknown_ones_are_refused() {
        let args: Vec<String> = ["--debug", "--tag", "x:y", "--save", "/tmp/a.tar"]
            .map(String::from)
            .to_vec();
        let request = ImageRequest::parse(&args).unwrap();
        assert!(request.debug);
        assert_eq!(request.tag, "x:y");
        assert_eq!(request.save, Some(PathBuf::from("/tmp/a.tar")));
        assert!(ImageRequest::parse(&["--bogus".to_string()]).is_err());
        assert!(ImageRequest::parse(&["--tag".to_string()]).is_err());
    }
}
