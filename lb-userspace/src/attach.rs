//! Attaches the programs: XDP on interfaces facing the wire, tc ingress on
//! the host side of pod veths. Pod interfaces come and go with pods, so they
//! are rescanned and new ones attached.

use std::{collections::BTreeMap, ffi::CStr};

use anyhow::{bail, Context, Result};
use aya::{
    programs::{SchedClassifier, TcAttachType, Xdp, XdpMode},
    Ebpf,
};
use lb_common::program_names;

/// How XDP is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpAttachMode {
    /// Native (driver) mode, falling back to generic when the driver lacks it.
    Auto,
    Native,
    Generic,
}

/// Interfaces of the current network namespace: (ifindex, name).
pub fn interfaces() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 {
            let name = CStr::from_ptr((*p).if_name).to_string_lossy().into_owned();
            out.push(((*p).if_index, name));
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

/// Shell-style match with `*` as the only wildcard.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// Interfaces holding a default route: where packets from the wire arrive.
pub fn default_route_interfaces() -> Vec<String> {
    let Ok(routes) = std::fs::read_to_string("/proc/net/route") else {
        return Vec::new();
    };
    let mut out: Vec<String> = routes
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_owned())
        })
        .collect();
    out.dedup();
    out
}

pub struct Attachments {
    /// Pod interfaces attached, by name, with the ifindex they had.
    pod_ifaces: BTreeMap<String, u32>,
    pod_patterns: Vec<String>,
}

impl Attachments {
    pub fn new(ebpf: &mut Ebpf, pod_patterns: Vec<String>) -> Result<Self> {
        let xdp: &mut Xdp = program(ebpf, program_names::XDP_FROM_WIRE)?.try_into()?;
        xdp.load().context("loading the XDP program")?;
        let tc: &mut SchedClassifier = program(ebpf, program_names::TC_FROM_POD)?.try_into()?;
        tc.load().context("loading the tc program")?;
        Ok(Self {
            pod_ifaces: BTreeMap::new(),
            pod_patterns,
        })
    }

    pub fn attach_wire(
        &mut self,
        ebpf: &mut Ebpf,
        iface: &str,
        mode: XdpAttachMode,
    ) -> Result<&'static str> {
        let xdp: &mut Xdp = program(ebpf, program_names::XDP_FROM_WIRE)?.try_into()?;
        let tried = match mode {
            XdpAttachMode::Native => xdp.attach(iface, XdpMode::Driver).map(|_| "native"),
            XdpAttachMode::Generic => xdp.attach(iface, XdpMode::Skb).map(|_| "generic"),
            XdpAttachMode::Auto => match xdp.attach(iface, XdpMode::Driver) {
                Ok(_) => Ok("native"),
                Err(e) => {
                    log::warn!("native XDP on {iface} failed ({e}); using generic XDP");
                    xdp.attach(iface, XdpMode::Skb).map(|_| "generic")
                }
            },
        };
        tried.with_context(|| format!("attaching XDP to {iface}"))
    }

    /// Attaches tc to pod interfaces that match the patterns and are new
    /// (or were re-created). Returns the names attached now.
    pub fn refresh_pod_interfaces(&mut self, ebpf: &mut Ebpf) -> Result<Vec<String>> {
        let present: BTreeMap<String, u32> = interfaces()
            .into_iter()
            .filter(|(_, n)| self.pod_patterns.iter().any(|p| glob_match(p, n)))
            .map(|(i, n)| (n, i))
            .collect();
        self.pod_ifaces.retain(|n, i| present.get(n) == Some(i));
        let mut attached = Vec::new();
        for (name, index) in present {
            if self.pod_ifaces.contains_key(&name) {
                continue;
            }
            let tc: &mut SchedClassifier = program(ebpf, program_names::TC_FROM_POD)?.try_into()?;
            match tc.attach(&name, TcAttachType::Ingress) {
                Ok(_) => {
                    self.pod_ifaces.insert(name.clone(), index);
                    attached.push(name);
                }
                // The veth may vanish between listing and attaching.
                Err(e) => log::warn!("attaching tc to {name}: {e}"),
            }
        }
        Ok(attached)
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    match ebpf.program_mut(name) {
        Some(p) => Ok(p),
        None => bail!("program {name} missing from the BPF object"),
    }
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match("lxc*", "lxc12ab"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("eth0", "eth0"));
        assert!(!glob_match("eth0", "eth01"));
        assert!(glob_match("v*h*", "veth9"));
        assert!(!glob_match("lxc*", "eth0"));
        assert!(glob_match("a*c", "abc"));
        assert!(!glob_match("ab*bc", "abc"));
    }
}
