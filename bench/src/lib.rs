//! `cargo xtask bench`'s measurements (run by the `lb-bench` binary): the
//! workload every mode is given, and one module per measurement.
//!
//! Every mode gets the same Services: N Services of one TCP port each, with
//! E endpoints each, at addresses that exist nowhere (no traffic goes to
//! them), plus the probed Services, whose endpoints are the lab's pods.
//! Either family: IPv4 Services, or IPv6 SingleStack ones (`Family`).

pub mod datapath;
pub mod forwarding;
pub mod kube_proxy;
pub mod nodeport_load;
pub mod plot;
pub mod programming;
pub mod rule_tools;
pub mod scale_source;
pub mod selection;
pub mod traffic;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_userspace::source::objects::{ServiceInfo, SliceInfo};
use serde_json::{json, Value};

use kube_proxy::{Family, ServicePort};

pub(crate) const BENCH_NAMESPACE: &str = "bench";

/// The i-th filler Service's ClusterIP. IPv4: in 10.96.0.0/12 above
/// 10.100.0.0 (the lab's own Services live in 10.96.0.0/16); .0 of each
/// /24 is skipped. IPv6: fd00:96:1::/96, beside the lab's fd00:96::/64.
pub(crate) fn filler_service_ip(family: Family, i: usize) -> IpAddr {
    match family {
        Family::Ipv4 => {
            let n = (i / 255) * 256 + i % 255 + 1;
            Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + n as u32).into()
        }
        Family::Ipv6 => {
            let base = Ipv6Addr::new(0xfd00, 0x96, 1, 0, 0, 0, 0, 0);
            Ipv6Addr::from(u128::from(base) + (i as u128 & 0xffff_ffff) + 1).into()
        }
    }
}

/// Endpoint `e` of filler Service `i`, outside the lab's pod ranges and
/// routed nowhere: IPv4 in 10.128.0.0/10, then 100.64.0.0/10 (64
/// addresses a Service, distinct for 131,072 Services), IPv6 in
/// fd00:128::/64.
pub(crate) fn filler_endpoint_ip(family: Family, i: usize, e: usize) -> IpAddr {
    match family {
        Family::Ipv4 => {
            let n = ((i * 64 + e + 1) % (1 << 23)) as u32;
            let (base, n) = if n < 1 << 22 {
                (Ipv4Addr::new(10, 128, 0, 0), n)
            } else {
                (Ipv4Addr::new(100, 64, 0, 0), n - (1 << 22))
            };
            Ipv4Addr::from(u32::from(base) + n).into()
        }
        Family::Ipv6 => {
            let (hi, lo, e) = ((i >> 16) as u16, i as u16, e as u16 + 1);
            Ipv6Addr::new(0xfd00, 0x128, 0, 0, 0, hi, lo, e).into()
        }
    }
}

/// N filler Services of `family` with `endpoints` endpoints each (port 80
/// -> 8080, TCP). IPv6 ones are named svc6-i, so both families can be
/// programmed side by side.
pub fn filler_services(family: Family, n: usize, endpoints: usize) -> Vec<ServicePort> {
    let prefix = match family {
        Family::Ipv4 => "svc",
        Family::Ipv6 => "svc6",
    };
    (0..n)
        .map(|i| ServicePort {
            namespace: BENCH_NAMESPACE.into(),
            name: format!("{prefix}-{i}"),
            port_name: "http".into(),
            cluster_ip: filler_service_ip(family, i),
            port: 80,
            protocol: "tcp",
            endpoints: (0..endpoints)
                .map(|e| (filler_endpoint_ip(family, i, e), 8080))
                .collect(),
            node_port: None,
        })
        .collect()
}

/// The Kubernetes objects of one Service port: its Service and one
/// EndpointSlice, as the API server would hold them (a SingleStack Service
/// of the port's family, defaulted: `ipFamilies`, `clusterIPs`).
pub(crate) fn k8s_objects(s: &ServicePort) -> (Value, Value) {
    let protocol = s.protocol.to_uppercase();
    let target = s.endpoints.first().map_or(s.port, |e| e.1);
    let (ip, family) = (s.cluster_ip.to_string(), s.family().to_string());
    let service = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": s.name, "namespace": s.namespace},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                 "ipFamilies": [family], "ipFamilyPolicy": "SingleStack",
                 "selector": {"app": s.name},
                 "ports": [{"name": s.port_name, "port": s.port, "protocol": protocol,
                            "targetPort": target}]}});
    let endpoints: Vec<Value> = s
        .endpoints
        .iter()
        .map(|(addr, _)| json!({"addresses": [addr.to_string()], "conditions": {"ready": true}}))
        .collect();
    let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{}-bench", s.name), "namespace": s.namespace,
                     "labels": {"kubernetes.io/service-name": s.name}},
        "addressType": family, "endpoints": endpoints,
        "ports": [{"name": s.port_name, "port": target, "protocol": protocol}]});
    (service, slice)
}

/// Services and EndpointSlices for in-process translation, read as the
/// agent's sources read them.
pub(crate) fn typed_objects(ports: &[ServicePort]) -> (Vec<ServiceInfo>, Vec<SliceInfo>) {
    ports.iter().map(typed_object).unzip()
}

/// One Service port's objects, read as the agent's sources read them.
pub(crate) fn typed_object(port: &ServicePort) -> (ServiceInfo, SliceInfo) {
    let (svc, slice) = k8s_objects(port);
    let svc: Service = serde_json::from_value(svc).expect("a valid Service");
    let slice: EndpointSlice = serde_json::from_value(slice).expect("a valid EndpointSlice");
    (svc.into(), slice.into())
}

/// The agent's `--frontends-max`, `--backends-max` and `--services-max`
/// for `services` Services of one port with `endpoints` endpoints each,
/// and `extra` endpoints added later, where the defaults are too small
/// (see `map_sizes`).
pub fn capacity_flags(services: usize, endpoints: usize, extra: usize) -> Vec<String> {
    let sizes = map_sizes(
        services,
        services * endpoints + extra,
        services * (1 + endpoints) + extra,
    );
    let defaults = lb_userspace::datapath::loader::MapSizes::default();
    [
        ("--frontends-max", sizes.frontends, defaults.frontends),
        ("--backends-max", sizes.backends, defaults.backends),
        ("--services-max", sizes.services, defaults.services),
    ]
    .into_iter()
    .filter(|(_, size, default)| size != default)
    .flat_map(|(flag, size, _)| [flag.to_owned(), size.to_string()])
    .collect()
}

/// Map sizes for `frontends` frontends, `backends` backends of one family
/// and `slots` service slots of one family: the defaults, or the next power
/// of two of what they use (as the agent's capacity flags would set them).
pub(crate) fn map_sizes(
    frontends: usize,
    backends: usize,
    slots: usize,
) -> lb_userspace::datapath::loader::MapSizes {
    let at_least = |need: usize, default: u32| {
        u32::try_from(need.next_power_of_two()).map_or(u32::MAX, |p| p.max(default))
    };
    let defaults = lb_userspace::datapath::loader::MapSizes::default();
    // Id 0 is none.
    lb_userspace::datapath::loader::MapSizes {
        frontends: at_least(frontends + 1, defaults.frontends),
        backends: at_least(backends + 1, defaults.backends),
        services: at_least(slots, defaults.services),
        ..defaults
    }
}

/// The BPF object loaded (not pinned) with maps of `sizes`.
pub(crate) fn load_sized(
    sizes: lb_userspace::datapath::loader::MapSizes,
) -> anyhow::Result<aya::Ebpf> {
    use anyhow::Context;
    let config = lb_userspace::datapath::loader::LoadConfig {
        sizes,
        ..Default::default()
    };
    lb_userspace::datapath::loader::object_loader(&config)
        .load(lb_userspace::EBPF_OBJECT)
        .context("loading the BPF object")
}

/// The agent's sync engine on fresh `maps` of `sizes`, with the id limits
/// and service slots those sizes give.
pub(crate) fn programmer_on(
    maps: lb_userspace::sync::map_writer::BpfMaps,
    sizes: &lb_userspace::datapath::loader::MapSizes,
) -> lb_userspace::sync::programmer::Programmer<lb_userspace::sync::map_writer::BpfMaps> {
    let mut programmer = lb_userspace::sync::programmer::Programmer::new(
        maps,
        lb_userspace::sync::differ::MapContents::default(),
        lb_userspace::serve::metrics::Metrics::new(),
    );
    programmer.limits = sizes.id_limits();
    programmer.service_slots = sizes.services;
    programmer
}

/// The value at quantile `p` (0..=1) of sorted samples.
pub fn percentile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 10.0 {
        format!("{ms:.3} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

/// "1,000" for 1000: tables read better with thousands separated.
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// (busy, total) jiffies of all CPUs, from /proc/stat.
fn cpu_times() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    // idle and iowait
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Waits (up to two minutes) until the machine is nearly idle. The kernel
/// frees large iptables and nftables rule sets (a flush, a namespace that
/// goes) in the background for seconds to minutes; a measurement taken
/// meanwhile would charge that work to whichever mode runs next.
pub(crate) fn wait_for_quiet() {
    let deadline = std::time::Instant::now() + Duration::from_mins(2);
    let started = std::time::Instant::now();
    loop {
        let Some((b0, t0)) = cpu_times() else { return };
        std::thread::sleep(Duration::from_millis(500));
        let Some((b1, t1)) = cpu_times() else { return };
        let busy = (b1 - b0) as f64 / (t1 - t0).max(1) as f64;
        if busy < 0.10 {
            if started.elapsed() > Duration::from_secs(2) {
                progress(&format!(
                    "waited {:.0} s for the kernel's background work to end",
                    started.elapsed().as_secs_f64()
                ));
            }
            return;
        }
        if std::time::Instant::now() > deadline {
            progress(&format!(
                "machine still {:.0}% busy after 120 s: measuring anyway",
                busy * 100.0
            ));
            return;
        }
    }
}

/// Progress on stderr (stdout carries the report).
pub fn progress(msg: &str) {
    eprintln!("[bench {}] {msg}", chrono::Utc::now().format("%H:%M:%S"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube_proxy::FAMILIES;

    /// Whether `ip` is in the IPv4 `(first, prefix)` or IPv6 one.
    fn within(ip: IpAddr, v4: (Ipv4Addr, u32), v6: (Ipv6Addr, u32)) -> bool {
        match ip {
            IpAddr::V4(a) => u32::from(a) >> (32 - v4.1) == u32::from(v4.0) >> (32 - v4.1),
            IpAddr::V6(a) => u128::from(a) >> (128 - v6.1) == u128::from(v6.0) >> (128 - v6.1),
        }
    }

    #[test]
    fn capacity_flags_appear_only_past_the_defaults() {
        assert!(capacity_flags(10_000, 10, 20).is_empty());
        assert_eq!(
            capacity_flags(100_000, 10, 20).join(" "),
            "--frontends-max 131072 --backends-max 1048576 --services-max 2097152"
        );
    }

    #[test]
    fn filler_addresses_are_distinct_and_outside_the_lab_ranges() {
        let lab_services = (
            (Ipv4Addr::new(10, 96, 0, 0), 16),
            ("fd00:96::".parse().unwrap(), 64),
        );
        let lab_pods = (
            (Ipv4Addr::new(10, 244, 0, 0), 16),
            ("fd00:10:244::".parse().unwrap(), 48),
        );
        for family in FAMILIES {
            let mut seen = std::collections::BTreeSet::new();
            for i in 0..100_000 {
                let ip = filler_service_ip(family, i);
                assert_eq!(Family::of(ip), family);
                assert!(seen.insert(ip), "{ip} twice");
                assert!(!within(ip, lab_services.0, lab_services.1), "{ip}");
                let in_range = within(
                    ip,
                    (Ipv4Addr::new(10, 100, 0, 0), 14),
                    ("fd00:96:1::".parse().unwrap(), 96),
                );
                assert!(in_range, "{ip}");
                if let IpAddr::V4(v4) = ip {
                    assert_ne!(v4.octets()[3], 0);
                }
            }
            let mut eps = std::collections::HashSet::new();
            for i in 0..100_000 {
                for e in 0..10 {
                    let ip = filler_endpoint_ip(family, i, e);
                    assert!(eps.insert(ip), "{ip} twice");
                    assert!(!within(ip, lab_pods.0, lab_pods.1), "{ip}");
                    let in_range = within(
                        ip,
                        (Ipv4Addr::new(10, 128, 0, 0), 10),
                        ("fd00:128::".parse().unwrap(), 64),
                    ) || within(
                        ip,
                        (Ipv4Addr::new(100, 64, 0, 0), 10),
                        ("fd00:128::".parse().unwrap(), 64),
                    );
                    assert!(in_range, "{ip}");
                }
            }
        }
    }

    #[test]
    fn objects_translate_to_one_frontend_with_every_endpoint() {
        for family in FAMILIES {
            let ports = filler_services(family, 3, 4);
            let (services, slices) = typed_objects(&ports);
            let t = lb_userspace::translate::translate(&services, &slices);
            assert!(t.errors.is_empty(), "{family:?}: {:?}", t.errors);
            assert_eq!(t.state.entries().len(), 3, "{family:?}");
            for entry in t.state.entries().values() {
                assert_eq!(entry.backends.active.len(), 4, "{family:?}");
            }
        }
    }

    #[test]
    fn ipv6_objects_are_defaulted_single_stack() {
        let (svc, slice) = k8s_objects(&filler_services(Family::Ipv6, 1, 1)[0]);
        assert_eq!(svc["spec"]["ipFamilies"], json!(["IPv6"]));
        assert_eq!(svc["spec"]["ipFamilyPolicy"], json!("SingleStack"));
        assert_eq!(svc["spec"]["clusterIP"], json!("fd00:96:1::1"));
        assert_eq!(svc["spec"]["clusterIPs"], json!(["fd00:96:1::1"]));
        assert_eq!(slice["addressType"], json!("IPv6"));
        assert_eq!(slice["endpoints"][0]["addresses"], json!(["fd00:128::1"]));
    }

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(1), "1");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(30000), "30,000");
        assert_eq!(thousands(100_000), "100,000");
    }
}
