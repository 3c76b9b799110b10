//! What a real API server adds to an object before it stores and serves
//! it (defaulting, ClusterIP family fields, an empty status), so the
//! fixture serves Services and EndpointSlices the way agents in a cluster
//! receive them: with `clusterIPs`, `ipFamilies`, `ipFamilyPolicy`,
//! `internalTrafficPolicy`, `sessionAffinity: None`, `status`, a
//! `creationTimestamp`, `managedFields` and the `kubectl` annotation.
//! Values a test gives are kept.

use serde_json::{json, Map, Value};

/// Fills in what the API server defaults on `object` (by its `kind`).
pub fn apply(object: &mut Value) {
    let meta = object["metadata"].as_object_mut().map(std::mem::take);
    if let Some(mut meta) = meta {
        metadata(&mut meta);
        object["metadata"] = Value::Object(meta);
    }
    match object["kind"].as_str() {
        Some("Service") => service(object),
        Some("EndpointSlice") => endpoint_slice(object),
        _ => {}
    }
}

fn metadata(meta: &mut Map<String, Value>) {
    meta.entry("creationTimestamp")
        .or_insert_with(|| json!("2026-12-01T00:00:00Z"));
    meta.entry("generation").or_insert_with(|| json!(1));
    // What every object written by kubectl carries, and agents must not
    // keep: managed fields and the last applied configuration.
    meta.entry("managedFields").or_insert_with(|| {
        json!([{"manager": "kubectl-client-side-apply", "operation": "Update",
            "apiVersion": "v1", "time": "2026-12-01T00:00:00Z", "fieldsType": "FieldsV1",
            "fieldsV1": {"f:metadata": {"f:annotations": {}}}}])
    });
    let annotations = meta
        .entry("annotations")
        .or_insert_with(|| json!({}))
        .as_object_mut();
    if let Some(a) = annotations {
        a.entry("kubectl.kubernetes.io/last-applied-configuration")
            .or_insert_with(|| json!("{\"apiVersion\":\"v1\",\"kind\":\"...\"}\n"));
    }
}

/// The family of an address text (IPv6 when it has a colon).
fn family(ip: &str) -> &'static str {
    if ip.contains(':') {
        "IPv6"
    } else {
        "IPv4"
    }
}

fn service(object: &mut Value) {
    let spec = &mut object["spec"];
    let kind = spec["type"].as_str().unwrap_or("ClusterIP").to_owned();
    default(spec, "type", json!(kind));
    default(spec, "sessionAffinity", json!("None"));
    if kind != "ExternalName" {
        default(spec, "internalTrafficPolicy", json!("Cluster"));
        cluster_ip_families(spec);
    }
    if kind == "NodePort" || kind == "LoadBalancer" {
        default(spec, "externalTrafficPolicy", json!("Cluster"));
    }
    if kind == "LoadBalancer" {
        default(spec, "allocateLoadBalancerNodePorts", json!(true));
    }
    if let Some(ports) = spec["ports"].as_array_mut() {
        for p in ports {
            default(p, "protocol", json!("TCP"));
            let port = p["port"].clone();
            default(p, "targetPort", port);
        }
    }
    let status = &mut object["status"];
    if !status.is_object() {
        *status = json!({});
    }
    default(status, "loadBalancer", json!({}));
}

/// `clusterIPs` from `clusterIP` (or the other way round), `ipFamilies`
/// from the addresses, `ipFamilyPolicy` SingleStack for one address and
/// RequireDualStack for two. As on a dual-stack cluster, a Service whose
/// policy is PreferDualStack or RequireDualStack gets the other family
/// too (after the ones it names) and an address of it (see `allocate`).
fn cluster_ip_families(spec: &mut Value) {
    let mut ips: Vec<String> = match spec["clusterIPs"].as_array() {
        Some(list) if !list.is_empty() => list
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => spec["clusterIP"]
            .as_str()
            .map(|ip| vec![ip.to_owned()])
            .unwrap_or_default(),
    };
    if ips.is_empty() {
        return;
    }
    default(spec, "clusterIP", json!(ips[0]));
    if ips[0] == "None" {
        default(spec, "clusterIPs", json!(ips));
        return;
    }
    let single = if ips.len() > 1 {
        "RequireDualStack"
    } else {
        "SingleStack"
    };
    default(spec, "ipFamilyPolicy", json!(single));
    let mut families: Vec<String> = match spec["ipFamilies"].as_array() {
        Some(list) if !list.is_empty() => list
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => ips.iter().map(|ip| family(ip).to_owned()).collect(),
    };
    if spec["ipFamilyPolicy"] != json!("SingleStack") && families.len() == 1 {
        let other = if families[0] == "IPv6" {
            "IPv4"
        } else {
            "IPv6"
        };
        families.push(other.to_owned());
    }
    for wanted in families.iter().skip(ips.len()) {
        match allocate(wanted, &ips[0]) {
            Some(ip) => ips.push(ip),
            None => break,
        }
    }
    families.truncate(ips.len());
    spec["clusterIPs"] = json!(ips);
    spec["ipFamilies"] = json!(families);
}

/// The fixture's allocator for a dual-stack Service's second address:
/// the mirror of its first, 10.96.c.d and fd00:96::c:d (decimal octets
/// written as hex groups), so either is read off the other. None when the
/// first is not of that shape.
fn allocate(family_wanted: &str, first: &str) -> Option<String> {
    let ip: std::net::IpAddr = first.parse().ok()?;
    match (family_wanted, ip) {
        ("IPv6", std::net::IpAddr::V4(v4)) => {
            let [_, _, c, d] = v4.octets();
            let text = format!("fd00:96::{c}:{d}");
            // As the API server writes it: the canonical text.
            Some(text.parse::<std::net::Ipv6Addr>().ok()?.to_string())
        }
        ("IPv4", std::net::IpAddr::V6(v6)) => {
            let groups = v6.segments();
            let octet = |g: u16| format!("{g:x}").parse::<u8>().ok();
            Some(format!("10.96.{}.{}", octet(groups[6])?, octet(groups[7])?))
        }
        _ => None,
    }
}

fn endpoint_slice(object: &mut Value) {
    if let Some(ports) = object["ports"].as_array_mut() {
        for p in ports {
            default(p, "protocol", json!("TCP"));
        }
    }
}

fn default(object: &mut Value, key: &str, value: Value) {
    if let Some(map) = object.as_object_mut() {
        let entry = map.entry(key).or_insert(Value::Null);
        if entry.is_null() {
            *entry = value;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_service_is_served_as_the_api_server_defaults_it() {
        let mut s = json!({"kind": "Service", "metadata": {"name": "web"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "ports": [{"port": 80, "nodePort": 30080}]}});
        apply(&mut s);
        assert_eq!(s["spec"]["clusterIPs"], json!(["10.96.0.10"]));
        assert_eq!(s["spec"]["ipFamilies"], json!(["IPv4"]));
        assert_eq!(s["spec"]["ipFamilyPolicy"], json!("SingleStack"));
        assert_eq!(s["spec"]["internalTrafficPolicy"], json!("Cluster"));
        assert_eq!(s["spec"]["externalTrafficPolicy"], json!("Cluster"));
        assert_eq!(s["spec"]["sessionAffinity"], json!("None"));
        assert_eq!(s["spec"]["ports"][0]["protocol"], json!("TCP"));
        assert_eq!(s["spec"]["ports"][0]["targetPort"], json!(80));
        assert_eq!(s["status"], json!({"loadBalancer": {}}));
        assert!(s["metadata"]["managedFields"].is_array());
    }

    #[test]
    fn dual_stack_fields_follow_the_addresses_and_given_values_stay() {
        let mut s = json!({"kind": "Service", "metadata": {"name": "web"},
            "spec": {"clusterIPs": ["fd00::10", "10.96.0.10"], "ports": [{"port": 80}],
                "ipFamilyPolicy": "PreferDualStack"},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}}});
        apply(&mut s);
        assert_eq!(s["spec"]["clusterIP"], json!("fd00::10"));
        assert_eq!(s["spec"]["ipFamilies"], json!(["IPv6", "IPv4"]));
        assert_eq!(s["spec"]["ipFamilyPolicy"], json!("PreferDualStack"));
        assert_eq!(
            s["status"]["loadBalancer"]["ingress"][0]["ip"],
            json!("192.0.2.1")
        );
    }

    fn defaulted(spec: Value) -> Value {
        let mut s = json!({"kind": "Service", "metadata": {"name": "web"}, "spec": spec});
        apply(&mut s);
        s["spec"].take()
    }

    #[test]
    fn an_unset_policy_is_single_stack_ipv4_or_ipv6_by_the_address() {
        let v4 = defaulted(json!({"clusterIP": "10.96.0.40", "ports": [{"port": 80}]}));
        assert_eq!(v4["ipFamilies"], json!(["IPv4"]));
        assert_eq!(v4["ipFamilyPolicy"], json!("SingleStack"));
        let v6 = defaulted(json!({"clusterIP": "fd00:96::42", "ports": [{"port": 80}]}));
        assert_eq!(v6["clusterIPs"], json!(["fd00:96::42"]));
        assert_eq!(v6["ipFamilies"], json!(["IPv6"]));
        assert_eq!(v6["ipFamilyPolicy"], json!("SingleStack"));
    }

    #[test]
    fn a_dual_stack_policy_gets_the_other_family_in_the_order_of_ip_families() {
        for policy in ["PreferDualStack", "RequireDualStack"] {
            let s = defaulted(json!({"clusterIP": "10.96.0.40", "ipFamilyPolicy": policy}));
            assert_eq!(s["clusterIPs"], json!(["10.96.0.40", "fd00:96::40"]));
            assert_eq!(s["ipFamilies"], json!(["IPv4", "IPv6"]));
            assert_eq!(s["ipFamilyPolicy"], json!(policy));
            let s = defaulted(json!({"clusterIP": "fd00:96::40", "ipFamilyPolicy": policy,
                "ipFamilies": ["IPv6"]}));
            assert_eq!(s["clusterIPs"], json!(["fd00:96::40", "10.96.0.40"]));
            assert_eq!(s["ipFamilies"], json!(["IPv6", "IPv4"]));
        }
        let given = defaulted(json!({"clusterIPs": ["fd00:96::41", "10.96.0.41"],
            "ipFamilies": ["IPv6", "IPv4"], "ipFamilyPolicy": "PreferDualStack"}));
        assert_eq!(given["clusterIPs"], json!(["fd00:96::41", "10.96.0.41"]));
        assert_eq!(given["ipFamilies"], json!(["IPv6", "IPv4"]));
    }

    #[test]
    fn a_headless_service_keeps_none() {
        let s = defaulted(json!({"clusterIP": "None", "ipFamilyPolicy": "PreferDualStack"}));
        assert_eq!(s["clusterIPs"], json!(["None"]));
    }
}
