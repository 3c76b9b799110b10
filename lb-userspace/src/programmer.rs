//! The sync engine both sources feed: full syncs (startup, relist, manifest
//! changes) and incremental ones (a few Services changed), each planned and
//! written in the safe order, with metrics.

use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Instant,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::{
    differ::{self, MapContents, PlanError},
    health_check::{health_check_of, HealthCheck},
    map_writer::{apply_plan, MapWriter},
    metrics::{InvalidLabel, MapLabel, Metrics},
    model::{DesiredState, L4Addr, ServiceEntry, ServiceName},
    translate::{self, TranslateError},
};

#[derive(Debug, Default)]
pub struct SyncReport {
    pub frontends: usize,
    pub backends: usize,
    pub writes: usize,
    pub errors: Vec<String>,
    /// UDP backends this sync deleted: sockets connected to them are stale.
    pub deleted_udp_backends: Vec<std::net::SocketAddrV4>,
}

pub struct Programmer<W: MapWriter> {
    pub writer: W,
    pub current: MapContents,
    pub desired: DesiredState,
    metrics: Arc<Metrics>,
    /// Reverse NAT ids were added or removed since the names were last taken.
    names_changed: bool,
    /// The node translation is for (NodePort addresses, name, zone).
    pub node: translate::NodeInfo,
    /// healthCheckNodePorts to serve, per Service.
    pub health: BTreeMap<ServiceName, HealthCheck>,
}

/// One Service to re-translate: its object (None: deleted) and its slices.
pub struct ServiceChange<'a> {
    pub name: ServiceName,
    pub service: Option<&'a Service>,
    pub slices: Vec<&'a EndpointSlice>,
}

impl<W: MapWriter> Programmer<W> {
    /// Starts from what the maps hold (adopted from a previous agent).
    pub fn new(writer: W, current: MapContents, metrics: Arc<Metrics>) -> Self {
        Self {
            writer,
            current,
            desired: DesiredState::default(),
            metrics,
            names_changed: true,
            node: translate::NodeInfo::default(),
            health: BTreeMap::new(),
        }
    }

    /// Replaces the desired state with a translation of everything and
    /// writes the difference; what no longer exists is removed.
    pub fn full_sync<S: Borrow<Service>, E: Borrow<EndpointSlice>>(
        &mut self,
        services: &[S],
        slices: &[E],
    ) -> Result<SyncReport, PlanError> {
        let started = Instant::now();
        let mut t = translate::translate_on(&self.node, services, slices);
        translate::carry_over_failed(&mut t, &self.desired);
        self.health = std::mem::take(&mut t.health_checks)
            .into_iter()
            .map(|h| (h.service.clone(), h))
            .collect();
        self.desired = t.state;
        let plan = differ::plan(&self.current, &self.desired)?;
        self.names_changed = true;
        Ok(self.finish(started, plan, t.errors))
    }

    /// Re-translates the given Services only and writes what changed.
    pub fn sync_services(&mut self, changes: &[ServiceChange]) -> Result<SyncReport, PlanError> {
        let started = Instant::now();
        let mut errors = Vec::new();
        let mut touched: BTreeSet<L4Addr> = BTreeSet::new();
        for change in changes {
            self.health.remove(&change.name);
            if let Some(h) = change
                .service
                .and_then(|svc| health_check_of(&self.node, &change.name, svc, &change.slices))
            {
                self.health.insert(change.name.clone(), h);
            }
            let old: Vec<L4Addr> = self.desired.frontends_of(&change.name);
            let new: Vec<ServiceEntry> = match change.service {
                None => Vec::new(),
                Some(svc) => match translate::translate_service(
                    &self.node,
                    svc,
                    &change.name,
                    &change.slices,
                    &mut errors,
                ) {
                    Ok(entries) => entries,
                    Err(reason) => {
                        // Invalid as a whole: keep what it had.
                        errors.push(TranslateError {
                            object: format!("Service {}", change.name),
                            reason,
                        });
                        continue;
                    }
                },
            };
            for f in &old {
                self.desired.remove(f);
                touched.insert(*f);
            }
            for entry in new {
                if let Some(other) = self.desired.get(&entry.frontend) {
                    errors.push(TranslateError {
                        object: format!("Service {}", change.name),
                        reason: format!(
                            "frontend {} is already used by Service {}",
                            entry.frontend, other.service
                        ),
                    });
                    continue;
                }
                touched.insert(entry.frontend);
                self.desired.insert(entry);
            }
        }
        let plan = differ::plan_scoped(&self.current, &self.desired, Some(&touched))?;
        Ok(self.finish(started, plan, errors))
    }

    fn finish(
        &mut self,
        started: Instant,
        plan: Vec<differ::PlannedOp>,
        errors: Vec<TranslateError>,
    ) -> SyncReport {
        self.names_changed |= plan.iter().any(|o| {
            matches!(
                o.op,
                differ::MapOp::PutRevNat(..) | differ::MapOp::DeleteRevNat(_)
            )
        });
        let deleted_udp_backends = plan
            .iter()
            .filter_map(|o| match o.op {
                differ::MapOp::DeleteBackend(id) => self.current.backends.get(&id).copied(),
                _ => None,
            })
            .filter_map(|b| differ::backend_addr(&b))
            .filter(|a| a.proto == crate::model::Protocol::Udp)
            .map(|a| std::net::SocketAddrV4::new(a.addr, a.port))
            .collect();
        let report = apply_plan(&mut self.writer, &plan, &mut self.current);
        let mut out = SyncReport {
            frontends: self.desired.len(),
            backends: self.desired.backend_count(),
            writes: report.applied,
            errors: Vec::new(),
            deleted_udp_backends,
        };
        for e in &errors {
            let kind = if e.object.contains(" port ") {
                "service_port"
            } else {
                "service"
            };
            self.metrics
                .invalid_objects
                .get_or_create(&InvalidLabel { kind: kind.into() })
                .inc();
            out.errors.push(format!("cannot program {e}"));
        }
        for (frontend, reason) in &report.failed {
            self.metrics.map_write_failures.inc();
            out.errors.push(match frontend {
                Some(f) => format!("programming {f} failed, it keeps its previous state: {reason}"),
                None => format!("map write failed: {reason}"),
            });
        }
        self.metrics
            .sync_duration
            .observe(started.elapsed().as_secs_f64());
        self.metrics.services.set(out.frontends as i64);
        self.metrics.backends.set(out.backends as i64);
        for (map, n, cap) in [
            (
                lb_common::map_names::SERVICES,
                self.current.services.len(),
                lb_common::MAX_SERVICE_SLOTS,
            ),
            (
                lb_common::map_names::BACKENDS,
                self.current.backends.len(),
                lb_common::MAX_BACKENDS,
            ),
            (
                lb_common::map_names::REV_NAT,
                self.current.rev_nat.len(),
                lb_common::MAX_REV_NAT,
            ),
        ] {
            let label = MapLabel { map: map.into() };
            self.metrics.map_entries.get_or_create(&label).set(n as i64);
            self.metrics
                .map_capacity
                .get_or_create(&label)
                .set(cap as i64);
        }
        out
    }

    /// The names when they may have changed since the last call: building
    /// them is O(Services), too much for every single-slice change.
    pub fn take_changed_names(&mut self) -> Option<BTreeMap<u16, (String, String)>> {
        std::mem::take(&mut self.names_changed).then(|| self.rev_nat_names())
    }

    /// rev_nat id -> (Service, frontend address:port), for per-Service counters.
    pub fn rev_nat_names(&self) -> BTreeMap<u16, (String, String)> {
        let mut out = BTreeMap::new();
        for (frontend, entry) in self.desired.entries() {
            if let Some(id) = self.current.rev_nat_id(frontend.addr, frontend.port) {
                out.entry(id).or_insert_with(|| {
                    (
                        entry.service.to_string(),
                        format!("{}:{}", frontend.addr, frontend.port),
                    )
                });
            }
        }
        out
    }
}
