//! Builds the BPF object (lb-ebpf) with the nightly toolchain and bpf-linker,
//! so the agent can embed it. `cargo xtask setup` installs both.
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let ebpf = Package {
        name: "lb-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf"),
        ..Default::default()
    };
    println!("cargo:rerun-if-changed=../lb-common/src");
    aya_build::build_ebpf([ebpf], Toolchain::default())
}
