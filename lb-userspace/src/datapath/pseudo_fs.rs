//! The kernel pseudo-filesystems the agent needs (bpffs for pins, cgroup2
//! for the socket hooks): is one mounted at a path, and mounting one.

use std::{ffi::CString, path::Path};

pub(crate) const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
pub(crate) const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Whether the filesystem holding `path` has the magic number `magic`.
pub fn is(path: &Path, magic: i64) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out pointer.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == magic }
}

/// Mounts a filesystem of type `fstype` (no source, no options) on `path`.
pub fn mount(fstype: &str, path: &Path) -> std::io::Result<()> {
    let target = CString::new(path.as_os_str().as_encoded_bytes())?;
    let fstype = CString::new(fstype)?;
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
