//! Test support for the load balancer: packet builders for BPF_PROG_TEST_RUN,
//! the privilege gate, the network-namespace lab, and raw bpf(2) probes.

pub mod apiserver;
pub mod bench;
pub mod bpf_access;
pub mod capabilities;
pub mod churn;
pub mod kube_lab;
pub mod lab;
pub mod load;
pub mod packet;
pub mod packet_harness;
pub mod privilege;
pub mod rollout;
pub mod workload;
