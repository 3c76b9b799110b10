//! The seccomp profile the agent's container needs
//! (`deploy/seccomp/lb-agent.json`): the runtimes' default profile lets
//! `bpf(2)` only with CAP_SYS_ADMIN, which the DaemonSet does not grant, so
//! the agent could not create a map. The profile allows the system calls
//! the agent makes, `bpf` among them, and refuses every other with EPERM.
//! `lb-agent seccomp-profile --output FILE` writes it where the kubelet
//! reads Localhost profiles (the DaemonSet's init container does).

use std::{fs, os::unix::fs::PermissionsExt, path::Path};

use anyhow::{Context, Result};

/// The profile, as shipped in deploy/seccomp/.
pub const PROFILE: &str = include_str!("../../deploy/seccomp/lb-agent.json");

/// Writes the profile to `path` atomically (a reader never sees half a
/// file), readable by all, creating the folder if needed.
pub fn write(path: &Path) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp_name = path.file_name().context("a file name")?.to_owned();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    fs::write(&tmp, PROFILE).with_context(|| format!("writing {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_profile_refuses_by_default_and_allows_bpf() {
        let profile: serde_json::Value = serde_json::from_str(PROFILE).unwrap();
        assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO");
        let allowed: Vec<&str> = profile["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|rule| rule["action"] == "SCMP_ACT_ALLOW")
            .flat_map(|rule| rule["names"].as_array().unwrap())
            .map(|name| name.as_str().unwrap())
            .collect();
        assert!(allowed.contains(&"bpf"));
        for dangerous in [
            "mount",
            "ptrace",
            "init_module",
            "kexec_load",
            "unshare",
            "setns",
        ] {
            assert!(!allowed.contains(&dangerous), "{dangerous} is allowed");
        }
    }

    #[test]
    fn written_atomically_and_readable_by_all() {
        let dir = std::env::temp_dir().join(format!("lb-seccomp-{}", std::process::id()));
        let path = dir.join("seccomp/lb-agent.json");
        write(&path).unwrap();
        write(&path).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), PROFILE);
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        fs::remove_dir_all(&dir).unwrap();
    }
}
