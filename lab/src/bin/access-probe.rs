//! access-probe: tries to reach the agent's pinned objects and files, and
//! reports each attempt's outcome, one line each:
//! `KIND:PATH<TAB>ok` or `KIND:PATH<TAB>errno N (message)`.
//!
//! `access-probe [--as UID] KIND:PATH...`: with `--as`, first becomes that
//! user and group (no supplementary groups, no capabilities, no new
//! privileges) and prints its identity as the first line (`identity ...`).
//!
//! Kinds: `obj-get` and `obj-get-ro` (BPF_OBJ_GET read-write, read-only),
//! `map-rewrite` (writes a map's first entry back unchanged), `open-write`
//! (open(2) for writing), `unlink`, `mkdir` and `symlink` (a new entry at
//! PATH, removed again if made), `list` (read a folder).

use std::{fs, io, os::unix::fs::OpenOptionsExt, path::Path, process::ExitCode};

use lb_lab::bpf_access;

fn attempt(kind: &str, path: &Path) -> io::Result<()> {
    match kind {
        "obj-get" => bpf_access::obj_get(path, false).map(drop),
        "obj-get-ro" => bpf_access::obj_get(path, true).map(drop),
        "map-rewrite" => bpf_access::rewrite_first_entry(path),
        "open-write" => fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map(drop),
        "unlink" => fs::remove_file(path),
        "mkdir" => fs::create_dir(path).and_then(|()| fs::remove_dir(path)),
        "symlink" => std::os::unix::fs::symlink("/", path).and_then(|()| fs::remove_file(path)),
        "list" => fs::read_dir(path).map(drop),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unknown attempt kind {kind}"),
        )),
    }
}

/// Becomes `id` (user and group), with no groups, capabilities or way back.
fn become_user(id: libc::uid_t) -> io::Result<()> {
    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    // SAFETY: plain syscalls on this single-threaded process; order matters
    // (groups and gid while still root, uid last, which clears capabilities).
    unsafe {
        check(libc::setgroups(0, std::ptr::null()))?;
        check(libc::setgid(id))?;
        check(libc::setuid(id))?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
    }
    Ok(())
}

/// uid, gid, groups and capability sets, from /proc/self/status.
fn identity() -> String {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let fields: Vec<String> = status
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| {
            [
                "Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapAmb",
            ]
            .contains(k)
        })
        .map(|(k, v)| format!("{k}={}", v.split_whitespace().collect::<Vec<_>>().join(",")))
        .collect();
    fields.join(" ")
}

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--as") {
        let Some(id) = args.get(1).and_then(|a| a.parse().ok()) else {
            eprintln!("usage: access-probe [--as UID] KIND:PATH...");
            return ExitCode::from(2);
        };
        if let Err(e) = become_user(id) {
            eprintln!("access-probe: becoming uid {id}: {e}");
            return ExitCode::from(2);
        }
        println!("identity {}", identity());
        args.drain(..2);
    }
    for spec in &args {
        let Some((kind, path)) = spec.split_once(':') else {
            eprintln!("access-probe: {spec}: want KIND:PATH");
            return ExitCode::from(2);
        };
        match attempt(kind, Path::new(path)) {
            Ok(()) => println!("{spec}\tok"),
            Err(e) => println!("{spec}\terrno {} ({e})", e.raw_os_error().unwrap_or(0)),
        }
    }
    ExitCode::SUCCESS
}
