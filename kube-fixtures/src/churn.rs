//! Many Services changing at random, as a busy cluster's API shows them:
//! endpoints coming and going and changing conditions, ports changing,
//! Services deleted and created again, turning NodePort and back, session
//! affinity switched, endpoints split over two slices. Pure and seeded: the
//! same seed gives the same changes. No traffic goes to these Services;
//! their endpoint addresses (10.245.0.0/16) belong to no pod.

use std::net::Ipv4Addr;

use serde_json::{json, Value};

/// The namespace the churned Services live in.
pub const NAMESPACE: &str = "churn";

/// A small, seeded xorshift generator: deterministic, no dependency.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ChurnEndpoint {
    pub ip: Ipv4Addr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ChurnService {
    pub index: usize,
    pub exists: bool,
    pub port: u16,
    pub node_port: bool,
    pub affinity: bool,
    pub endpoints: Vec<ChurnEndpoint>,
    /// Endpoints split over two slices.
    pub split: bool,
}

/// What one change asks the API server to do.
#[derive(Clone, Debug, PartialEq)]
pub enum ApiChange {
    Apply(Value),
    /// (kind, name) in [`NAMESPACE`].
    Delete(&'static str, String),
}

impl ChurnService {
    pub fn new(index: usize) -> Self {
        Self {
            index,
            exists: true,
            port: 80,
            node_port: false,
            affinity: false,
            endpoints: Vec::new(),
            split: false,
        }
    }

    pub fn name(&self) -> String {
        format!("churn-{}", self.index)
    }

    pub fn cluster_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(
            10,
            100,
            (self.index / 250) as u8,
            (self.index % 250 + 1) as u8,
        )
    }

    fn slice_name(&self, n: usize) -> String {
        format!("{}-{n}", self.name())
    }

    pub fn service_object(&self) -> Value {
        let mut port =
            json!({"name": "http", "port": self.port, "targetPort": 8080, "protocol": "TCP"});
        if self.node_port {
            // Unique per Service, inside the default NodePort range.
            port["nodePort"] = json!(30100 + self.index);
        }
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": self.name(), "namespace": NAMESPACE},
            "spec": {
                "type": if self.node_port { "NodePort" } else { "ClusterIP" },
                "clusterIP": self.cluster_ip().to_string(),
                "selector": {"app": self.name()},
                "sessionAffinity": if self.affinity { "ClientIP" } else { "None" },
                "ports": [port],
            }
        })
    }

    fn slice_object(&self, n: usize, endpoints: &[ChurnEndpoint]) -> Value {
        let endpoints: Vec<Value> = endpoints
            .iter()
            .map(|e| {
                json!({
                    "addresses": [e.ip.to_string()],
                    "conditions": {"ready": e.ready, "serving": e.serving, "terminating": e.terminating},
                    "nodeName": "lab-node",
                })
            })
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": self.slice_name(n),
                "namespace": NAMESPACE,
                "labels": {"kubernetes.io/service-name": self.name()},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints,
        })
    }

    /// The objects that describe this Service now (Service and slices), or
    /// their deletion.
    pub fn objects(&self) -> Vec<ApiChange> {
        if !self.exists {
            return vec![
                ApiChange::Delete("Service", self.name()),
                ApiChange::Delete("EndpointSlice", self.slice_name(0)),
                ApiChange::Delete("EndpointSlice", self.slice_name(1)),
            ];
        }
        let mut out = vec![ApiChange::Apply(self.service_object())];
        if self.split {
            let half = self.endpoints.len() / 2;
            out.push(ApiChange::Apply(
                self.slice_object(0, &self.endpoints[..half]),
            ));
            out.push(ApiChange::Apply(
                self.slice_object(1, &self.endpoints[half..]),
            ));
        } else {
            out.push(ApiChange::Apply(self.slice_object(0, &self.endpoints)));
            out.push(ApiChange::Delete("EndpointSlice", self.slice_name(1)));
        }
        out
    }

    /// One random change; returns what it was, for logs.
    pub fn mutate(&mut self, rng: &mut Rng) -> &'static str {
        if !self.exists {
            self.exists = true;
            return "created again";
        }
        match rng.below(100) {
            0..=49 => {
                // A shared pool, so backends are shared between Services.
                let n = rng.below(9) as usize;
                self.endpoints = (0..n)
                    .map(|_| {
                        let i = rng.below(2000) as u16;
                        let state = rng.below(10);
                        ChurnEndpoint {
                            ip: Ipv4Addr::new(10, 245, (i / 250) as u8, (i % 250 + 1) as u8),
                            ready: state < 7,
                            serving: state < 9,
                            terminating: state >= 7,
                        }
                    })
                    .collect();
                // One endpoint per address, as the controller writes them.
                self.endpoints.sort_by_key(|e| e.ip);
                self.endpoints.dedup_by_key(|e| e.ip);
                "endpoints"
            }
            50..=64 => {
                self.port = [80, 8080, 443, 1 + rng.below(65535) as u16][rng.below(4) as usize];
                "port"
            }
            65..=74 => {
                self.exists = false;
                "deleted"
            }
            75..=84 => {
                self.node_port = !self.node_port;
                "type"
            }
            85..=94 => {
                self.affinity = !self.affinity;
                "affinity"
            }
            _ => {
                self.split = !self.split;
                "slices"
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_changes() {
        let run = |seed| {
            let mut rng = Rng::new(seed);
            let mut s = ChurnService::new(7);
            (0..200)
                .map(|_| {
                    s.mutate(&mut rng);
                    s.objects()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn objects_parse_as_kubernetes_types() {
        let mut rng = Rng::new(1);
        let mut s = ChurnService::new(999);
        for _ in 0..500 {
            s.mutate(&mut rng);
            for c in s.objects() {
                let ApiChange::Apply(v) = c else { continue };
                match v["kind"].as_str() {
                    Some("Service") => {
                        let _: k8s_openapi::api::core::v1::Service =
                            serde_json::from_value(v).expect("a Service");
                    }
                    _ => {
                        let _: k8s_openapi::api::discovery::v1::EndpointSlice =
                            serde_json::from_value(v).expect("an EndpointSlice");
                    }
                }
            }
        }
        assert_eq!(s.cluster_ip(), Ipv4Addr::new(10, 100, 3, 250));
    }
}
