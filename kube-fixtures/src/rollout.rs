//! A rolling update as the Deployment controller and the kubelet run it,
//! for the lab to play: pure decisions over pod states and a clock, no I/O.
//!
//! Imitated from Kubernetes:
//! - `maxSurge` / `maxUnavailable` as numbers or percentages of the
//!   replicas (surge rounded up, unavailable down; both 0 makes
//!   unavailable 1), 25% each by default;
//! - scale up: new pods while all non-terminating pods stay within
//!   replicas + maxSurge;
//! - scale down: old pods while `all - minAvailable - unavailable new`
//!   allows, where a pod is available once ready for `minReadySeconds`;
//! - the kubelet: a new pod turns ready after its readiness probe's
//!   initial delay; a terminating pod is killed when its grace period ends.

use std::time::Duration;

use k8s_openapi::{api::apps::v1::Deployment, apimachinery::pkg::util::intstr::IntOrString};

/// What a Deployment says about how it rolls.
#[derive(Clone, Debug, PartialEq)]
pub struct RolloutParams {
    pub replicas: usize,
    pub(crate) max_surge: usize,
    pub max_unavailable: usize,
    pub min_ready: Duration,
    /// The first container's readiness probe `initialDelaySeconds`.
    pub(crate) readiness_delay: Duration,
    pub grace: Duration,
}

fn resolve(value: Option<&IntOrString>, replicas: usize, round_up: bool) -> Result<usize, String> {
    match value.cloned().unwrap_or(IntOrString::String("25%".into())) {
        IntOrString::Int(n) => usize::try_from(n).map_err(|_| format!("negative value {n}")),
        IntOrString::String(s) => {
            let pct: usize = s
                .strip_suffix('%')
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| format!("{s:?} is neither a number nor a percentage"))?;
            let scaled = replicas * pct;
            Ok(if round_up {
                scaled.div_ceil(100)
            } else {
                scaled / 100
            })
        }
    }
}

impl RolloutParams {
    pub fn from_deployment(d: &Deployment) -> Result<Self, String> {
        let spec = d.spec.as_ref().ok_or("no spec")?;
        let replicas = spec.replicas.unwrap_or(1).max(0) as usize;
        let rolling = spec
            .strategy
            .as_ref()
            .and_then(|s| s.rolling_update.as_ref());
        let max_surge = resolve(rolling.and_then(|r| r.max_surge.as_ref()), replicas, true)?;
        let mut max_unavailable = resolve(
            rolling.and_then(|r| r.max_unavailable.as_ref()),
            replicas,
            false,
        )?;
        if max_surge == 0 && max_unavailable == 0 {
            max_unavailable = 1;
        }
        let pod = spec.template.spec.as_ref().ok_or("no pod template spec")?;
        let readiness_delay = pod
            .containers
            .first()
            .and_then(|c| c.readiness_probe.as_ref())
            .and_then(|p| p.initial_delay_seconds)
            .unwrap_or(0);
        Ok(Self {
            replicas,
            max_surge,
            max_unavailable,
            min_ready: Duration::from_secs(spec.min_ready_seconds.unwrap_or(0).max(0) as u64),
            readiness_delay: Duration::from_secs(readiness_delay.max(0) as u64),
            grace: Duration::from_secs(
                pod.termination_grace_period_seconds.unwrap_or(30).max(0) as u64
            ),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodPhase {
    /// Running, its readiness probe not yet passed.
    Starting,
    Ready,
    /// Deleted: SIGTERM sent, grace period running.
    Terminating,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RolloutPod {
    pub name: String,
    /// Of the new template.
    pub new: bool,
    pub phase: PodPhase,
    /// When it entered `phase`.
    pub since: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Create a pod of the new template (it starts not ready).
    CreateNew,
    /// Its readiness probe passed.
    MarkReady(String),
    /// Delete it: SIGTERM, and its endpoint turns terminating.
    Terminate(String),
    /// Its grace period is over: killed, and gone from the EndpointSlice.
    Remove(String),
}

fn available(p: &RolloutPod, params: &RolloutParams, now: Duration) -> bool {
    p.phase == PodPhase::Ready && now.saturating_sub(p.since) >= params.min_ready
}

/// What the controllers do at `now`.
pub fn next_steps(params: &RolloutParams, pods: &[RolloutPod], now: Duration) -> Vec<Step> {
    let mut steps = Vec::new();
    for p in pods {
        match p.phase {
            PodPhase::Starting if now.saturating_sub(p.since) >= params.readiness_delay => {
                steps.push(Step::MarkReady(p.name.clone()));
            }
            PodPhase::Terminating if now.saturating_sub(p.since) >= params.grace => {
                steps.push(Step::Remove(p.name.clone()));
            }
            _ => {}
        }
    }
    let live: Vec<&RolloutPod> = pods
        .iter()
        .filter(|p| p.phase != PodPhase::Terminating)
        .collect();
    let new_live = live.iter().filter(|p| p.new).count();
    let room = (params.replicas + params.max_surge).saturating_sub(live.len());
    let create = params.replicas.saturating_sub(new_live).min(room);
    steps.extend((0..create).map(|_| Step::CreateNew));

    let min_available = params.replicas.saturating_sub(params.max_unavailable);
    let new_unavailable = live
        .iter()
        .filter(|p| p.new && !available(p, params, now))
        .count();
    let can_remove = live
        .len()
        .saturating_sub(min_available)
        .saturating_sub(new_unavailable);
    // Old pods that are not ready go first, as the controller prefers.
    let mut old: Vec<&&RolloutPod> = live.iter().filter(|p| !p.new).collect();
    old.sort_by_key(|p| (p.phase == PodPhase::Ready, p.name.clone()));
    steps.extend(
        old.into_iter()
            .take(can_remove)
            .map(|p| Step::Terminate(p.name.clone())),
    );
    steps
}

/// Whether the rollout is over: only new pods, all of them available.
pub fn complete(params: &RolloutParams, pods: &[RolloutPod], now: Duration) -> bool {
    pods.len() == params.replicas && pods.iter().all(|p| p.new && available(p, params, now))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> RolloutParams {
        RolloutParams {
            replicas: 4,
            max_surge: 1,
            max_unavailable: 1,
            min_ready: Duration::from_secs(1),
            readiness_delay: Duration::from_secs(1),
            grace: Duration::from_secs(3),
        }
    }

    #[test]
    fn percentages_round_as_kubernetes_does() {
        assert_eq!(
            resolve(Some(&IntOrString::String("25%".into())), 4, true),
            Ok(1)
        );
        assert_eq!(
            resolve(Some(&IntOrString::String("25%".into())), 3, true),
            Ok(1)
        );
        assert_eq!(
            resolve(Some(&IntOrString::String("25%".into())), 3, false),
            Ok(0)
        );
        assert_eq!(resolve(Some(&IntOrString::Int(2)), 10, false), Ok(2));
        assert_eq!(resolve(None, 10, true), Ok(3));
        assert!(resolve(Some(&IntOrString::String("x".into())), 4, true).is_err());
    }

    #[test]
    fn the_example_deployment_rolls_with_surge_1_and_unavailable_1() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/rolling-update.yaml"
        ))
        .unwrap();
        let first = text.split("\n---\n").next().unwrap();
        let d: Deployment = serde_yaml::from_str(first).unwrap();
        assert_eq!(RolloutParams::from_deployment(&d), Ok(params()));
    }

    /// Plays the whole rollout on a clock in 100 ms steps and checks the
    /// Deployment's promises at every step.
    #[test]
    fn a_rollout_keeps_within_surge_and_availability_and_ends_with_new_pods() {
        let p = params();
        let mut pods: Vec<RolloutPod> = (0..4)
            .map(|i| RolloutPod {
                name: format!("old-{i}"),
                new: false,
                phase: PodPhase::Ready,
                since: Duration::ZERO,
            })
            .collect();
        let mut created = 0;
        let mut now = Duration::from_secs(10);
        for _ in 0..1000 {
            if complete(&p, &pods, now) {
                break;
            }
            for step in next_steps(&p, &pods, now) {
                match step {
                    Step::CreateNew => {
                        pods.push(RolloutPod {
                            name: format!("new-{created}"),
                            new: true,
                            phase: PodPhase::Starting,
                            since: now,
                        });
                        created += 1;
                    }
                    Step::MarkReady(n) | Step::Terminate(n) => {
                        let pod = pods.iter_mut().find(|x| x.name == n).unwrap();
                        pod.phase = if pod.phase == PodPhase::Starting {
                            PodPhase::Ready
                        } else {
                            PodPhase::Terminating
                        };
                        pod.since = now;
                    }
                    Step::Remove(n) => pods.retain(|x| x.name != n),
                }
            }
            let live: Vec<_> = pods
                .iter()
                .filter(|x| x.phase != PodPhase::Terminating)
                .collect();
            assert!(live.len() <= 5, "surge exceeded at {now:?}: {pods:#?}");
            let ready = live.iter().filter(|x| x.phase == PodPhase::Ready).count();
            assert!(ready >= 3, "fewer than 3 ready at {now:?}: {pods:#?}");
            now += Duration::from_millis(100);
        }
        assert!(
            complete(&p, &pods, now),
            "rollout never completed: {pods:#?}"
        );
        assert_eq!(created, 4, "exactly one new pod per replica");
        assert!(now < Duration::from_secs(30), "took {now:?}");
    }
}
