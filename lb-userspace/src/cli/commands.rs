//! The inspection commands: `check` and `stats`.

use std::path::Path;

use anyhow::{Context, Result};
use lb_common::{map_names, stats};
use lb_userspace::{
    datapath::{loader, stats_index},
    model::Family,
    source::api_client::{self},
    source::k8s::{self},
    source::manifests::ManifestSource,
    translate::NodeInfo,
};

use lb_userspace::sync::maglev_tables::{self, MaglevTables};

use super::args::{CheckArgs, Output};

/// Translates the source the way the agent does and compares the result
/// with the pinned maps.
pub(crate) async fn check(
    pin_dir: &Path,
    args: &CheckArgs,
) -> Result<lb_userspace::sync::checker::CheckReport> {
    let wire = args.node.wire();
    let nodeport_addresses = args.node.nodeport_addresses(&wire)?;
    let mut node = NodeInfo {
        name: args.node.node_name.clone().unwrap_or_default(),
        ipv6_off: !args.node.serves_ipv6(&nodeport_addresses),
        nodeport_addresses,
        zone: args.node.zone.clone(),
        lb_algorithm: args.node.lb_algorithm,
        lb_mode: args.node.lb_mode,
    };
    let (services, slices) = if let Some(dir) = &args.source.manifests {
        let mut source = ManifestSource::new(dir);
        for e in source.read(true) {
            eprintln!("manifest: {e}");
        }
        let services = source.services().into_iter().cloned().collect();
        (services, source.slices().into_iter().cloned().collect())
    } else {
        let client = api_client::client(&args.source.api_options()).await?;
        let (services, slices, zone) =
            k8s::list_once(client, args.node.node_name.as_deref()).await?;
        if node.zone.is_none() {
            node.zone = zone;
        }
        (services, slices)
    };
    let translation = lb_userspace::translate::translate_on(&node, &services, &slices);
    for e in &translation.errors {
        eprintln!("not programmable: {e}");
    }
    let maps = loader::open_pinned(pin_dir)?;
    let contents = maps.read_contents().context("reading the pinned maps")?;
    let mut report = lb_userspace::sync::checker::check(&translation.state, &contents);
    let tables = MaglevTables::new(
        args.maglev.maglev_table_size,
        maglev_tables::seed_of(&args.maglev.maglev_hash_seed),
        Vec::new(),
    )?;
    report.differences.extend(maglev_tables::check(
        &maps,
        &contents,
        &translation.state,
        &tables,
    ));
    Ok(report)
}

/// The data path's counters, summed over CPUs: one family's, or (`None`)
/// both families' added up.
pub(crate) fn print_stats(pin_dir: &Path, output: Output, family: Option<Family>) -> Result<()> {
    let array: aya::maps::PerCpuArray<_, u64> =
        aya::maps::PerCpuArray::try_from(loader::open_pinned_map(pin_dir, map_names::STATS)?)?;
    let families = family.map_or(vec![Family::Ipv4, Family::Ipv6], |f| vec![f]);
    let mut rows = Vec::new();
    for (i, name) in (0u32..).zip(stats::NAMES) {
        let mut total = 0u64;
        for f in &families {
            let index = stats_index(*f, i);
            // The stats array of an agent from before IPv6 has only IPv4's.
            if index < array.len() {
                total += array.get(&index, 0)?.iter().sum::<u64>();
            }
        }
        rows.push((name, total));
    }
    match output {
        Output::Table => {
            let width = rows.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
            for (name, v) in rows {
                println!("{name:<width$} {v}");
            }
        }
        Output::Json => {
            let m: serde_json::Map<String, serde_json::Value> = rows
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.into()))
                .collect();
            println!("{}", serde_json::Value::Object(m));
        }
    }
    Ok(())
}
