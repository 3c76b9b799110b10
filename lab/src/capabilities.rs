//! The capabilities the DaemonSet gives the agent, and running the agent
//! with only some of them, as a container runtime would.

use std::fs;

use serde_json::json;

/// The capabilities the DaemonSet adds to the agent's container, read from
/// deploy/lb-agent.yaml so the test follows the manifest.
pub fn daemon_set_capabilities() -> Vec<String> {
    let pod = crate::container::daemon_set_pod();
    let security = &crate::container::container_of(&pod, "lb-agent")["securityContext"];
    assert_eq!(
        security["capabilities"]["drop"],
        json!(["ALL"]),
        "the DaemonSet drops every capability it does not add"
    );
    assert_ne!(security["privileged"], json!(true), "not privileged");
    security["capabilities"]["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .map(|c| c.as_str().unwrap().trim_start_matches("CAP_").to_owned())
        .collect()
}

/// The capability's bit (linux/capability.h).
pub fn capability_bit(name: &str) -> u32 {
    match name {
        "NET_BIND_SERVICE" => 10,
        "NET_ADMIN" => 12,
        "NET_RAW" => 13,
        "SYS_ADMIN" => 21,
        "SYS_RESOURCE" => 24,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("capability {other}: add its bit to capability_bit"),
    }
}

/// A wrapper (`Lab::agent_wrapper`) that runs the agent as a container
/// runtime runs an unprivileged container that adds `caps`: uid 0 with only
/// those capabilities (a root process gets what its bounding set allows at
/// exec), and `/proc/sys` read-only, in a mount namespace of its own.
pub fn like_a_container_with(caps: &[impl AsRef<str>]) -> Vec<String> {
    let list: Vec<String> = caps
        .iter()
        .map(|c| format!("+{}", c.as_ref().to_ascii_lowercase()))
        .collect();
    let script = format!(
        "mount -o bind,ro /proc/sys /proc/sys && exec setpriv --bounding-set=-all,{} -- \"$@\"",
        list.join(",")
    );
    ["unshare", "--mount", "--", "sh", "-c", &script, "sh"]
        .map(String::from)
        .to_vec()
}

pub fn effective_capabilities(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    u64::from_str_radix(hex, 16).unwrap()
}
