//! Loads the BPF object with its maps pinned under one bpffs folder. Maps a
//! previous agent pinned are adopted (reused, contents kept), so a restart
//! does not lose what the data path serves.

use std::{
    ffi::CString,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, HashMap, LpmTrie},
    Ebpf, EbpfLoader,
};
use lb_common::map_names;

use crate::map_writer::BpfMaps;

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out pointer.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// Makes sure `pin_dir` lives on a bpffs, mounting one on its parent if
/// needed (a fresh machine has none at /sys/fs/bpf).
pub fn ensure_pin_dir(pin_dir: &Path) -> Result<()> {
    let parent = pin_dir.parent().context("pin dir has no parent")?;
    if !is_bpffs(parent) {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        let target = CString::new(parent.as_os_str().as_encoded_bytes())?;
        let fstype = CString::new("bpf")?;
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
            bail!(
                "{} is not a bpffs and mounting one failed: {} (run as root, or `mount -t bpf bpf {}`)",
                parent.display(),
                std::io::Error::last_os_error(),
                parent.display()
            );
        }
        log::info!("mounted bpffs on {}", parent.display());
    }
    fs::create_dir_all(pin_dir).with_context(|| format!("creating {}", pin_dir.display()))?;
    Ok(())
}

pub fn map_pin_path(pin_dir: &Path, name: &str) -> PathBuf {
    pin_dir.join(name)
}

/// Loads the programs, creating or adopting the pinned maps.
pub fn load(pin_dir: &Path) -> Result<Ebpf> {
    ensure_pin_dir(pin_dir)?;
    let mut loader = EbpfLoader::new();
    for name in map_names::ALL {
        loader.map_pin_path(name, map_pin_path(pin_dir, name));
    }
    loader
        .load(crate::EBPF_OBJECT)
        .context("loading the BPF object (needs root: CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)")
}

/// Takes the maps the agent writes out of a loaded object.
pub fn take_maps(ebpf: &mut Ebpf) -> Result<BpfMaps> {
    let mut take = |name: &str| {
        ebpf.take_map(name)
            .with_context(|| format!("map {name} missing from the object"))
    };
    Ok(BpfMaps {
        services: HashMap::try_from(take(map_names::SERVICES)?)?,
        backends: HashMap::try_from(take(map_names::BACKENDS)?)?,
        rev_nat: HashMap::try_from(take(map_names::REV_NAT)?)?,
        backend_match: HashMap::try_from(take(map_names::BACKEND_MATCH)?)?,
        source_ranges: LpmTrie::try_from(take(map_names::SOURCE_RANGES)?)?,
        config: Array::try_from(take(map_names::CONFIG)?)?,
    })
}

/// Opens the pinned maps without loading programs (for inspection).
pub fn open_pinned(pin_dir: &Path) -> Result<BpfMaps> {
    let open = |name: &str| -> Result<aya::maps::MapData> {
        let path = map_pin_path(pin_dir, name);
        aya::maps::MapData::from_pin(&path).with_context(|| {
            format!(
                "opening {} (is the agent running, with --pin-dir {}?)",
                path.display(),
                pin_dir.display()
            )
        })
    };
    Ok(BpfMaps {
        services: HashMap::try_from(aya::maps::Map::HashMap(open(map_names::SERVICES)?))?,
        backends: HashMap::try_from(aya::maps::Map::HashMap(open(map_names::BACKENDS)?))?,
        rev_nat: HashMap::try_from(aya::maps::Map::HashMap(open(map_names::REV_NAT)?))?,
        backend_match: HashMap::try_from(aya::maps::Map::HashMap(open(map_names::BACKEND_MATCH)?))?,
        source_ranges: LpmTrie::try_from(aya::maps::Map::LpmTrie(open(map_names::SOURCE_RANGES)?))?,
        config: Array::try_from(aya::maps::Map::Array(open(map_names::CONFIG)?))?,
    })
}

/// Removes the pinned links (which detaches the programs) and the pinned
/// maps, and the folders if they are then empty.
pub fn cleanup(pin_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let links = crate::attach::links_dir(pin_dir);
    if let Ok(entries) = fs::read_dir(&links) {
        for e in entries.flatten() {
            fs::remove_file(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
            removed.push(e.path());
        }
    }
    let _ = fs::remove_dir(&links);
    for name in map_names::ALL {
        let p = map_pin_path(pin_dir, name);
        match fs::remove_file(&p) {
            Ok(()) => removed.push(p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", p.display())),
        }
    }
    let _ = fs::remove_dir(pin_dir);
    Ok(removed)
}
