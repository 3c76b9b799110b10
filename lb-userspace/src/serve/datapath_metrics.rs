//! The data path's counters as Prometheus metrics: a prometheus-client
//! collector that reads the per-CPU maps at scrape time, so a scrape shows
//! what the programs counted up to that moment without the agent polling.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    os::fd::AsFd,
    path::Path,
    sync::{Arc, Mutex},
};

use anyhow::Result;
use aya::maps::{MapData, PerCpuArray};
use lb_common::{map_names, map_spec, stats, RevNatId, ServiceStats};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
};

use crate::{
    datapath::{loader, map_memory, stats_index},
    model::{Family, ServiceName},
};

/// Reverse NAT id -> (Service, frontend): the labels of per-Service counters.
/// Reverse NAT id -> (Service, frontend address:port); the names shared
/// with the desired state, formatted when scraped.
pub(crate) type FrontendNames = BTreeMap<RevNatId, (ServiceName, SocketAddr)>;

/// The counters' source: the pinned maps once the data path is loaded,
/// and the names of the frontends the last sync programmed.
#[derive(Default)]
pub struct DatapathCounters {
    maps: Mutex<Option<CounterMaps>>,
    names: Mutex<FrontendNames>,
}

struct CounterMaps {
    events: PerCpuArray<MapData, u64>,
    services: PerCpuArray<MapData, ServiceStats>,
    /// Every pinned map, for its memory.
    all: Vec<(&'static str, MapData)>,
}

impl DatapathCounters {
    /// Opens the pinned counter maps under `pin_dir`.
    pub fn open(&self, pin_dir: &Path) -> Result<()> {
        let open = |name| loader::open_pinned_map(pin_dir, name);
        let all = map_spec::ALL
            .iter()
            .map(|s| {
                Ok((
                    s.name,
                    MapData::from_pin(loader::map_pin_path(pin_dir, s.name))?,
                ))
            })
            .collect::<Result<_>>()?;
        let maps = CounterMaps {
            events: PerCpuArray::try_from(open(map_names::STATS)?)?,
            services: PerCpuArray::try_from(open(map_names::SERVICE_STATS)?)?,
            all,
        };
        *self.maps.lock().expect("counter maps lock") = Some(maps);
        Ok(())
    }

    /// The frontends per-Service counters are labelled with.
    pub fn set_names(&self, names: FrontendNames) {
        *self.names.lock().expect("frontend names lock") = names;
    }
}

impl CounterMaps {
    /// Each `stats` counter of `family`, summed over CPUs.
    fn events(&self, family: Family) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        stats::NAMES.iter().zip(0u32..).map(move |(name, i)| {
            let index = stats_index(family, i);
            let total = self.events.get(&index, 0).map_or(0, |p| p.iter().sum());
            (*name, total)
        })
    }

    /// (packets, bytes) of one frontend, summed over CPUs.
    fn service(&self, rev_nat_id: RevNatId) -> Option<(u64, u64)> {
        let per_cpu = self.services.get(&rev_nat_id, 0).ok()?;
        Some(
            per_cpu
                .iter()
                .fold((0, 0), |(p, b), s| (p + s.packets, b + s.bytes)),
        )
    }
}

/// Registers the counters' collector (`lb_datapath_packets_total`,
/// `lb_service_packets_total`, `lb_service_bytes_total`).
#[derive(Clone)]
pub(crate) struct DatapathCollector(pub Arc<DatapathCounters>);

impl fmt::Debug for DatapathCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DatapathCollector")
    }
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let Ok(maps) = self.0.maps.lock() else {
            return Ok(());
        };
        let Some(maps) = maps.as_ref() else {
            return Ok(());
        };
        let mut family = encoder.encode_descriptor(
            "datapath_packets",
            "Data path events by kind and address family, summed over CPUs",
            None,
            MetricType::Counter,
        )?;
        for af in [Family::Ipv4, Family::Ipv6] {
            for (name, total) in maps.events(af) {
                let labels = [("counter", name), ("family", af.label())];
                ConstCounter::new(total).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "map_memory_bytes",
            "Memory the kernel charges for each pinned map (its memlock)",
            None,
            MetricType::Gauge,
        )?;
        for (name, data) in &maps.all {
            let Ok(bytes) = map_memory::memory_of(data.fd().as_fd()) else {
                continue;
            };
            ConstGauge::new(i64::try_from(bytes).unwrap_or(i64::MAX))
                .encode(family.encode_family(&[("map", *name)])?)?;
        }
        let names = self.0.names.lock().map_err(|_| fmt::Error)?;
        let rows: Vec<_> = names
            .iter()
            .filter_map(|(id, labels)| Some((labels, maps.service(*id)?)))
            .collect();
        let help = [
            "Packets translated to a backend per Service frontend",
            "IP bytes translated to a backend per Service frontend",
        ];
        for (metric, help, pick) in [
            ("service_packets", help[0], 0),
            ("service_bytes", help[1], 1),
        ] {
            let mut family = encoder.encode_descriptor(metric, help, None, MetricType::Counter)?;
            for ((service, frontend), counts) in &rows {
                let value = if pick == 0 { counts.0 } else { counts.1 };
                let address = frontend.to_string();
                let service = service.to_string();
                let labels = [
                    ("service", service.as_str()),
                    ("frontend", address.as_str()),
                    ("family", Family::of(frontend.ip()).label()),
                ];
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
