//! The Kubernetes source end to end: the real lb-agent binary, started with
//! `--kubeconfig`, watches an API server fixture (kube-fixtures/src/apiserver.rs)
//! that speaks the real list/watch protocol, while the lab's pods answer
//! real traffic through the attached data path.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use lb_kube_fixtures::apiserver::{ApiServer, RequestRecord, Resource};
use lb_lab::{
    kube_lab::{KubeLab, CONVERGE, NGINX},
    load::{Load, LoadKind},
    metric_sum, privileged_test, sibling_binary, tcp_ask,
};
use lb_userspace::{
    model::{LbAlgorithm, LbMode, Protocol},
    sync::maglev_tables::MaglevMaps,
};
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(2);

/// Every request the agent made is one its ClusterRole allows (the list
/// deploy/lb-agent.yaml is checked against), and it read every resource it
/// needs with a list and a watch.
fn assert_requests_within_rbac(api: &ApiServer) {
    // Readiness follows the first lists; the watches start just after, so
    // give them a bounded moment to show up in the fixture's record.
    let has_all = |requests: &[RequestRecord]| {
        Resource::ALL.iter().all(|res| {
            [false, true].iter().all(|w| {
                requests
                    .iter()
                    .any(|r| r.resource == Some(*res) && r.watch == *w)
            })
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut requests = api.requests();
    while !has_all(&requests) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        requests = api.requests();
    }
    assert!(!requests.is_empty(), "the agent made no API request");
    for r in &requests {
        // `/version` (the agent's reachability probe) is readable by every
        // client: the API server's system:public-info-viewer role.
        if r.resource.is_none() && r.path == "/version" && r.method == "GET" {
            continue;
        }
        let resource = r
            .resource
            .unwrap_or_else(|| panic!("request outside the served resources: {r:?}"));
        let (group, plural) = resource.rbac_name();
        let verb = match (r.method.as_str(), r.watch) {
            ("GET", true) => "watch",
            ("GET", false) => "list",
            (m, _) => panic!("the agent must only read, saw {m} on {plural}"),
        };
        assert!(
            lb_userspace::source::kube_access::allows(group, plural, verb),
            "{verb} {group}/{plural} is not in the agent's RBAC"
        );
    }
    for resource in Resource::ALL {
        for watch in [false, true] {
            assert!(
                requests
                    .iter()
                    .any(|r| r.resource == Some(resource) && r.watch == watch),
                "no {} of {resource:?}: {requests:?}",
                if watch { "watch" } else { "list" }
            );
        }
    }
}

/// Sends `n` requests over new TCP connections from the client pod; every
/// one must succeed. Returns answers per pod.
fn spread(lab: &lb_lab::Lab, to: SocketAddrV4, n: usize) -> BTreeMap<String, usize> {
    lab.client.ns.run_in(|| {
        let mut got = BTreeMap::new();
        for i in 0..n {
            let pod = tcp_ask(to, "hello", TIMEOUT)
                .unwrap_or_else(|e| panic!("request {i} to {to} failed: {e}"));
            *got.entry(pod).or_insert(0) += 1;
        }
        got
    })
}

fn assert_answered_by(got: &BTreeMap<String, usize>, pods: &[String], what: &str) {
    let answered: BTreeSet<&String> = got.keys().collect();
    let wanted: BTreeSet<&String> = pods.iter().collect();
    assert_eq!(answered, wanted, "{what}: answers per pod {got:?}");
}

#[privileged_test]
fn service_created_scaled_and_deleted_through_the_api_is_reflected_in_traffic() {
    let mut k = KubeLab::nginx();
    k.start_agent();
    let frontend = SocketAddrV4::new(NGINX, 80);
    assert_eq!(
        k.programmed(frontend, Protocol::Tcp),
        None,
        "nothing published yet"
    );

    // Created with one ready pod.
    let pods = k.lab.pods_of("Deployment/nginx-deployment");
    k.lab.state.excluded = pods[1..].iter().cloned().collect();
    k.publish();
    k.wait_programmed(frontend, Some(k.pod_ips(&pods[..1])), "created");
    assert_answered_by(
        &spread(&k.lab, frontend, 20),
        &pods[..1],
        "created with 1 pod",
    );

    // Scaled up to three.
    k.lab.state.excluded.clear();
    k.publish();
    k.wait_programmed(frontend, Some(k.pod_ips(&pods)), "scaled up");
    assert_answered_by(&spread(&k.lab, frontend, 150), &pods, "scaled up to 3");

    // Scaled down to two.
    k.lab.state.excluded = [pods[0].clone()].into();
    k.publish();
    k.wait_programmed(frontend, Some(k.pod_ips(&pods[1..])), "scaled down");
    assert_answered_by(
        &spread(&k.lab, frontend, 60),
        &pods[1..],
        "scaled down to 2",
    );

    // The network programming latency was measured from the slices' trigger times.
    let m = k.metrics();
    assert!(
        metric_sum(&m, "lb_services_programmed", &[]) >= 2.0,
        "TCP and UDP frontends: {m}"
    );

    // Deleted: the Service and its slices go; the address no longer answers.
    for s in k.lab.endpoint_slices() {
        k.api.delete(
            Resource::EndpointSlices,
            "default",
            s.metadata.name.as_deref().unwrap(),
        );
    }
    assert!(k.api.delete(Resource::Services, "default", "my-nginx"));
    k.wait_programmed(frontend, None, "deleted");
    assert_eq!(
        k.programmed(frontend, Protocol::Udp),
        None,
        "UDP frontend gone too"
    );
    let refused = k
        .lab
        .client
        .ns
        .run_in(|| tcp_ask(frontend, "hello", Duration::from_millis(500)));
    assert!(
        refused.is_err(),
        "a deleted Service must not answer: {refused:?}"
    );
    k.lab.assert_no_checksum_errors();
}

#[privileged_test]
fn service_with_endpoints_in_three_slices_reaches_all_of_them() {
    let mut k = KubeLab::nginx();
    let frontend = SocketAddrV4::new(NGINX, 80);
    let pods = k.lab.pods_of("Deployment/nginx-deployment");
    // One slice per pod, as the EndpointSlice controller makes when slices
    // fill up or pods land in separate batches.
    let whole = k.lab.endpoint_slices().remove(0);
    let mut objects: Vec<Value> = k
        .lab
        .services()
        .iter()
        .map(|s| serde_json::to_value(s).unwrap())
        .collect();
    for (i, endpoint) in whole.endpoints.iter().enumerate() {
        let mut part = whole.clone();
        part.metadata.name = Some(format!("my-nginx-part{i}"));
        part.endpoints = vec![endpoint.clone()];
        objects.push(serde_json::to_value(&part).unwrap());
    }
    k.api.apply_all(&objects).unwrap();
    k.start_agent();
    k.wait_programmed(frontend, Some(k.pod_ips(&pods)), "three slices merged");
    assert_answered_by(&spread(&k.lab, frontend, 150), &pods, "three slices");

    // Deleting one slice removes exactly its endpoint.
    let gone = k.lab.pods[&pods[0]].ip;
    let part = (0..3)
        .find(|i| {
            let obj = k
                .api
                .get(
                    Resource::EndpointSlices,
                    "default",
                    &format!("my-nginx-part{i}"),
                )
                .unwrap();
            obj["endpoints"][0]["addresses"][0] == json!(gone.to_string())
        })
        .expect("the slice of the first pod");
    assert!(k.api.delete(
        Resource::EndpointSlices,
        "default",
        &format!("my-nginx-part{part}")
    ));
    k.wait_programmed(frontend, Some(k.pod_ips(&pods[1..])), "one slice deleted");
    assert_answered_by(&spread(&k.lab, frontend, 60), &pods[1..], "two slices left");
}

/// A second Service on the same pods, to go stale while the agent is not
/// looking.
fn extra_service() -> Value {
    json!({"kind": "Service", "apiVersion": "v1",
        "metadata": {"name": "extra", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.11", "selector": {"app": "nginx"},
                 "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "targetPort": 80}]}})
}

fn extra_slice(ips: &BTreeSet<Ipv4Addr>) -> Value {
    let endpoints: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}}))
        .collect();
    json!({"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"name": "extra-abcde", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "extra"}},
        "addressType": "IPv4", "endpoints": endpoints,
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]})
}

/// `extra_service` with an externalIP, annotated `algorithm` and, if
/// given, `mode`.
fn external_service(algorithm: &str, mode: Option<&str>) -> Value {
    let mut svc = extra_service();
    svc["metadata"]["annotations"] = json!({"lb-agent.io/lb-algorithm": algorithm});
    if let Some(mode) = mode {
        svc["metadata"]["annotations"]["lb-agent.io/lb-mode"] = json!(mode);
    }
    svc["spec"]["externalIPs"] = json!(["198.51.100.40"]);
    svc
}

/// Maglev chosen by annotation through the API source: the externalIP
/// frontend of the annotated Service gets a table in `lb_maglev` and shows
/// `lb_algorithm: maglev` in `lb-agent services`, its ClusterIP stays
/// random; the annotation changed to random, the table goes. Then an
/// `lb-agent.io/lb-mode: dsr` annotation shows as `lb_mode: dsr` on the
/// external frontend alone.
#[privileged_test]
fn a_maglev_annotation_from_the_api_gets_its_external_frontend_a_table() {
    let mut k = KubeLab::nginx();
    let pods = k.lab.pods_of("Deployment/nginx-deployment");
    let all = k.pod_ips(&pods);
    k.publish();
    k.api
        .apply_all(&[external_service("maglev", None), extra_slice(&all)])
        .unwrap();
    k.start_agent();
    let external = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 40), 8080);
    k.wait_programmed(external, Some(all.clone()), "programmed");
    let tables = |k: &KubeLab| {
        let maps = lb_userspace::datapath::loader::open_pinned(&k.lab.pin_dir).expect("maps");
        lb_userspace::sync::maglev_tables::tables_in(&maps)
    };
    let row_of = |k: &KubeLab, port: u16, addr: Ipv4Addr| {
        k.snapshot()
            .into_iter()
            .find(|s| s.frontend.addr == std::net::IpAddr::V4(addr) && s.frontend.port == port)
            .expect("the frontend is programmed")
    };
    let algorithm_of = |k: &KubeLab, port: u16, addr: Ipv4Addr| {
        let row = row_of(k, port, addr);
        (row.lb_algorithm, row.rev_nat_id)
    };
    let (algorithm, rev_nat_id) = algorithm_of(&k, 8080, *external.ip());
    assert_eq!(algorithm, LbAlgorithm::Maglev);
    assert_eq!(
        algorithm_of(&k, 8080, Ipv4Addr::new(10, 96, 0, 11)).0,
        LbAlgorithm::Random
    );
    let deadline = Instant::now() + CONVERGE;
    while tables(&k) != vec![rev_nat_id] {
        assert!(
            Instant::now() < deadline,
            "no table for {rev_nat_id}: {:?}",
            tables(&k)
        );
        std::thread::sleep(Duration::from_millis(25));
    }
    let services = k.lab.agent_command_json(&["services", "--output", "json"]);
    assert!(
        services.to_string().contains(r#""lb_algorithm":"maglev""#),
        "{services}"
    );
    let (equal, text) = k.check(&[]);
    assert!(equal, "check finds the table its slots give:\n{text}");
    // A table gone wrong (every entry naming slot 1) is a difference.
    let mut maps = lb_userspace::datapath::loader::open_pinned(&k.lab.pin_dir).expect("maps");
    let words = vec![0x0001_0001_0001_0001_u64; 16_381_usize.div_ceil(4)];
    assert!(maps.put_tables(&[(rev_nat_id, words)]).is_empty());
    let (equal, text) = k.check(&[]);
    assert!(!equal && text.contains("its table differs"), "{text}");

    k.api
        .apply(&external_service("random", Some("dsr")))
        .unwrap();
    let deadline = Instant::now() + CONVERGE;
    while !tables(&k).is_empty() || row_of(&k, 8080, *external.ip()).lb_mode != LbMode::Dsr {
        assert!(
            Instant::now() < deadline,
            "the table stays or no DSR: {:?}",
            tables(&k)
        );
        std::thread::sleep(Duration::from_millis(25));
    }
    assert_eq!(
        algorithm_of(&k, 8080, *external.ip()).0,
        LbAlgorithm::Random
    );
    let cluster_ip = row_of(&k, 8080, Ipv4Addr::new(10, 96, 0, 11));
    assert_eq!(
        cluster_ip.lb_mode,
        LbMode::Snat,
        "a ClusterIP stays on the node"
    );
}

#[privileged_test]
fn maps_converge_after_410_gone_and_after_the_api_server_restarts() {
    let mut k = KubeLab::nginx();
    let pods = k.lab.pods_of("Deployment/nginx-deployment");
    let all = k.pod_ips(&pods);
    let extra = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 11), 8080);
    let nginx = SocketAddrV4::new(NGINX, 80);
    k.publish();
    k.api
        .apply_all(&[extra_service(), extra_slice(&all)])
        .unwrap();
    k.start_agent();
    k.wait_programmed(extra, Some(all.clone()), "initial");
    k.wait_programmed(nginx, Some(all.clone()), "initial");

    // Events lost and history compacted: the open watches end with 410 Gone;
    // only the relist shows that `extra` is gone and nginx lost a pod.
    k.lab.state.excluded = [pods[0].clone()].into();
    let slice = serde_json::to_value(&k.lab.endpoint_slices()[0]).unwrap();
    k.api
        .change_silently(
            &[slice],
            &[
                (Resource::Services, "default", "extra"),
                (Resource::EndpointSlices, "default", "extra-abcde"),
            ],
        )
        .unwrap();
    k.api.expire_watches();
    k.wait_programmed(extra, None, "after 410 Gone");
    k.wait_programmed(nginx, Some(k.pod_ips(&pods[1..])), "after 410 Gone");
    let m = k.metrics();
    assert!(
        metric_sum(&m, "lb_watch_restarts_total", &["services"]) >= 1.0,
        "a relist is counted: {m}"
    );

    // The API server goes away, the world changes, it comes back with its
    // history lost: the agent's resumed watch gets 410 and relists.
    k.api.stop();
    k.lab.state.excluded.clear();
    let slice = serde_json::to_value(&k.lab.endpoint_slices()[0]).unwrap();
    k.api
        .change_silently(&[extra_service(), extra_slice(&all), slice], &[])
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    k.api.start(true).unwrap();
    k.wait_programmed(extra, Some(all.clone()), "after the API server restarted");
    k.wait_programmed(nginx, Some(all.clone()), "after the API server restarted");
    assert_answered_by(&spread(&k.lab, extra, 60), &pods, "extra after restart");

    // A watch cut mid-stream resumes from its resourceVersion: a change made
    // right after is not missed.
    k.api.drop_connections();
    k.api
        .delete(Resource::EndpointSlices, "default", "extra-abcde");
    k.api.apply(&extra_slice(&k.pod_ips(&pods[..1]))).unwrap();
    k.wait_programmed(extra, Some(k.pod_ips(&pods[..1])), "after a dropped watch");
    assert_answered_by(&spread(&k.lab, extra, 20), &pods[..1], "extra after drop");
    assert_requests_within_rbac(&k.api);
}

#[privileged_test]
fn an_unreachable_or_slow_api_server_leaves_the_data_path_as_it_was() {
    let (mut k, nginx, pods) = KubeLab::serving();
    let before = k.snapshot();

    let prober = Load::start(
        k.lab.client.ns.path(),
        nginx,
        LoadKind::NewConnections,
        "API server unreachable 4 s",
        Duration::from_millis(5),
        20_000,
    );
    k.api.stop();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        before,
        k.snapshot(),
        "the maps must not change while the API server is away"
    );
    assert_eq!(
        k.readyz(),
        Some(200),
        "still ready: the maps are as last synced"
    );
    prober.finish().assert_none_failed();

    // Back, but slow: every response and event takes 300 ms. A change
    // still arrives.
    k.api.set_delay(Duration::from_millis(300));
    k.api.start(false).unwrap();
    k.lab.state.excluded = [pods[2].clone()].into();
    k.publish();
    k.wait_programmed(
        nginx,
        Some(k.pod_ips(&pods[..2])),
        "through a slow API server",
    );
    assert_answered_by(&spread(&k.lab, nginx, 40), &pods[..2], "after the outage");
}

#[privileged_test]
fn an_api_server_that_accepts_and_never_answers_is_timed_out_and_reported() {
    let mut k = KubeLab::nginx();
    k.publish();
    let api_timeout = Duration::from_secs(1);
    k.start_agent_extra(&["--api-timeout", "1s"]);
    let nginx = SocketAddrV4::new(NGINX, 80);
    let pods = k.lab.pods_of("Deployment/nginx-deployment");
    k.wait_programmed(nginx, Some(k.pod_ips(&pods)), "initial");
    k.wait_readyz(200, Duration::from_secs(5));
    let before = k.snapshot();
    let prober = Load::start(
        k.lab.client.ns.path(),
        nginx,
        LoadKind::NewConnections,
        "API server hung",
        Duration::from_millis(5),
        20_000,
    );

    // Hung: connections are accepted, nothing is answered, open watches
    // go silent. A 410 makes the watches relist, into the hang.
    k.api.set_unresponsive(true);
    k.api.expire_watches();
    let took = k.wait_readyz(503, api_timeout * 10);
    println!("HUNG: /readyz 503 after {took:?} (--api-timeout {api_timeout:?})");
    assert!(
        took >= api_timeout * 2,
        "not ready only after three timeouts without an answer, took {took:?}"
    );
    let m = k.metrics();
    assert!(metric_sum(&m, "lb_api_server_up", &[]) < 0.5, "down: {m}");
    let log = k.lab.agent_log();
    for said in [
        "API server probe failed",
        "/readyz reports not ready",
        "watch of services failed, retrying",
    ] {
        assert!(log.contains(said), "the agent must say {said:?}:\n{log}");
    }
    assert_eq!(before, k.snapshot(), "the maps stay as last programmed");
    prober.finish().assert_none_failed();

    // Answering again: ready, and a change made meanwhile arrives.
    k.lab.state.excluded = [pods[2].clone()].into();
    k.publish();
    k.api.set_unresponsive(false);
    let took = k.wait_readyz(200, CONVERGE);
    println!("RECOVERED: /readyz 200 after {took:?}");
    k.wait_programmed(nginx, Some(k.pod_ips(&pods[..2])), "after the hang");
    assert_answered_by(&spread(&k.lab, nginx, 40), &pods[..2], "after the hang");
    assert!(k.lab.agent_log().contains("API server answers again"));
    assert_requests_within_rbac(&k.api);
}

/// Runs `lb-agent run` in the lab node with `env`, expecting it to exit
/// within 15 s; returns (success, output).
fn agent_run_exits(k: &KubeLab, flags: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let agent = sibling_binary("lb-agent", "LB_AGENT_BIN").expect("lb-agent binary");
    let out = k.lab.dir.join("bootstrap.log");
    let log = std::fs::File::create(&out).unwrap();
    let mut cmd = k.lab.node.command(agent);
    cmd.arg("--pin-dir")
        .arg(&k.lab.pin_dir)
        .arg("run")
        .args(flags)
        .args(["--interfaces", "eth0", "--healthz-addr", "off"])
        .env_remove("KUBECONFIG")
        .env_remove("RUST_BACKTRACE")
        .env("HOME", &k.lab.dir)
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    for (key, value) in env {
        cmd.env(key, value);
    }
    let mut child = cmd.spawn().expect("spawn lb-agent");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "lb-agent {flags:?} did not exit in 15 s:\n{}",
                std::fs::read_to_string(&out).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status.success(), std::fs::read_to_string(&out).unwrap())
}

#[privileged_test]
fn the_api_server_address_is_required_in_a_pod_and_an_untranslated_service_address_refused() {
    let mut k = KubeLab::nginx();
    k.publish();
    let kubeconfig = k.kubeconfig.to_string_lossy().into_owned();
    // What the kubelet tells every pod about the `kubernetes` Service.
    let pod_env = [
        ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
        ("KUBERNETES_SERVICE_PORT", "443"),
        ("KUBERNETES_PORT", "tcp://10.96.0.1:443"),
    ];

    // In a pod without the setting: refused at once, saying what to set.
    let (ok, out) = agent_run_exits(&k, &[], &pod_env);
    assert!(
        !ok && out.contains("the API server address is required"),
        "{out}"
    );
    assert!(out.contains("LB_API_SERVER"), "{out}");

    // The DaemonSet's placeholder is not an address.
    let mut env = pod_env.to_vec();
    env.push(("LB_API_SERVER", "https://<api-server-address>:6443"));
    let (ok, out) = agent_run_exits(&k, &[], &env);
    assert!(!ok && out.contains("is not a URL"), "{out}");

    // The `kubernetes` Service's address, which nothing here translates:
    // refused within --api-timeout, before anything is attached.
    let (ok, out) = agent_run_exits(
        &k,
        &[
            "--kubeconfig",
            &kubeconfig,
            "--api-server",
            "https://10.96.0.1:443",
            "--api-timeout",
            "2s",
        ],
        &pod_env,
    );
    assert!(
        !ok && out.contains("is the `kubernetes` Service's ClusterIP")
            && out.contains("nothing on this node translates it"),
        "{out}"
    );
    let said = out.lines().find(|l| l.starts_with("Error:"));
    println!("REFUSED: {}", said.unwrap_or_default());
    let pinned: Vec<_> = std::fs::read_dir(&k.lab.pin_dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(pinned.is_empty(), "nothing attached or pinned: {pinned:?}");

    // --api-server replaces the kubeconfig's server: the agent runs.
    let wrong = k.lab.dir.join("kubeconfig-service-address");
    std::fs::write(
        &wrong,
        k.api
            .kubeconfig()
            .replace(&k.api.addr().to_string(), "10.96.0.1:443"),
    )
    .unwrap();
    let real = format!("http://{}", k.api.addr());
    let wrong = wrong.to_string_lossy().into_owned();
    let flags: Vec<String> = k
        .agent_flags()
        .into_iter()
        .map(|f| if f == kubeconfig { wrong.clone() } else { f })
        .chain(["--api-server".into(), real])
        .collect();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    k.lab.agent().only(&flags).start().expect("start lb-agent");
    k.wait_programmed(
        SocketAddrV4::new(NGINX, 80),
        Some(k.pod_ips(&k.lab.pods_of("Deployment/nginx-deployment"))),
        "with --api-server",
    );
}

#[privileged_test]
fn readyz_waits_for_the_first_full_sync() {
    let mut k = KubeLab::nginx();
    k.publish();
    k.api.stop();
    let flags = k.agent_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    k.lab.agent().only(&flags).spawn().expect("spawn lb-agent");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut code = None;
    while Instant::now() < deadline && code.is_none() {
        code = k.readyz();
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(code, Some(503), "not ready before the first sync");
    assert_eq!(k.lab.generation(), 0, "nothing written without the API");
    k.api.start(false).unwrap();
    k.lab.wait_for_generation(1).expect("first sync");
    assert_eq!(k.readyz(), Some(200));
    let m = k.metrics();
    for name in [
        "lb_sync_proxy_rules_duration_seconds_bucket",
        "lb_network_programming_duration_seconds_bucket",
        "lb_services_programmed",
        "lb_backends_programmed",
        "lb_map_entries",
        "lb_map_max_entries",
        "lb_datapath_packets",
    ] {
        assert!(m.contains(name), "metric {name} missing:\n{m}");
    }
    assert_requests_within_rbac(&k.api);
}

#[privileged_test]
fn objects_the_data_path_cannot_express_are_skipped_counted_and_the_rest_works() {
    let mut k = KubeLab::nginx();
    k.publish();
    let sctp = json!({"kind": "Service", "metadata": {"name": "sctp", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.30", "ports": [{"port": 9, "protocol": "SCTP"}]}});
    let bad_ip = json!({"kind": "Service", "metadata": {"name": "bad-ip", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.999", "ports": [{"port": 80}]}});
    let other_proxy = json!({"kind": "Service", "metadata": {"name": "other", "namespace": "default",
            "labels": {"service.kubernetes.io/service-proxy-name": "someone-else"}},
        "spec": {"clusterIP": "10.96.0.31", "ports": [{"port": 80}]}});
    let mut other_slice = extra_slice(&k.pod_ips(&k.lab.pods_of("Deployment/nginx-deployment")));
    other_slice["metadata"]["name"] = json!("other-abcde");
    other_slice["metadata"]["labels"] = json!({"kubernetes.io/service-name": "other",
        "service.kubernetes.io/service-proxy-name": "someone-else"});
    k.api
        .apply_all(&[sctp, bad_ip, other_proxy, other_slice])
        .unwrap();
    k.start_agent();
    let nginx = SocketAddrV4::new(NGINX, 80);
    let pods = k.lab.pods_of("Deployment/nginx-deployment");
    k.wait_programmed(nginx, Some(k.pod_ips(&pods)), "the valid Service");
    assert_answered_by(
        &spread(&k.lab, nginx, 60),
        &pods,
        "valid Service beside bad ones",
    );
    assert_eq!(
        k.programmed(
            SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 31), 80),
            Protocol::Tcp
        ),
        None,
        "another proxy's Service is left alone"
    );
    let log = k.lab.agent_log();
    for name in ["default/sctp", "default/bad-ip"] {
        assert!(log.contains(name), "the log names {name}:\n{log}");
    }
    let m = k.metrics();
    assert!(
        metric_sum(&m, "lb_invalid_objects_total", &[]) >= 2.0,
        "both bad Services are counted:\n{m}"
    );
}

/// `lb-agent maps` and `lb_map_memory_bytes` report what the kernel
/// charges for each pinned map, and the capacity flags size it: a
/// conntrack map of 4,096 entries costs a fraction of the default's.
#[privileged_test]
fn map_memory_is_reported_per_map_and_follows_the_capacity_flags() {
    let mut k = KubeLab::nginx();
    k.publish();
    k.start_agent_extra(&["--conntrack-max", "4096", "--frontends-max", "1024"]);
    let pods = k.lab.pods_of("Deployment/nginx-deployment");
    k.wait_programmed(
        SocketAddrV4::new(NGINX, 80),
        Some(k.pod_ips(&pods)),
        "served",
    );
    let maps = k.lab.agent_command_json(&["maps", "--output", "json"]);
    let maps = maps.as_array().expect("a list of maps");
    assert_eq!(maps.len(), lb_common::map_spec::ALL.len(), "{maps:?}");
    let of = |name: &str| {
        maps.iter()
            .find(|m| m["map"] == name)
            .unwrap_or_else(|| panic!("{name} missing: {maps:?}"))
            .clone()
    };
    let ct = of("lb4_conntrack");
    assert_eq!(ct["max_entries"], 4096);
    let ct_bytes = ct["memory_bytes"].as_u64().expect("bytes");
    // At least the preallocated keys and values (16 + 24 bytes an entry).
    assert!(ct_bytes >= 4096 * 40, "{ct}");
    let backends = of("lb4_backends");
    assert!(
        backends["memory_bytes"].as_u64().unwrap() >= u64::from(lb_common::MAX_BACKENDS) * 12,
        "{backends}"
    );
    assert!(
        ct_bytes < backends["memory_bytes"].as_u64().unwrap(),
        "4,096 conntrack entries cost less than 131,072 backend slots: {ct} {backends}"
    );
    // The maps indexed by reverse NAT id follow --frontends-max; the
    // per-CPU Service counters cost 16 bytes an id on every CPU.
    for name in [
        "lb4_reverse_nat",
        "lb6_reverse_nat",
        "lb4_svc_stats",
        "lb_maglev",
    ] {
        assert_eq!(of(name)["max_entries"], 1024, "{name}");
    }
    let cpus = aya::util::nr_cpus().expect("possible CPUs") as u64;
    let svc_stats = of("lb4_svc_stats")["memory_bytes"].as_u64().expect("bytes");
    assert!(
        (1024 * 16 * cpus..u64::from(lb_common::MAX_REV_NAT) * 16 * cpus).contains(&svc_stats),
        "lb4_svc_stats of 1,024 ids on {cpus} CPUs: {svc_stats} bytes"
    );
    let metrics = k.metrics();
    let scraped = metric_sum(&metrics, "lb_map_memory_bytes", &["map=\"lb4_conntrack\""]);
    assert!(
        (scraped - ct_bytes as f64).abs() < 1.0,
        "{scraped} vs {ct_bytes}"
    );

    // Restarted with fewer frontends: the reverse NAT entries are copied
    // into the smaller maps (their ids fit), the counters and Maglev maps
    // start anew, and the Service is served throughout.
    k.lab.stop_agent();
    k.start_agent_extra(&["--conntrack-max", "4096", "--frontends-max", "16"]);
    k.wait_programmed(
        SocketAddrV4::new(NGINX, 80),
        Some(k.pod_ips(&pods)),
        "served after the restart",
    );
    let maps = k.lab.agent_command_json(&["maps", "--output", "json"]);
    for name in ["lb4_reverse_nat", "lb4_svc_stats", "lb_maglev"] {
        let m = maps.as_array().unwrap().iter().find(|m| m["map"] == name);
        assert_eq!(
            m.map(|m| m["max_entries"].clone()),
            Some(16.into()),
            "{name}"
        );
    }
    assert_answered_by(
        &spread(&k.lab, SocketAddrV4::new(NGINX, 80), 30),
        &pods,
        "after",
    );
}

/// Without capacity flags the flow-state maps (conntrack, affinity, socket
/// LB) are sized from the node's memory by `--map-size-ratio`: the agent
/// creates the capacities the sizing gives this node, what the kernel
/// charges for them matches the sizing's estimate and stays within the
/// budget, and twice the ratio gives the maps twice the room.
#[privileged_test]
fn flow_state_maps_are_sized_from_the_nodes_memory_by_the_ratio() {
    use lb_userspace::datapath::map_sizing::{node_memory, size_flow_state, Requested};
    const FLOW_STATE: [&str; 8] = [
        "lb4_conntrack",
        "lb4_affinity",
        "lb4_sock_rev",
        "lb4_sock_fwd",
        "lb6_conntrack",
        "lb6_affinity",
        "lb6_sock_rev",
        "lb6_sock_fwd",
    ];
    let mut k = KubeLab::nginx();
    k.publish();
    let memory = node_memory().expect("MemTotal");
    let mut conntrack = Vec::new();
    for ratio in ["0.004", "0.008"] {
        k.lab.kill_agent();
        k.start_agent_extra(&["--map-size-ratio", ratio]);
        let maps = k.lab.agent_command_json(&["maps", "--output", "json"]);
        let of = |name: &str| {
            maps.as_array()
                .and_then(|m| m.iter().find(|m| m["map"] == name))
                .unwrap_or_else(|| panic!("{name} missing: {maps}"))
                .clone()
        };
        let ipv6 = of("lb6_conntrack")["max_entries"].as_u64() != Some(1);
        let sizing = size_flow_state(memory, ratio.parse().unwrap(), ipv6, Requested::default());
        for (map, want) in [
            ("lb4_conntrack", sizing.sizes.conntrack),
            ("lb4_affinity", sizing.sizes.affinity),
            ("lb4_sock_rev", sizing.sizes.sockets),
            ("lb4_sock_fwd", sizing.sizes.sockets),
        ] {
            assert_eq!(of(map)["max_entries"], want, "{map} at {ratio}: {sizing:?}");
        }
        let charged: u64 = FLOW_STATE
            .iter()
            .filter(|m| ipv6 || m.starts_with("lb4_"))
            .map(|m| of(m)["memory_bytes"].as_u64().expect("bytes"))
            .sum();
        let off = charged.abs_diff(sizing.cost_bytes) as f64 / sizing.cost_bytes as f64;
        assert!(
            off < 0.02,
            "the kernel charges {charged} bytes, the sizing estimated {}: {sizing:?}",
            sizing.cost_bytes
        );
        assert!(
            charged <= sizing.budget_bytes + sizing.budget_bytes / 50,
            "{charged} bytes over the budget: {sizing:?}"
        );
        conntrack.push(sizing.sizes.conntrack);
        assert!(
            k.lab.agent_log().contains(&format!(
                "conntrack {}, affinity {}, socket LB {} entries a family",
                sizing.sizes.conntrack, sizing.sizes.affinity, sizing.sizes.sockets
            )),
            "the sizes are logged:\n{}",
            k.lab.agent_log()
        );
    }
    // Unless a floor or the ceiling holds it (a node under 9 GiB).
    assert!(
        conntrack[1] >= conntrack[0] * 19 / 10 || conntrack[0] == 131_072,
        "{conntrack:?}"
    );
}

/// `--services-max` sizes the services map; Services that do not fit are
/// reported and counted, the agent keeps running, and what was already
/// served keeps being served.
#[privileged_test]
fn a_full_services_map_fails_the_services_that_do_not_fit_and_nothing_else() {
    let mut k = KubeLab::nginx();
    k.publish();
    k.start_agent_extra(&["--services-max", "32"]);
    let nginx = SocketAddrV4::new(NGINX, 80);
    let pods = k.lab.pods_of("Deployment/nginx-deployment");
    k.wait_programmed(nginx, Some(k.pod_ips(&pods)), "served");
    let more: Vec<Value> = (0..40)
        .map(|i| {
            json!({"kind": "Service", "metadata": {"name": format!("more-{i}"), "namespace": "default"},
                "spec": {"clusterIP": format!("10.96.7.{}", i + 1), "ports": [{"port": 80}]}})
        })
        .collect();
    k.api.apply_all(&more).unwrap();
    let deadline = Instant::now() + CONVERGE;
    let failures = loop {
        let m = k.metrics();
        let n = metric_sum(&m, "lb_map_write_failures_total", &[]);
        if n > 0.0 || Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(failures > 0.0, "writes into the full map are counted");
    let m = k.metrics();
    let capacity = metric_sum(&m, "lb_map_max_entries", &["map=\"lb4_services\""]);
    assert!((capacity - 32.0).abs() < 0.5, "{m}");
    assert!(
        k.lab.agent_log().contains("map is full"),
        "the log says why:\n{}",
        k.lab.agent_log()
    );
    assert_answered_by(&spread(&k.lab, nginx, 30), &pods, "still served");
    let maps = k.lab.agent_command_json(&["maps", "--output", "json"]);
    let services = maps
        .as_array()
        .and_then(|m| m.iter().find(|m| m["map"] == "lb4_services"))
        .expect("services map");
    assert_eq!(services["max_entries"], 32);
}
