//! Batched map syscalls (kernel 5.6+), a few thousand entries a syscall
//! where aya 0.14 offers one syscall (or two) an entry:
//! `BPF_MAP_LOOKUP_BATCH` where whole maps are read (the conntrack sweep,
//! the adoption of pinned maps, `lb-agent services` and `check`), and
//! `BPF_MAP_UPDATE_BATCH` / `BPF_MAP_DELETE_BATCH` where a sync writes
//! runs of entries; and `BPF_MAP_LOOKUP_AND_DELETE_ELEM` for the sweep. The kernel applies a batch's elements in order and
//! stops at the first that fails, so readers see what a write one by one
//! would have shown them at some point, and the caller learns how many
//! went in.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, BorrowedFd},
};

use aya::Pod;
use aya_obj::generated::{
    bpf_attr__bindgen_ty_2 as ElemAttr, bpf_attr__bindgen_ty_2__bindgen_ty_1 as ElemValue,
    bpf_attr__bindgen_ty_3 as BatchAttr, bpf_cmd,
};

/// A `batch` member of `union bpf_attr` for `map` and `count` entries,
/// everything else zero (`BPF_ANY`, no flags).
fn batch_attr(map: BorrowedFd<'_>, count: usize) -> BatchAttr {
    BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: 0,
        values: 0,
        count: count as u32,
        map_fd: map.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    }
}

/// `bpf(cmd, attr)`, with the batch member as the attribute.
fn bpf_batch(cmd: bpf_cmd, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid batch attribute whose pointers the caller
    // keeps alive for the call; the kernel reads and writes at most its size.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut BatchAttr,
            size_of::<BatchAttr>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Removes `key` from a hash map and returns the value it held, in one
/// step (`BPF_MAP_LOOKUP_AND_DELETE_ELEM`, kernel 5.14+ for hashes): what
/// was removed is what was there at that moment, not at an earlier look.
/// None when the key was absent.
pub(crate) fn take<K: Pod, V: Pod>(map: BorrowedFd<'_>, key: &K) -> io::Result<Option<V>> {
    let mut value = std::mem::MaybeUninit::<V>::uninit();
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: std::ptr::from_ref(key) as u64,
        __bindgen_anon_1: ElemValue {
            value: value.as_mut_ptr() as u64,
        },
        flags: 0,
    };
    // SAFETY: `attr` points at a key and a value buffer of the map's sizes
    // (`K`, `V`), alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_MAP_LOOKUP_AND_DELETE_ELEM as libc::c_long,
            &raw mut attr,
            size_of::<ElemAttr>(),
        )
    };
    if rc < 0 {
        let error = io::Error::last_os_error();
        return match error.raw_os_error() {
            Some(libc::ENOENT) => Ok(None),
            _ => Err(error),
        };
    }
    // SAFETY: the kernel wrote the removed value.
    Ok(Some(unsafe { value.assume_init() }))
}

/// A batch write that stopped: how many entries went in before the one
/// that failed, and why it failed.
#[derive(Debug)]
pub(crate) struct BatchStopped {
    pub(crate) written: usize,
    pub(crate) error: io::Error,
}

/// Writes `keys[i] -> values[i]` in order (`BPF_ANY`), `CHUNK` a syscall.
pub(crate) fn update_all<K: Pod, V: Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), BatchStopped> {
    assert_eq!(keys.len(), values.len(), "a value per key");
    let mut done = 0;
    for (k, v) in keys.chunks(CHUNK).zip(values.chunks(CHUNK)) {
        let mut attr = batch_attr(map, k.len());
        attr.keys = k.as_ptr() as u64;
        attr.values = v.as_ptr() as u64;
        if let Err(error) = bpf_batch(bpf_cmd::BPF_MAP_UPDATE_BATCH, &mut attr) {
            return Err(BatchStopped {
                written: done + attr.count as usize,
                error,
            });
        }
        done += k.len();
    }
    Ok(())
}

/// Deletes `keys` in order, `CHUNK` a syscall; a key that is absent stops
/// the batch there (ENOENT), as it would stop a delete one by one.
pub(crate) fn delete_all<K: Pod>(map: BorrowedFd<'_>, keys: &[K]) -> Result<(), BatchStopped> {
    let mut done = 0;
    for k in keys.chunks(CHUNK) {
        let mut attr = batch_attr(map, k.len());
        attr.keys = k.as_ptr() as u64;
        if let Err(error) = bpf_batch(bpf_cmd::BPF_MAP_DELETE_BATCH, &mut attr) {
            return Err(BatchStopped {
                written: done + attr.count as usize,
                error,
            });
        }
        done += k.len();
    }
    Ok(())
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
        let mut attr = batch_attr(map, chunk);
        attr.in_batch = if first { 0 } else { in_token.as_ptr() as u64 };
        attr.out_batch = out_token.as_mut_ptr() as u64;
        attr.keys = keys.as_mut_ptr() as u64;
        attr.values = values.as_mut_ptr() as u64;
        // The attribute points at buffers of `count` keys and values and
        // two tokens of at least the key size, all alive for the call.
        let err = bpf_batch(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut attr).err();
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
