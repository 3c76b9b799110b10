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
pub mod rate_load;
pub mod rollout;
pub mod workload;

/// Declares each named lab test once per kind of wire (see
/// `lab::Wire`): `software_wire::NAME` and `nic_wire::NAME`, each calling
/// `NAME(wire)`. For every test that sends from the wire, so both the
/// partial checksums of a software peer (tc) and the complete ones of a
/// NIC (XDP) are exercised.
#[macro_export]
macro_rules! on_each_wire {
    ($($name:ident),* $(,)?) => {
        mod software_wire {
            $(
                #[test]
                fn $name() {
                    super::$name($crate::lab::Wire::Software)
                }
            )*
        }
        mod nic_wire {
            $(
                #[test]
                fn $name() {
                    super::$name($crate::lab::Wire::Nic)
                }
            )*
        }
    };
}
