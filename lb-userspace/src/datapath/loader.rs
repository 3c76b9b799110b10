//! Loads the BPF object with its maps pinned under one bpffs folder. Maps a
//! previous agent pinned are adopted (reused, contents kept), so a restart
//! does not lose what the data path serves.

use std::{
    fs,
    os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, MapType},
    Ebpf, EbpfLoader,
};
use lb_common::{
    map_names,
    map_spec::{self, Capacity, MapKind, MapSpec},
};

use crate::{
    datapath::{map_copy, pseudo_fs},
    sync::{
        differ::IdLimits,
        family_maps::{FamilyMaps, Ipv6Maps},
        maglev_tables::OuterMaglev,
        map_writer::BpfMaps,
    },
};

/// Makes sure `pin_dir` lives on a bpffs, mounting one on its parent if
/// needed (a fresh machine has none at /sys/fs/bpf).
pub(crate) fn ensure_pin_dir(pin_dir: &Path) -> Result<()> {
    let parent = pin_dir.parent().context("pin dir has no parent")?;
    if !pseudo_fs::is(parent, pseudo_fs::BPF_FS_MAGIC) {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        if let Err(e) = pseudo_fs::mount("bpf", parent) {
            bail!(
                "{} is not a bpffs and mounting one failed: {e} (run as root, or `mount -t bpf bpf {}`)",
                parent.display(),
                parent.display()
            );
        }
        log::info!("mounted bpffs on {}", parent.display());
    }
    // 0700 and ours: bpffs roots are world-writable (sticky), and whoever
    // owns the folder may unlink or swap the pins in it.
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(pin_dir)
        .with_context(|| format!("creating {}", pin_dir.display()))?;
    let meta =
        fs::symlink_metadata(pin_dir).with_context(|| format!("reading {}", pin_dir.display()))?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != euid {
        bail!(
            "{} is not a folder owned by uid {euid} (owner {}): remove it, another user made it",
            pin_dir.display(),
            meta.uid()
        );
    }
    if meta.mode() & 0o077 != 0 {
        fs::set_permissions(pin_dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} private (0700)", pin_dir.display()))?;
    }
    Ok(())
}

pub(crate) fn map_pin_path(pin_dir: &Path, name: &str) -> PathBuf {
    pin_dir.join(name)
}

/// What a pinned map is: (type, key size, value size, capacity).
pub(crate) type FoundLayout = (Option<MapType>, u32, u32, u32);

/// The kernel's type for a map of kind `kind`.
pub(crate) fn map_type(kind: MapKind) -> MapType {
    match kind {
        MapKind::Hash => MapType::Hash,
        MapKind::LruHash => MapType::LruHash,
        MapKind::Array => MapType::Array,
        MapKind::PerCpuArray => MapType::PerCpuArray,
        MapKind::LpmTrie => MapType::LpmTrie,
        MapKind::HashOfMaps => MapType::HashOfMaps,
    }
}

/// Why a pinned map with (type, key size, value size, capacity) `found`
/// cannot be adopted as `want`, if it cannot.
pub(crate) fn incompatibility(want: &MapSpec, found: FoundLayout) -> Option<String> {
    let (found_type, key, value, max) = found;
    let mut why = Vec::new();
    let want_type = map_type(want.kind);
    if found_type != Some(want_type) {
        why.push(format!("type {found_type:?}, now {want_type:?}"));
    }
    if key != want.key_size {
        why.push(format!("key {key} bytes, now {}", want.key_size));
    }
    if value != want.value_size {
        why.push(format!("value {value} bytes, now {}", want.value_size));
    }
    if max != want.max_entries {
        why.push(format!("{max} entries, now {}", want.max_entries));
    }
    (!why.is_empty()).then(|| why.join(", "))
}

/// Where a replaced map stays pinned while its entries are migrated.
pub(crate) fn old_pin_path(pin_dir: &Path, name: &str) -> PathBuf {
    pin_dir.join(format!("{name}_old"))
}

/// Maps the data path writes (flows, affinity, sockets): copied into a map
/// of a new capacity or type while key and value are unchanged, before the
/// switch and again after it (conntrack is not copied before: the programs
/// look it up in the old map on a miss).
const DATAPATH_STATE_MAPS: [&str; 8] = [
    map_names::CONNTRACK,
    map_names::AFFINITY,
    map_names::SOCK_REV,
    map_names::SOCK_FWD,
    map_names::CONNTRACK6,
    map_names::AFFINITY6,
    map_names::SOCK_REV6,
    map_names::SOCK_FWD6,
];

/// Maps only the agent writes whose ids the data path's state refers to
/// (conntrack and affinity entries hold backend and reverse NAT ids):
/// copied once, before the agent reads them, so every id keeps naming the
/// same backend or frontend.
const ID_MAPS: [&str; 6] = [
    map_names::BACKENDS,
    map_names::REV_NAT,
    map_names::BACKEND_MATCH,
    map_names::BACKENDS6,
    map_names::REV_NAT6,
    map_names::BACKEND_MATCH6,
];

/// Each family's conntrack map and the name its programs know the old one
/// by while it is migrated.
const CONNTRACK_AND_PREV: [(&str, &str); 2] = [
    (map_names::CONNTRACK, map_names::CONNTRACK_PREV),
    (map_names::CONNTRACK6, map_names::CONNTRACK6_PREV),
];

/// The maps whose ids a family's conntrack and affinity entries hold.
/// (Reverse NAT ids are one space over both families, but each family's
/// entries name only its own frontends, and the ids of a family whose map
/// is kept are never handed to the other.)
fn id_maps_of(ipv6: bool) -> [&'static str; 2] {
    if ipv6 {
        [map_names::BACKENDS6, map_names::REV_NAT6]
    } else {
        [map_names::BACKENDS, map_names::REV_NAT]
    }
}

/// Whether a pinned map with layout `found` can have its entries copied
/// (or converted) into a map of layout `want`.
pub(crate) fn entries_copyable(want: &MapSpec, found: FoundLayout) -> bool {
    let (map_type, key, value, _) = found;
    let kind_ok = match map_type {
        Some(MapType::Hash | MapType::LruHash) => true,
        Some(MapType::Array) => matches!(want.name, map_names::BACKENDS | map_names::BACKENDS6),
        _ => false,
    };
    let sizes_ok = (key == want.key_size && value == want.value_size)
        || map_copy::converted_from_16_bit_ids(want.name, key, value);
    (DATAPATH_STATE_MAPS.contains(&want.name) || ID_MAPS.contains(&want.name))
        && sizes_ok
        && kind_ok
}

/// What loading found among the pinned maps.
#[derive(Debug, Default)]
pub struct PinnedState {
    /// Maps of another layout whose entries are copied over (name, old pin).
    pub migrated: Vec<(&'static str, PathBuf)>,
    /// Maps created empty although one was pinned (name, why); the Service
    /// maps among them are rebuilt by the first sync.
    pub rebuilt: Vec<(&'static str, String)>,
}

impl PinnedState {
    /// Whether a conntrack map (of either family) is migrated: the
    /// programs then fall back to the old one on a miss.
    pub fn conntrack_migrated(&self) -> bool {
        self.old_conntrack_maps().next().is_some()
    }

    /// (the name the programs know the old map by, its pin) of each
    /// family's conntrack map being migrated.
    pub fn old_conntrack_maps(&self) -> impl Iterator<Item = (&'static str, &Path)> {
        CONNTRACK_AND_PREV.iter().filter_map(|(map, prev)| {
            self.migrated
                .iter()
                .find(|(n, _)| n == map)
                .map(|(_, p)| (*prev, p.as_path()))
        })
    }
}

fn found_layout(pin: &Path) -> Result<FoundLayout, String> {
    aya::maps::MapInfo::from_pin(pin)
        .map_err(|e| e.to_string())
        .map(|i| {
            (
                i.map_type().ok(),
                i.key_size(),
                i.value_size(),
                i.max_entries(),
            )
        })
}

/// What becomes of one pinned map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum PinFate {
    Adopt,
    /// Its entries are copied into a new map.
    Migrate,
    /// Left to the old programs; the new map starts empty.
    Rebuild(String),
}

/// The fate of a map of this version's layout `want`, pinned with `found`
/// (Err: unreadable). `ids_kept`: the pinned backend and reverse NAT ids
/// survive (adopted or migrated); when they do not, conntrack and affinity
/// entries would name the wrong backends and frontends, so they start empty.
pub(crate) fn pin_fate(
    want: &MapSpec,
    found: Result<FoundLayout, String>,
    ids_kept: bool,
) -> PinFate {
    let holds_ids = matches!(
        want.name,
        map_names::CONNTRACK | map_names::AFFINITY | map_names::CONNTRACK6 | map_names::AFFINITY6
    );
    if !ids_kept && holds_ids {
        return PinFate::Rebuild("the backend and reverse NAT ids it holds were not kept".into());
    }
    match found {
        Err(e) => PinFate::Rebuild(format!("cannot be opened: {e}")),
        Ok(found) => match incompatibility(want, found) {
            None => PinFate::Adopt,
            Some(_) if entries_copyable(want, found) => PinFate::Migrate,
            Some(why) => PinFate::Rebuild(why),
        },
    }
}

/// Sorts the pinned maps of a previous version: adopted as they are when
/// the layout matches; otherwise moved aside to `<name>_old` (bpffs
/// refuses dots in names) when their entries can be copied, or unpinned.
/// Either way the previous programs keep using them (a program holds its
/// maps) until the new ones replace them, which the agent does only after
/// its first sync: packets never see an empty map. A `_old` pin left by an
/// agent that died while migrating stays the source (the old programs may
/// still use it); the map that agent created is dropped.
pub(crate) fn sort_pinned_maps(pin_dir: &Path, layouts: &[MapSpec]) -> PinnedState {
    let mut state = PinnedState::default();
    let source = |name: &str| {
        [old_pin_path(pin_dir, name), map_pin_path(pin_dir, name)]
            .into_iter()
            .find(|p| p.exists())
            .map(|p| {
                let layout = found_layout(&p);
                (p, layout)
            })
    };
    // A family's ids are kept when its backends and reverse NAT maps are
    // adopted or migrated (each family on its own: `--ipv6` or a size flag
    // may change one family's maps only).
    let kept = |name: &str| {
        let want = layouts.iter().find(|l| l.name == name);
        want.zip(source(name)).is_some_and(|(want, (_, found))| {
            !matches!(pin_fate(want, found, true), PinFate::Rebuild(_))
        })
    };
    let ids_kept = |ipv6: bool| id_maps_of(ipv6).into_iter().all(kept);
    for want in layouts {
        let pin = map_pin_path(pin_dir, want.name);
        let old = old_pin_path(pin_dir, want.name);
        let Some((from, found)) = source(want.name) else {
            continue;
        };
        let from_old = from == old;
        match pin_fate(want, found, ids_kept(want.ipv6)) {
            PinFate::Adopt if !from_old => {}
            PinFate::Adopt => {
                // Back to the layout of the interrupted migration's source.
                let _ = fs::remove_file(&pin);
                if fs::rename(&old, &pin).is_err() {
                    let _ = fs::remove_file(&old);
                }
            }
            PinFate::Migrate => {
                if from_old {
                    log::warn!(
                        "{} left by an interrupted migration: migrated again",
                        old.display()
                    );
                    let _ = fs::remove_file(&pin);
                } else if let Err(e) = fs::rename(&pin, &old) {
                    log::warn!("moving {} aside failed ({e}): created anew", pin.display());
                    let _ = fs::remove_file(&pin);
                    state
                        .rebuilt
                        .push((want.name, format!("moving it aside failed: {e}")));
                    continue;
                } else {
                    log::warn!(
                        "pinned map {} has another layout: its entries are copied to a new one",
                        pin.display()
                    );
                }
                state.migrated.push((want.name, old));
            }
            PinFate::Rebuild(why) => {
                log::warn!(
                    "pinned map {} is not kept ({why}): created anew and filled before the programs switch",
                    from.display()
                );
                let _ = fs::remove_file(&pin);
                let _ = fs::remove_file(&old);
                state.rebuilt.push((want.name, why));
            }
        }
    }
    state
}

/// What a load of the programs is configured with.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadConfig {
    pub sizes: MapSizes,
    /// The masquerade port ranges (load-time global).
    pub snat_ports: lb_common::SnatPorts,
    /// The masquerade address and socket LB mode (load-time global).
    pub datapath: lb_common::DatapathConfig,
}

/// An object loader with this load's globals set (the agent's, and tests'
/// that load the object themselves).
pub fn object_loader(config: &LoadConfig) -> EbpfLoader<'_> {
    let mut loader = EbpfLoader::new();
    for spec in layouts(config.sizes) {
        if spec.sized_by.is_some() || spec.ipv6 {
            loader.map_max_entries(spec.name, spec.max_entries);
        }
    }
    loader.override_global(
        lb_common::global_names::SNAT_PORTS,
        &config.snat_ports,
        true,
    );
    loader.override_global(
        lb_common::global_names::DATAPATH_CONFIG,
        &config.datapath,
        true,
    );
    loader
}

/// How the maps are sized.
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    /// Capacity of the conntrack map (two entries a flow).
    pub conntrack: u32,
    /// Capacity of the session affinity map (one entry a client and frontend).
    pub affinity: u32,
    /// Capacity of the socket LB's reverse and forward maps (an entry a
    /// connected socket, or an unconnected UDP socket and Service).
    pub sockets: u32,
    /// Capacity of the backends array (and of the masquerade cursors,
    /// also indexed by backend id).
    pub backends: u32,
    /// Capacity of the services map (and of the backend-match map).
    pub services: u32,
    /// Reverse NAT ids (frontend addresses and ports): the reverse NAT
    /// maps, the per-CPU Service counters and the Maglev tables.
    pub frontends: u32,
    /// Whether the IPv6 maps get those capacities too; without IPv6 they
    /// hold one entry each, so a node that serves no IPv6 pays nothing
    /// for them.
    pub ipv6: bool,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            conntrack: lb_common::MAX_CONNTRACK,
            affinity: lb_common::MAX_AFFINITY,
            sockets: lb_common::map_spec::SOCK_REV.max_entries,
            backends: lb_common::MAX_BACKENDS,
            services: lb_common::MAX_SERVICE_SLOTS,
            frontends: lb_common::MAX_REV_NAT,
            ipv6: true,
        }
    }
}

impl MapSizes {
    /// The ids maps of these sizes have room for (0 is none).
    pub fn id_limits(&self) -> IdLimits {
        IdLimits {
            backend_ids: self.backends - 1,
            rev_nat_ids: self.frontends - 1,
        }
    }

    /// The capacity the flags give maps sized by `capacity`.
    fn of(&self, capacity: Capacity) -> u32 {
        match capacity {
            Capacity::Conntrack => self.conntrack,
            Capacity::Affinity => self.affinity,
            Capacity::Backends => self.backends,
            Capacity::Services => self.services,
            Capacity::Sockets => self.sockets,
            Capacity::Frontends => self.frontends,
        }
    }
}

/// The maps of this version with the configured sizes.
pub fn layouts(sizes: MapSizes) -> Vec<MapSpec> {
    map_spec::ALL
        .iter()
        .map(|spec| MapSpec {
            max_entries: if spec.ipv6 && !sizes.ipv6 {
                1
            } else {
                spec.sized_by.map_or(spec.max_entries, |c| sizes.of(c))
            },
            ..*spec
        })
        .collect()
}

/// Loads the programs, creating or adopting the pinned maps. Nothing is
/// attached here.
pub fn load(pin_dir: &Path, config: &LoadConfig) -> Result<(Ebpf, PinnedState)> {
    ensure_pin_dir(pin_dir)?;
    let maps = layouts(config.sizes);
    let state = sort_pinned_maps(pin_dir, &maps);
    let mut loader = object_loader(config);
    for spec in &maps {
        loader.map_pin_path(spec.name, map_pin_path(pin_dir, spec.name));
    }
    for (prev, old) in state.old_conntrack_maps() {
        loader.map_pin_path(prev, old.to_owned());
    }
    let ebpf = loader.load(crate::EBPF_OBJECT).context(
        "loading the BPF object (needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON, or root)",
    )?;
    Ok((ebpf, state))
}

/// Opens the map `name` pinned under `pin_dir`, typed as the kernel says
/// it is: how every reader of the pinned maps opens them.
pub fn open_pinned_map(pin_dir: &Path, name: &str) -> Result<aya::maps::Map> {
    let path = map_pin_path(pin_dir, name);
    let data = aya::maps::MapData::from_pin(&path).with_context(|| {
        format!(
            "opening {} (is the agent running, with --pin-dir {}?)",
            path.display(),
            pin_dir.display()
        )
    })?;
    Ok(aya::maps::Map::from_map_data(data)?)
}

/// Before the agent reads its maps: the id maps are copied (and their old
/// pins dropped: only the agent writes them), and the data path state the
/// old programs keep writing is copied a first time, conntrack excepted.
/// Returns (map, entries copied).
pub fn copy_before_switch(
    pin_dir: &Path,
    state: &mut PinnedState,
) -> Result<Vec<(&'static str, usize)>> {
    let mut out = Vec::new();
    for (name, old) in &state.migrated {
        if CONNTRACK_AND_PREV.iter().any(|(ct, _)| ct == name) {
            continue;
        }
        out.push((
            *name,
            map_copy::copy_map(name, old, &map_pin_path(pin_dir, name))?,
        ));
        if ID_MAPS.contains(name) {
            let _ = fs::remove_file(old);
        }
    }
    state.migrated.retain(|(name, _)| !ID_MAPS.contains(name));
    Ok(out)
}

/// Ends a migration once the new programs are attached everywhere: what
/// the old programs wrote is copied where the new maps hold nothing for
/// the key, then the old pins go. The old conntrack map stays referenced
/// by the programs (`lb4_conntrack_prev`) until the next agent loads its
/// own, so its memory comes back only then.
pub fn finish_migration(pin_dir: &Path, state: &PinnedState) -> Result<Vec<(&'static str, usize)>> {
    let mut out = Vec::new();
    for (name, old) in &state.migrated {
        out.push((
            *name,
            map_copy::copy_map(name, old, &map_pin_path(pin_dir, name))?,
        ));
    }
    for (_, old) in &state.migrated {
        let _ = fs::remove_file(old);
    }
    Ok(out)
}

/// Takes the maps the agent writes out of a loaded object.
pub fn take_maps(ebpf: &mut Ebpf) -> Result<BpfMaps> {
    let mut take = |name: &str| {
        ebpf.take_map(name)
            .with_context(|| format!("map {name} missing from the object"))
    };
    Ok(BpfMaps {
        ipv4: FamilyMaps::from_maps(&mut take)?,
        ipv6: FamilyMaps::from_maps(&mut take)?,
        config: Array::try_from(take(map_names::CONFIG)?)?,
        maglev: Some(OuterMaglev::new(take(map_names::MAGLEV)?)?),
    })
}

/// Opens the pinned maps without loading programs (for inspection).
pub fn open_pinned(pin_dir: &Path) -> Result<BpfMaps> {
    let open = |name| open_pinned_map(pin_dir, name);
    let ipv6 = if map_pin_path(pin_dir, map_names::SERVICES6).exists() {
        FamilyMaps::from_maps(open)?
    } else {
        empty_ipv6_maps()?
    };
    Ok(BpfMaps {
        ipv4: FamilyMaps::from_maps(open)?,
        ipv6,
        config: Array::try_from(open(map_names::CONFIG)?)?,
        maglev: map_pin_path(pin_dir, map_names::MAGLEV)
            .exists()
            .then(|| open(map_names::MAGLEV).and_then(OuterMaglev::new))
            .transpose()?,
    })
}

/// The pins of an agent from before IPv6 have no lb6_ maps: reading them
/// (`services`, `check`, during an upgrade) finds empty one-entry stand-ins,
/// created from the object and never pinned.
fn empty_ipv6_maps() -> Result<FamilyMaps<Ipv6Maps>> {
    let mut loader = EbpfLoader::new();
    let prev = [&map_spec::CONNTRACK_PREV, &map_spec::CONNTRACK6_PREV];
    for spec in map_spec::ALL.iter().chain(prev) {
        loader.map_max_entries(spec.name, 1);
    }
    let mut ebpf = loader
        .load(crate::EBPF_OBJECT)
        .context("creating empty IPv6 maps")?;
    FamilyMaps::from_maps(|name| {
        ebpf.take_map(name)
            .with_context(|| format!("no map {name} in the object"))
    })
}

/// Removes the pinned links (which detaches the programs) and the pinned
/// maps, and the folders if they are then empty.
pub fn cleanup(pin_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let links = crate::datapath::attach::links_dir(pin_dir);
    if let Ok(entries) = fs::read_dir(&links) {
        for e in entries.flatten() {
            fs::remove_file(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
            removed.push(e.path());
        }
    }
    let _ = fs::remove_dir(&links);
    for name in map_names::ALL {
        for p in [map_pin_path(pin_dir, name), old_pin_path(pin_dir, name)] {
            match fs::remove_file(&p) {
                Ok(()) => removed.push(p),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", p.display())),
            }
        }
    }
    let _ = fs::remove_dir(pin_dir);
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_size_only_the_maps_marked_as_sized_by_them() {
        let sizes = MapSizes {
            conntrack: 100,
            affinity: 200,
            backends: 300,
            services: 400,
            sockets: 500,
            frontends: 600,
            ipv6: true,
        };
        let find = |name| *layouts(sizes).iter().find(|s| s.name == name).unwrap();
        assert_eq!(find(map_names::CONNTRACK).max_entries, 100);
        assert_eq!(find(map_names::AFFINITY).max_entries, 200);
        assert_eq!(find(map_names::BACKENDS).max_entries, 300);
        assert_eq!(find(map_names::SNAT_CURSOR).max_entries, 300);
        assert_eq!(find(map_names::SERVICES).max_entries, 400);
        assert_eq!(find(map_names::CONNTRACK6).max_entries, 100);
        assert_eq!(find(map_names::SOCK_REV).max_entries, 500);
        assert_eq!(find(map_names::SOCK_FWD6).max_entries, 500);
        assert_eq!(find(map_names::REV_NAT).max_entries, 600);
        assert_eq!(find(map_names::REV_NAT6).max_entries, 600);
        assert_eq!(find(map_names::SERVICE_STATS).max_entries, 600);
        assert_eq!(find(map_names::MAGLEV).max_entries, 600);
        assert_eq!(find(map_names::STATS), map_spec::STATS);
        let no_ipv6 = layouts(MapSizes {
            ipv6: false,
            ..sizes
        });
        for spec in &no_ipv6 {
            let want = if spec.name.starts_with("lb6_") {
                1
            } else {
                find(spec.name).max_entries
            };
            assert_eq!(spec.max_entries, want, "{}", spec.name);
        }
        assert_eq!(find(map_names::BACKEND_MATCH).max_entries, 400);
        assert_eq!(
            layouts(MapSizes::default())
                .iter()
                .find(|s| s.name == map_names::REV_NAT),
            Some(&map_spec::REV_NAT)
        );
    }

    #[test]
    fn a_grown_value_or_capacity_is_incompatible() {
        let ct = &map_spec::CONNTRACK;
        let lru = Some(MapType::LruHash);
        assert_eq!(
            incompatibility(ct, (lru, 16, 24, lb_common::MAX_CONNTRACK)),
            None
        );
        let why = incompatibility(ct, (lru, 16, 16, lb_common::MAX_CONNTRACK)).unwrap();
        assert!(why.contains("value 16 bytes, now 24"), "{why}");
        assert!(incompatibility(ct, (lru, 16, 24, 1024)).is_some());
    }

    #[test]
    fn each_familys_state_migrates_only_while_its_ids_are_kept() {
        for (ct, backends) in [
            (&map_spec::CONNTRACK, &map_spec::BACKENDS),
            (&map_spec::CONNTRACK6, &map_spec::BACKENDS6),
        ] {
            let resized = (Some(MapType::LruHash), ct.key_size, ct.value_size, 1024);
            assert_eq!(
                pin_fate(ct, Ok(resized), true),
                PinFate::Migrate,
                "{}",
                ct.name
            );
            assert!(
                matches!(pin_fate(ct, Ok(resized), false), PinFate::Rebuild(_)),
                "{}: ids lost, entries would name other backends",
                ct.name
            );
            let grown = (Some(MapType::Array), 4, backends.value_size, 7);
            assert_eq!(pin_fate(backends, Ok(grown), false), PinFate::Migrate);
        }
    }

    #[test]
    fn a_changed_map_type_is_incompatible() {
        let backends = &map_spec::BACKENDS;
        let why = incompatibility(
            backends,
            (Some(MapType::Hash), 4, 12, lb_common::MAX_BACKENDS),
        )
        .unwrap();
        assert!(why.contains("type Some(Hash), now Array"), "{why}");
    }
}
