//! Privileged tests run for real where they can. Without root they skip
//! loudly, except under CI (CI=true), where a missing privilege is a failure.
//!
//! A test declares that it needs root in one way: `#[privileged_test]` in
//! place of `#[test]`, or by being named in `on_each_wire!`,
//! `on_each_source!` or `on_each_source_and_wire!`, whose variants are
//! such tests. Both put the gate below first in the test; no test calls it
//! itself.

/// True when the calling test may go on; false (after saying so) when it
/// must skip. The test is named by its thread, as the test harness names
/// it (`module::test`), so no name is typed by hand.
pub fn require_root() -> bool {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("this test");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        !std::env::var("CI").is_ok_and(|v| v == "true"),
        "{test}: needs root (BPF, network namespaces) and CI=true: not skipping"
    );
    eprintln!(
        "SKIPPED {test}: needs root (BPF, network namespaces); run `cargo xtask test` as root"
    );
    false
}
