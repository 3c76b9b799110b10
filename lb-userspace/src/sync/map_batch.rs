//! Reading a whole map with `BPF_MAP_LOOKUP_BATCH` (kernel 5.6+), a few
//! thousand entries a syscall, where aya 0.14 offers one syscall (or two)
//! an entry. Used where whole maps are read: the conntrack sweep, the
//! adoption of pinned maps, `lb-agent services` and `check`.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, BorrowedFd},
};

use aya::Pod;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Entries asked for per syscall (more when a hash bucket holds more).
const CHUNK: usize = 4096;

/// Every (key, value) of a hash, LRU hash or array map whose key and value
/// are `K` and `V`. Entries added or removed while it reads may or may not
/// be in the result (as with a walk key by key), none twice.
pub(crate) fn lookup_all<K: Pod, V: Pod>(map: BorrowedFd<'_>) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    let mut chunk = CHUNK;
    // The batch token: a bucket index for hashes, the last key for arrays.
    let token_size = size_of::<K>().max(8);
    let mut in_token = vec![0u8; token_size];
    let mut out_token = vec![0u8; token_size];
    let mut first = true;
    loop {
        let mut keys: Vec<K> = Vec::with_capacity(chunk);
        let mut values: Vec<V> = Vec::with_capacity(chunk);
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { in_token.as_ptr() as u64 },
            out_batch: out_token.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: the attribute points at buffers of `count` keys and
        // values and two tokens of at least the key size, all alive for
        // the call; the kernel writes at most that much.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>(),
            )
        };
        let err = (rc < 0).then(io::Error::last_os_error);
        match err.as_ref().and_then(io::Error::raw_os_error) {
            // One hash bucket holds more than `chunk`: ask for more.
            Some(libc::ENOSPC) if chunk < 1 << 20 => {
                chunk *= 4;
                continue;
            }
            None | Some(libc::ENOENT) => {}
            Some(_) => return Err(err.expect("an error")),
        }
        let n = attr.count as usize;
        // SAFETY: the kernel filled the first `count` keys and values.
        unsafe {
            keys.set_len(n);
            values.set_len(n);
        }
        out.extend(keys.into_iter().zip(values));
        // ENOENT: that was the last batch.
        if err.is_some() {
            return Ok(out);
        }
        std::mem::swap(&mut in_token, &mut out_token);
        first = false;
    }
}
