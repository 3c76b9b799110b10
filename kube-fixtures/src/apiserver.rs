//! A Kubernetes API server fixture: the list/watch half of the real HTTP
//! protocol, for the resources lb-agent reads (Services, EndpointSlices,
//! Nodes), so the real agent binary can be driven without a cluster.
//!
//! What it speaks, as the API server does:
//! - `GET /api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`,
//!   `/api/v1/nodes` (and their `/namespaces/{ns}/` forms): a `*List` with
//!   `metadata.resourceVersion`, paged by `limit` and `continue`;
//! - the same with `watch=true&resourceVersion=N`: a chunked stream of
//!   `ADDED`/`MODIFIED`/`DELETED` events after N, `BOOKMARK`s when
//!   `allowWatchBookmarks=true`, ended after `timeoutSeconds`;
//! - `labelSelector` (`k`, `!k`, `k=v`, `k!=v`, comma = and) and
//!   `fieldSelector` (`metadata.name=`, `metadata.namespace=`); an object that
//!   stops (starts) matching a watch's selector is sent as DELETED (ADDED);
//! - `GET /version`, which every client may read;
//! - a watch from a resourceVersion older than the compaction point gets a
//!   `410 Gone` ERROR event ("too old resource version"), which forces a
//!   relist, as etcd compaction does.
//!
//! Objects are stored as a real API server would serve them after
//! defaulting (see `api_defaults`).
//!
//! Test controls: create/update/delete objects, [`ApiServer::expire_watches`]
//! (410 to every open watch), [`ApiServer::drop_connections`] (cut every
//! open stream), [`ApiServer::set_delay`] (a slow server),
//! [`ApiServer::set_unresponsive`] (accepts, then never answers), and
//! [`ApiServer::stop`]/[`ApiServer::start`] (unreachable, then back on the
//! same address, optionally having lost its watch history like a restarted
//! server).

use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    ops::Bound,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Condvar, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// A resource the fixture serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Services,
    EndpointSlices,
    Nodes,
}

impl Resource {
    pub const ALL: [Resource; 3] = [
        Resource::Services,
        Resource::EndpointSlices,
        Resource::Nodes,
    ];

    fn kind(self) -> &'static str {
        match self {
            Resource::Services => "Service",
            Resource::EndpointSlices => "EndpointSlice",
            Resource::Nodes => "Node",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Resource::EndpointSlices => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }

    fn from_kind(kind: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.kind() == kind)
    }

    /// `(prefix, plural)` of the URL path.
    fn path(self) -> (&'static str, &'static str) {
        match self {
            Resource::Services => ("/api/v1", "services"),
            Resource::EndpointSlices => ("/apis/discovery.k8s.io/v1", "endpointslices"),
            Resource::Nodes => ("/api/v1", "nodes"),
        }
    }

    /// `(API group, plural)`, as RBAC rules name the resource.
    pub fn rbac_name(self) -> (&'static str, &'static str) {
        match self {
            Resource::EndpointSlices => ("discovery.k8s.io", "endpointslices"),
            Resource::Services => ("", "services"),
            Resource::Nodes => ("", "nodes"),
        }
    }

    fn namespaced(self) -> bool {
        self != Resource::Nodes
    }
}

/// One API request the fixture answered, for tests that check what the
/// agent asks for (RBAC) and how (watch vs list).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    /// The URL path, without the query.
    pub path: String,
    pub resource: Option<Resource>,
    pub namespace: Option<String>,
    pub watch: bool,
    pub status: u16,
}

type ObjectKey = (Resource, String, String);

#[derive(Clone)]
struct StoredEvent {
    rv: u64,
    resource: Resource,
    kind: &'static str,
    /// The object after the change (for DELETED: as it was, with the new rv).
    object: Value,
    /// The object before the change, to tell selector transitions.
    previous: Option<Value>,
}

/// An object and its JSON text, encoded once when stored: a list page is
/// the texts of its objects put together, as the API server's watch cache
/// serves objects it keeps encoded.
struct StoredObject {
    object: Value,
    json: Arc<[u8]>,
}

impl StoredObject {
    fn new(object: Value) -> Self {
        let json = serde_json::to_vec(&object)
            .expect("a JSON value encodes")
            .into();
        StoredObject { object, json }
    }
}

#[derive(Default)]
struct Store {
    rv: u64,
    objects: BTreeMap<ObjectKey, StoredObject>,
    history: Vec<StoredEvent>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted_below: u64,
    /// Bumped to end every open watch with a 410 ERROR event.
    expire_epoch: u64,
    /// Bumped to cut every open connection.
    drop_epoch: u64,
    delay: Duration,
    /// Requests are read and never answered; open watches go silent.
    unresponsive: bool,
    requests: Vec<RequestRecord>,
}

struct Shared {
    store: Mutex<Store>,
    changed: Condvar,
}

/// A running (or stopped) fixture. Dropping it stops it.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    netns: Option<PathBuf>,
    serving: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

/// How long the accept loop waits for a connection before it checks
/// whether to stop. It wakes as soon as one arrives: a client that
/// connects per request (the fixture closes each list's connection) must
/// not wait for a polling period per request.
const ACCEPT_WAIT: Duration = Duration::from_millis(50);

/// Waits until `listener` has a connection to accept, or `timeout`.
fn wait_readable(listener: &TcpListener, timeout: Duration) {
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd for the duration of the call. An error or
    // a timeout only makes the caller try accept() again.
    unsafe { libc::poll(&mut fd, 1, ms) };
}

/// How often an idle watch sends a bookmark when asked to.
const BOOKMARK_INTERVAL: Duration = Duration::from_millis(500);
/// How long a handler waits for new events before checking its deadline.
const WAIT_SLICE: Duration = Duration::from_millis(50);

impl ApiServer {
    /// Starts on 127.0.0.1 (any port) inside the network namespace at
    /// `netns` (a `/run/netns/...` path), or in the caller's when None.
    pub fn start_in(netns: Option<PathBuf>) -> Result<Self> {
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            changed: Condvar::new(),
        });
        let listener = bind(netns.as_ref(), 0)?;
        let addr = listener.local_addr()?;
        let mut server = Self {
            shared,
            addr,
            netns,
            serving: None,
        };
        server.serve(listener)?;
        Ok(server)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kubeconfig for this server (plain HTTP, no credentials).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fixture\n  cluster:\n    server: http://{}\n\
             contexts:\n- name: fixture\n  context:\n    cluster: fixture\n    user: fixture\n\
             current-context: fixture\nusers:\n- name: fixture\n  user: {{}}\n",
            self.addr
        )
    }

    fn serve(&mut self, listener: TcpListener) -> Result<()> {
        listener.set_nonblocking(true)?;
        let running = Arc::new(AtomicBool::new(true));
        let (shared, flag) = (self.shared.clone(), running.clone());
        let handle = std::thread::spawn(move || {
            while flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (shared, flag) = (shared.clone(), flag.clone());
                        std::thread::spawn(move || {
                            let _ = handle_connection(stream, &shared, &flag);
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        wait_readable(&listener, ACCEPT_WAIT);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        self.serving = Some((running, handle));
        Ok(())
    }

    /// Stops listening and cuts every open connection: the server is
    /// unreachable (connections are refused) until [`ApiServer::start`].
    pub fn stop(&mut self) {
        if let Some((running, handle)) = self.serving.take() {
            running.store(false, Ordering::SeqCst);
            let _ = handle.join();
        }
        self.drop_connections();
    }

    /// Listens again on the same address. With `lose_history`, watch
    /// history is gone as after a real API server restart with a compacted
    /// store: clients resuming from an older resourceVersion get 410 Gone.
    pub fn start(&mut self, lose_history: bool) -> Result<()> {
        if self.serving.is_some() {
            return Ok(());
        }
        if lose_history {
            let mut st = self.lock();
            st.rv += 1;
            st.compacted_below = st.rv + 1;
            st.history.clear();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match bind(self.netns.as_ref(), self.addr.port()) {
                Ok(l) => break l,
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        self.serve(listener)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.shared.store.lock().expect("fixture store lock")
    }

    /// Every response (and every watch event) waits this long first.
    pub fn set_delay(&self, delay: Duration) {
        self.lock().delay = delay;
    }

    /// While set, the server accepts connections and reads requests but
    /// never answers, and open watches send nothing (not even bookmarks):
    /// a hung API server. Requests held meanwhile are closed unanswered
    /// when it is cleared.
    pub fn set_unresponsive(&self, unresponsive: bool) {
        self.lock().unresponsive = unresponsive;
        self.shared.changed.notify_all();
    }

    /// Creates or replaces an object (from its `kind`, namespace and name),
    /// as `kubectl apply` would; returns its new resourceVersion.
    pub fn apply(&self, object: &Value) -> Result<u64> {
        self.apply_all(std::slice::from_ref(object))
    }

    /// Applies several objects; each gets its own resourceVersion.
    pub fn apply_all(&self, objects: &[Value]) -> Result<u64> {
        let mut st = self.lock();
        for object in objects {
            let (key, mut object) = keyed(object)?;
            crate::api_defaults::apply(&mut object);
            st.rv += 1;
            let rv = st.rv;
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            if object["metadata"]["uid"].is_null() {
                object["metadata"]["uid"] =
                    json!(format!("uid-{}-{}-{}", key.0.kind(), key.1, key.2));
            }
            let previous = st
                .objects
                .insert(key.clone(), StoredObject::new(object.clone()))
                .map(|p| p.object);
            st.history.push(StoredEvent {
                rv,
                resource: key.0,
                kind: if previous.is_some() {
                    "MODIFIED"
                } else {
                    "ADDED"
                },
                object,
                previous,
            });
        }
        let rv = st.rv;
        drop(st);
        self.shared.changed.notify_all();
        Ok(rv)
    }

    /// Deletes an object; false if it did not exist.
    pub fn delete(&self, resource: Resource, namespace: &str, name: &str) -> bool {
        let mut st = self.lock();
        let ns = if resource.namespaced() { namespace } else { "" };
        let key = (resource, ns.to_owned(), name.to_owned());
        let Some(StoredObject { mut object, .. }) = st.objects.remove(&key) else {
            return false;
        };
        st.rv += 1;
        object["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        let rv = st.rv;
        st.history.push(StoredEvent {
            rv,
            resource,
            kind: "DELETED",
            previous: Some(object.clone()),
            object,
        });
        drop(st);
        self.shared.changed.notify_all();
        true
    }

    /// Changes objects without telling open watches (as if the events were
    /// lost), then compacts history so the next resume gets 410 Gone:
    /// only a relist can see these changes.
    pub fn change_silently(
        &self,
        apply: &[Value],
        delete: &[(Resource, &str, &str)],
    ) -> Result<()> {
        let mut st = self.lock();
        for object in apply {
            let (key, mut object) = keyed(object)?;
            st.rv += 1;
            object["metadata"]["resourceVersion"] = json!(st.rv.to_string());
            st.objects.insert(key, StoredObject::new(object));
        }
        for (resource, ns, name) in delete {
            let ns = if resource.namespaced() { *ns } else { "" };
            st.objects
                .remove(&(*resource, ns.to_owned(), (*name).to_owned()));
            st.rv += 1;
        }
        st.compacted_below = st.rv + 1;
        st.history.clear();
        Ok(())
    }

    /// Compacts history and ends every open watch with a `410 Gone` ERROR
    /// event, as the API server does when its watch cache falls behind.
    pub fn expire_watches(&self) {
        let mut st = self.lock();
        st.rv += 1;
        st.compacted_below = st.rv;
        st.history.clear();
        st.expire_epoch += 1;
        drop(st);
        self.shared.changed.notify_all();
    }

    /// Cuts every open connection mid-stream (a load balancer in front of
    /// the API server restarting, a network blip).
    pub fn drop_connections(&self) {
        self.lock().drop_epoch += 1;
        self.shared.changed.notify_all();
    }

    pub fn requests(&self) -> Vec<RequestRecord> {
        self.lock().requests.clone()
    }

    /// The stored object, if any.
    pub fn get(&self, resource: Resource, namespace: &str, name: &str) -> Option<Value> {
        let ns = if resource.namespaced() { namespace } else { "" };
        self.lock()
            .objects
            .get(&(resource, ns.to_owned(), name.to_owned()))
            .map(|s| s.object.clone())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn bind(netns: Option<&PathBuf>, port: u16) -> Result<TcpListener> {
    let bind = move || TcpListener::bind(("127.0.0.1", port));
    let listener = match netns {
        Some(path) => in_netns(path, bind)?,
        None => bind(),
    };
    listener.with_context(|| format!("binding the API server fixture to 127.0.0.1:{port}"))
}

/// Runs `f` on a thread that entered the network namespace at `path`, so
/// a socket it binds belongs to that namespace (and stays there when the
/// thread ends). The lab has its own (`lb_lab::in_netns`); this crate
/// cannot use it without depending on the lab, which depends on it.
fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(move || {
            let ns = File::open(path).with_context(|| format!("open {}", path.display()))?;
            // SAFETY: a valid namespace fd; only this thread changes namespace.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let e = std::io::Error::last_os_error();
                bail!("setns {}: {e}", path.display());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread inside {} panicked", path.display()))?
    })
}

/// The store key of an object, and the object with its kind filled in.
fn keyed(object: &Value) -> Result<(ObjectKey, Value)> {
    let kind = object["kind"].as_str().context("object without kind")?;
    let resource =
        Resource::from_kind(kind).with_context(|| format!("kind {kind} is not served"))?;
    let name = object["metadata"]["name"]
        .as_str()
        .context("object without metadata.name")?
        .to_owned();
    let mut object = object.clone();
    object["apiVersion"] = json!(resource.api_version());
    let ns = if resource.namespaced() {
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        object["metadata"]["namespace"] = json!(ns);
        ns
    } else {
        String::new()
    };
    Ok(((resource, ns, name), object))
}

/// A parsed request target.
struct Target {
    path: String,
    resource: Option<Resource>,
    namespace: Option<String>,
    query: BTreeMap<String, String>,
}

fn parse_target(target: &str) -> Target {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    let mut found = Target {
        path: path.to_owned(),
        resource: None,
        namespace: None,
        query,
    };
    for r in Resource::ALL {
        let (prefix, plural) = r.path();
        let Some(rest) = path.strip_prefix(prefix) else {
            continue;
        };
        if rest == format!("/{plural}") {
            found.resource = Some(r);
        } else if let Some(ns_rest) = rest.strip_prefix("/namespaces/") {
            if let Some((ns, tail)) = ns_rest.split_once('/') {
                if tail == plural && r.namespaced() {
                    found.resource = Some(r);
                    found.namespace = Some(ns.to_owned());
                }
            }
        }
        if found.resource.is_some() {
            break;
        }
    }
    found
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A label selector term.
#[derive(Debug, PartialEq)]
enum Term {
    Exists(String),
    NotExists(String),
    Equals(String, String),
    NotEquals(String, String),
}

fn parse_label_selector(s: &str) -> Result<Vec<Term>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            if let Some(k) = t.strip_prefix('!') {
                Ok(Term::NotExists(k.to_owned()))
            } else if let Some((k, v)) = t.split_once("!=") {
                Ok(Term::NotEquals(k.to_owned(), v.to_owned()))
            } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                Ok(Term::Equals(k.to_owned(), v.to_owned()))
            } else if t.contains(' ') || t.contains('(') {
                Err(format!(
                    "set-based selector {t:?} is not supported by the fixture"
                ))
            } else {
                Ok(Term::Exists(t.to_owned()))
            }
        })
        .collect()
}

/// What a request selects.
struct Selector {
    namespace: Option<String>,
    labels: Vec<Term>,
    fields: Vec<(String, String)>,
}

impl Selector {
    fn from_target(t: &Target) -> Result<Self, String> {
        let labels = parse_label_selector(t.query.get("labelSelector").map_or("", |s| s))?;
        let mut fields = Vec::new();
        for term in t
            .query
            .get("fieldSelector")
            .map_or("", |s| s)
            .split(',')
            .filter(|s| !s.is_empty())
        {
            let (k, v) = term
                .split_once('=')
                .ok_or_else(|| format!("bad field selector {term:?}"))?;
            let k = k.trim_end_matches('=');
            if k != "metadata.name" && k != "metadata.namespace" {
                return Err(format!("field label not supported: {k}"));
            }
            fields.push((k.to_owned(), v.to_owned()));
        }
        Ok(Self {
            namespace: t.namespace.clone(),
            labels,
            fields,
        })
    }

    fn matches(&self, object: &Value) -> bool {
        let meta = &object["metadata"];
        if let Some(ns) = &self.namespace {
            if meta["namespace"].as_str() != Some(ns) {
                return false;
            }
        }
        let label = |k: &str| meta["labels"][k].as_str();
        let labels_ok = self.labels.iter().all(|t| match t {
            Term::Exists(k) => label(k).is_some(),
            Term::NotExists(k) => label(k).is_none(),
            Term::Equals(k, v) => label(k) == Some(v),
            Term::NotEquals(k, v) => label(k) != Some(v),
        });
        labels_ok
            && self.fields.iter().all(|(k, v)| {
                let field = k.strip_prefix("metadata.").unwrap_or(k);
                meta[field].as_str().unwrap_or("") == v
            })
    }
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn write_response(stream: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    write_encoded(stream, code, &serde_json::to_vec(body)?)
}

fn write_encoded(stream: &mut TcpStream, code: u16, text: &[u8]) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        410 => "Gone",
        _ => "Error",
    };
    write!(
        stream,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        text.len()
    )?;
    stream.write_all(text)?;
    stream.flush()
}

fn write_chunk(stream: &mut TcpStream, line: &Value) -> std::io::Result<()> {
    let mut text = serde_json::to_vec(line)?;
    text.push(b'\n');
    write!(stream, "{:x}\r\n", text.len())?;
    stream.write_all(&text)?;
    stream.write_all(b"\r\n")?;
    stream.flush()
}

/// Serves one request (the fixture closes every connection after its
/// response, which HTTP/1.1 clients handle by reconnecting).
/// The method and target of the request on `stream`, its headers read
/// past.
fn read_request(stream: &TcpStream) -> Result<(String, String)> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" || header == "\n" {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(m), Some(t)) => Ok((m.to_owned(), t.to_owned())),
        _ => bail!("bad request line {request_line:?}"),
    }
}

/// The resource a request is for, or the answer to one the fixture does
/// not serve (an unknown path: 404; a method other than GET: 405).
fn served_resource(method: &str, t: &Target, target: &str) -> Result<Resource, (u16, Value)> {
    let Some(resource) = t.resource else {
        let message = format!("the server could not find {target}");
        return Err((404, status_body(404, "NotFound", &message)));
    };
    if method != "GET" {
        let message = "the fixture serves list and watch only";
        return Err((405, status_body(405, "MethodNotAllowed", message)));
    }
    Ok(resource)
}

fn handle_connection(mut stream: TcpStream, shared: &Shared, running: &AtomicBool) -> Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let (method, target) = read_request(&stream)?;
    let t = parse_target(&target);
    let watch = t
        .query
        .get("watch")
        .is_some_and(|v| v == "true" || v == "1");
    let (delay, drop_epoch) = {
        let st = shared.store.lock().expect("store");
        (st.delay, st.drop_epoch)
    };
    if !delay.is_zero() {
        std::thread::sleep(delay);
    }
    let record = |status: u16| {
        shared
            .store
            .lock()
            .expect("store")
            .requests
            .push(RequestRecord {
                method: method.clone(),
                path: t.path.clone(),
                resource: t.resource,
                namespace: t.namespace.clone(),
                watch,
                status,
            });
    };
    if hold_unanswered(shared, running, drop_epoch) {
        record(0);
        let _ = stream.shutdown(std::net::Shutdown::Both);
        return Ok(());
    }
    if t.path == "/version" && method == "GET" {
        record(200);
        return Ok(write_response(&mut stream, 200, &version_info())?);
    }
    let resource = match served_resource(&method, &t, &target) {
        Ok(r) => r,
        Err((code, body)) => {
            record(code);
            return Ok(write_response(&mut stream, code, &body)?);
        }
    };
    let selector = match Selector::from_target(&t) {
        Ok(s) => s,
        Err(e) => {
            record(400);
            return Ok(write_response(
                &mut stream,
                400,
                &status_body(400, "BadRequest", &e),
            )?);
        }
    };
    if watch {
        record(200);
        serve_watch(stream, shared, running, resource, &t, &selector, drop_epoch)
    } else {
        match list(shared, resource, &t, &selector) {
            Ok(page) => {
                record(200);
                Ok(write_encoded(&mut stream, 200, &page)?)
            }
            Err((code, body)) => {
                record(code);
                Ok(write_response(&mut stream, code, &body)?)
            }
        }
    }
}

/// While the fixture is unresponsive, holds the request; true when it was
/// held (its answer is never sent).
fn hold_unanswered(shared: &Shared, running: &AtomicBool, drop_epoch: u64) -> bool {
    let mut st = shared.store.lock().expect("store");
    if !st.unresponsive {
        return false;
    }
    while st.unresponsive && st.drop_epoch == drop_epoch && running.load(Ordering::SeqCst) {
        st = shared
            .changed
            .wait_timeout(st, WAIT_SLICE)
            .expect("store")
            .0;
    }
    true
}

/// `GET /version`, as the API server answers it.
fn version_info() -> Value {
    json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-fixture",
           "gitCommit": "", "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z",
           "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64"})
}

/// A page of a list, encoded; or the error's status and body.
fn list(
    shared: &Shared,
    resource: Resource,
    t: &Target,
    selector: &Selector,
) -> Result<Vec<u8>, (u16, Value)> {
    let st = shared.store.lock().expect("store");
    let limit: usize = t
        .query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    // A continue token: "<snapshot rv>/<last key's namespace>/<last key's name>".
    let (snapshot_rv, after) = match t.query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let mut it = token.splitn(3, '/');
            let rv: u64 = it.next().and_then(|r| r.parse().ok()).unwrap_or(0);
            if rv < st.compacted_below {
                return Err((
                    410,
                    status_body(410, "Expired", "The provided continue parameter is too old"),
                ));
            }
            let ns = it.next().unwrap_or("").to_owned();
            let name = it.next().unwrap_or("").to_owned();
            (rv, Some((ns, name)))
        }
        None => (st.rv, None),
    };
    let mut items = Vec::new();
    let mut next = None;
    let mut last: Option<(&String, &String)> = None;
    // A page starts right after the token's key: paging through N objects
    // costs N, not N x pages.
    let start = match after {
        Some((ns, name)) => Bound::Excluded((resource, ns, name)),
        None => Bound::Included((resource, String::new(), String::new())),
    };
    for ((r, ns, name), stored) in st.objects.range((start, Bound::Unbounded)) {
        if *r != resource {
            break;
        }
        if !selector.matches(&stored.object) {
            continue;
        }
        if items.len() == limit {
            // The token names the last key returned; the next page starts after it.
            let (lns, lname) = last.expect("limit > 0");
            next = Some(format!("{snapshot_rv}/{lns}/{lname}"));
            break;
        }
        items.push(stored.json.clone());
        last = Some((ns, name));
    }
    drop(st);
    let mut meta = json!({"resourceVersion": snapshot_rv.to_string()});
    if let Some(n) = next {
        meta["continue"] = json!(n);
    }
    let head = json!({"kind": format!("{}List", resource.kind()),
                      "apiVersion": resource.api_version(), "metadata": meta});
    Ok(list_page(&head, &items))
}

/// `head` (an object's fields) with `"items"`: the encoded objects.
fn list_page(head: &Value, items: &[Arc<[u8]>]) -> Vec<u8> {
    let mut page = serde_json::to_vec(head).expect("a JSON value encodes");
    page.pop(); // its closing brace
    page.extend_from_slice(b",\"items\":[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            page.push(b',');
        }
        page.extend_from_slice(item);
    }
    page.extend_from_slice(b"]}");
    page
}

/// What a watch request asks for: events after `from` (0: from now),
/// bookmarks or not, until `deadline` (`timeoutSeconds`, else 30 minutes).
struct WatchQuery {
    from: u64,
    bookmarks: bool,
    deadline: Instant,
}

impl WatchQuery {
    fn of(t: &Target) -> Self {
        let from = t
            .query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let bookmarks = t
            .query
            .get("allowWatchBookmarks")
            .is_some_and(|v| v == "true");
        let timeout = t
            .query
            .get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .map_or(Duration::from_mins(30), Duration::from_secs);
        Self {
            from,
            bookmarks,
            deadline: Instant::now() + timeout,
        }
    }
}

/// Writes `events` as the selector sees them (an object that stops
/// matching is DELETED for the watcher, one that starts matching ADDED),
/// each after `delay`; whether any was written.
fn send_events(
    stream: &mut TcpStream,
    events: &[StoredEvent],
    selector: &Selector,
    delay: Duration,
) -> Result<bool> {
    let mut wrote = false;
    for e in events {
        let now_matches = selector.matches(&e.object);
        let was_matching = e.previous.as_ref().is_some_and(|p| selector.matches(p));
        let kind = match (e.kind, was_matching, now_matches) {
            ("DELETED", true, _) | (_, true, false) => "DELETED",
            ("DELETED", false, _) | (_, false, false) => continue,
            (_, false, true) => "ADDED",
            (_, true, true) => "MODIFIED",
        };
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        write_chunk(stream, &json!({"type": kind, "object": e.object}))?;
        wrote = true;
    }
    Ok(wrote)
}

/// Ends a watch that asked for events from `from`, compacted away since:
/// 410 Gone, as the API server says it (the watcher relists).
fn send_gone(stream: &mut TcpStream, from: u64) -> Result<()> {
    write_chunk(
        stream,
        &json!({"type": "ERROR", "object": status_body(410, "Expired",
            &format!("too old resource version: {from}"))}),
    )?;
    stream.write_all(b"0\r\n\r\n")?;
    Ok(())
}

/// A bookmark: the watch has seen everything up to `rv`.
fn send_bookmark(stream: &mut TcpStream, resource: Resource, rv: u64) -> Result<()> {
    write_chunk(
        stream,
        &json!({"type": "BOOKMARK", "object": {"kind": resource.kind(),
            "apiVersion": resource.api_version(),
            "metadata": {"resourceVersion": rv.to_string()}}}),
    )?;
    Ok(())
}

fn serve_watch(
    mut stream: TcpStream,
    shared: &Shared,
    running: &AtomicBool,
    resource: Resource,
    t: &Target,
    selector: &Selector,
    drop_epoch: u64,
) -> Result<()> {
    let WatchQuery {
        from,
        bookmarks,
        deadline,
    } = WatchQuery::of(t);
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )?;
    stream.flush()?;
    let mut st = shared.store.lock().expect("store");
    // resourceVersion 0 means "any": start from now.
    let mut sent_up_to = if from == 0 { st.rv } else { from };
    if from != 0 && from + 1 < st.compacted_below {
        drop(st);
        return send_gone(&mut stream, from);
    }
    let expire_epoch = st.expire_epoch;
    let mut last_write = Instant::now();
    loop {
        if st.drop_epoch != drop_epoch || !running.load(Ordering::SeqCst) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return Ok(());
        }
        if st.expire_epoch != expire_epoch {
            drop(st);
            return send_gone(&mut stream, from);
        }
        if st.unresponsive {
            st = shared
                .changed
                .wait_timeout(st, WAIT_SLICE)
                .expect("store")
                .0;
            continue;
        }
        let events: Vec<StoredEvent> = st
            .history
            .iter()
            .filter(|e| e.rv > sent_up_to && e.resource == resource)
            .cloned()
            .collect();
        let delay = st.delay;
        let current_rv = st.rv;
        drop(st);
        if send_events(&mut stream, &events, selector, delay)? {
            last_write = Instant::now();
        }
        if let Some(e) = events.last() {
            sent_up_to = e.rv;
        } else {
            sent_up_to = sent_up_to.max(current_rv);
        }
        if Instant::now() >= deadline {
            stream.write_all(b"0\r\n\r\n")?;
            return Ok(());
        }
        if bookmarks && last_write.elapsed() >= BOOKMARK_INTERVAL {
            send_bookmark(&mut stream, resource, sent_up_to)?;
            last_write = Instant::now();
        }
        st = shared.store.lock().expect("store");
        if st.rv == sent_up_to {
            st = shared
                .changed
                .wait_timeout(st, WAIT_SLICE)
                .expect("store")
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: SocketAddr, target: &str) -> (u16, String) {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut s, &mut text).unwrap();
        let code = text[9..12].parse().unwrap();
        (code, text)
    }

    fn svc(name: &str, labels: Value) -> Value {
        json!({"kind": "Service", "metadata": {"name": name, "namespace": "default", "labels": labels},
               "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}})
    }

    #[test]
    fn lists_page_and_filter_by_label() {
        let api = ApiServer::start_in(None).unwrap();
        for i in 0..5 {
            api.apply(&svc(&format!("s{i}"), json!({}))).unwrap();
        }
        api.apply(&svc(
            "other",
            json!({"service.kubernetes.io/service-proxy-name": "x"}),
        ))
        .unwrap();
        let (code, body) = get(
            api.addr(),
            "/api/v1/services?labelSelector=%21service.kubernetes.io%2Fservice-proxy-name&limit=2",
        );
        assert_eq!(code, 200, "{body}");
        let json: Value = serde_json::from_str(body.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(json["items"].as_array().unwrap().len(), 2);
        let token = json["metadata"]["continue"].as_str().unwrap().to_owned();
        let mut seen = 2;
        let mut token = Some(token);
        while let Some(tok) = token {
            let (_, body) = get(
                api.addr(),
                &format!("/api/v1/services?labelSelector=%21service.kubernetes.io%2Fservice-proxy-name&limit=2&continue={tok}"),
            );
            let json: Value = serde_json::from_str(body.split("\r\n\r\n").nth(1).unwrap()).unwrap();
            seen += json["items"].as_array().unwrap().len();
            token = json["metadata"]["continue"].as_str().map(str::to_owned);
        }
        assert_eq!(seen, 5, "the other proxy's Service is filtered out");
    }

    #[test]
    fn a_watch_from_a_compacted_version_gets_410_gone() {
        let api = ApiServer::start_in(None).unwrap();
        api.apply(&svc("a", json!({}))).unwrap();
        api.apply(&svc("b", json!({}))).unwrap();
        api.expire_watches();
        let (code, body) = get(api.addr(), "/api/v1/services?watch=true&resourceVersion=1");
        assert_eq!(code, 200);
        assert!(body.contains("\"code\":410"), "{body}");
    }

    #[test]
    fn selectors_parse_like_the_api_server() {
        assert_eq!(
            parse_label_selector("!a,b=c,d!=e,f").unwrap(),
            vec![
                Term::NotExists("a".into()),
                Term::Equals("b".into(), "c".into()),
                Term::NotEquals("d".into(), "e".into()),
                Term::Exists("f".into())
            ]
        );
        assert!(parse_label_selector("a in (b)").is_err());
        assert_eq!(
            percent_decode("metadata.name%3Dlab-node"),
            "metadata.name=lab-node"
        );
    }
}
