//! Raw bpf(2) calls for probing who may open and change pinned objects.
//! The errno of each attempt is the point, so nothing is wrapped, retried or
//! raised (no RLIMIT_MEMLOCK games, no feature probes) as a library would.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_F_RDONLY: u32 = 1 << 3;
const BPF_EXIST: u64 = 2;

/// `union bpf_attr`, zeroed; each command reads its own prefix of it.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Self([0; 128])
    }

    fn put_u32(&mut self, offset: usize, v: u32) -> &mut Self {
        self.0[offset..offset + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }

    fn put_u64(&mut self, offset: usize, v: u64) -> &mut Self {
        self.0[offset..offset + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a zero-filled bpf_attr of the size we pass; pointers
    // in it point at buffers that outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            attr.0.len() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn fd_of(rc: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel just handed us this new fd.
    unsafe { OwnedFd::from_raw_fd(rc as i32) }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// BPF_OBJ_GET: a new fd on the object pinned at `path`, read-write or
/// read-only (BPF_F_RDONLY, honoured by maps).
pub fn obj_get(path: &Path, read_only: bool) -> io::Result<OwnedFd> {
    let path = c_path(path)?;
    let mut attr = Attr::new();
    attr.put_u64(0, path.as_ptr() as u64)
        .put_u32(12, if read_only { BPF_F_RDONLY } else { 0 });
    bpf(BPF_OBJ_GET, &mut attr).map(fd_of)
}

/// BPF_OBJ_PIN: pins `fd` at `path`.
pub fn obj_pin(fd: &OwnedFd, path: &Path) -> io::Result<()> {
    let path = c_path(path)?;
    let mut attr = Attr::new();
    attr.put_u64(0, path.as_ptr() as u64)
        .put_u32(8, fd.as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// A new array map of `entries` u64 values.
pub fn create_array(entries: u32) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.put_u32(0, BPF_MAP_TYPE_ARRAY)
        .put_u32(4, 4)
        .put_u32(8, 8)
        .put_u32(12, entries);
    bpf(BPF_MAP_CREATE, &mut attr).map(fd_of)
}

/// (key size, value size) of the map behind `fd`.
fn key_value_sizes(fd: &OwnedFd) -> io::Result<(usize, usize)> {
    // struct bpf_map_info starts: type, id, key_size, value_size (u32 each).
    let mut info = [0u8; 88];
    let mut attr = Attr::new();
    attr.put_u32(0, fd.as_raw_fd() as u32)
        .put_u32(4, info.len() as u32)
        .put_u64(8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let u32_at = |o: usize| u32::from_ne_bytes(info[o..o + 4].try_into().unwrap()) as usize;
    Ok((u32_at(8), u32_at(12)))
}

/// Writes the first entry of the map pinned at `path` back unchanged: a
/// write the kernel must allow or refuse, that changes nothing if allowed.
pub fn rewrite_first_entry(path: &Path) -> io::Result<()> {
    let fd = obj_get(path, false)?;
    let (key_size, value_size) = key_value_sizes(&fd)?;
    let mut key = vec![0u8; key_size];
    // Per-CPU maps take one 8-byte aligned value per possible CPU.
    let mut value = vec![0u8; value_size.next_multiple_of(8) * 1024];
    let mut attr = Attr::new();
    attr.put_u32(0, fd.as_raw_fd() as u32)
        .put_u64(8, 0)
        .put_u64(16, key.as_mut_ptr() as u64);
    bpf(BPF_MAP_GET_NEXT_KEY, &mut attr)?;
    let mut attr = Attr::new();
    attr.put_u32(0, fd.as_raw_fd() as u32)
        .put_u64(8, key.as_ptr() as u64)
        .put_u64(16, value.as_mut_ptr() as u64);
    bpf(BPF_MAP_LOOKUP_ELEM, &mut attr)?;
    let mut attr = Attr::new();
    attr.put_u32(0, fd.as_raw_fd() as u32)
        .put_u64(8, key.as_ptr() as u64)
        .put_u64(16, value.as_ptr() as u64)
        .put_u64(24, BPF_EXIST);
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}
