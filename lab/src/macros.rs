//! The macros that declare lab tests: one test per wire, per source of
//! desired state, or both. Each variant is a `#[privileged_test]`: the
//! named function is a plain function (no attribute, no privilege gate of
//! its own) that the variants call once the gate let them through.

/// Declares each named lab test once per kind of wire (see
/// `Wire`): `software_wire::NAME` and `nic_wire::NAME`, each calling
/// `NAME(wire)`. For every test that sends from the wire, so both the
/// partial checksums of a software peer (tc) and the complete ones of a
/// NIC (XDP) are exercised.
#[macro_export]
macro_rules! on_each_wire {
    ($($name:ident),* $(,)?) => {
        mod software_wire {
            $(
                #[$crate::privileged_test]
                fn $name() {
                    super::$name($crate::Wire::Software)
                }
            )*
        }
        mod nic_wire {
            $(
                #[$crate::privileged_test]
                fn $name() {
                    super::$name($crate::Wire::Nic)
                }
            )*
        }
    };
}

/// Declares each named lab test once per source of desired state (see
/// `Source`): `manifests::NAME` and `api::NAME`, each calling
/// `NAME(source, Wire::Software)`.
#[macro_export]
macro_rules! on_each_source {
    ($($name:ident),* $(,)?) => {
        $crate::lab_test_variants!(manifests, Manifests, Software, $($name),*);
        $crate::lab_test_variants!(api, Api, Software, $($name),*);
    };
}

/// Declares each named lab test for both sources and both wires:
/// `manifests_software_wire::NAME`, `api_nic_wire::NAME`, and the other
/// two, each calling `NAME(source, wire)`.
#[macro_export]
macro_rules! on_each_source_and_wire {
    ($($name:ident),* $(,)?) => {
        $crate::lab_test_variants!(manifests_software_wire, Manifests, Software, $($name),*);
        $crate::lab_test_variants!(manifests_nic_wire, Manifests, Nic, $($name),*);
        $crate::lab_test_variants!(api_software_wire, Api, Software, $($name),*);
        $crate::lab_test_variants!(api_nic_wire, Api, Nic, $($name),*);
    };
}

/// One module of test variants (for the two macros above).
#[macro_export]
macro_rules! lab_test_variants {
    ($module:ident, $source:ident, $wire:ident, $($name:ident),*) => {
        mod $module {
            $(
                #[$crate::privileged_test]
                fn $name() {
                    super::$name(
                        $crate::Source::$source,
                        $crate::Wire::$wire,
                    )
                }
            )*
        }
    };
}
