//! Privileged tests run for real where they can. Without root they skip
//! loudly, except under CI (CI=true), where a missing privilege is a failure.

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
