//! An in-test fake Kubernetes API server on 127.0.0.1:0 speaking real
//! Kubernetes JSON: cluster-wide lists with `metadata.resourceVersion`,
//! `?watch=true` chunked event streams (ADDED/MODIFIED/DELETED/BOOKMARK and
//! ERROR 410 for an expired resourceVersion), label selectors (with the
//! ADDED/DELETED transitions a selector implies), GET, server-side apply
//! PATCH and DELETE on namespaced objects, and fault injection (500s, dropped
//! and expired watches, held lists). Every write is recorded.

#![allow(
    dead_code,
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use envlane_sync::selector::LabelSelector;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

/// A recorded write.
#[derive(Debug, Clone)]
pub struct Write {
    pub method: String,
    pub resource: String,
    pub namespace: String,
    pub name: String,
    pub query: BTreeMap<String, String>,
    pub content_type: String,
    pub body: Option<Value>,
}

#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    resource: String,
    kind: &'static str,
    object: Value,
    old: Option<Value>,
}

type Key = (String, String, String);

#[derive(Default)]
struct Inner {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    log: Vec<Change>,
    writes: Vec<Write>,
    failing: bool,
    failing_writes: bool,
    /// PATCH and DELETE of objects in this namespace answer 500.
    failing_writes_in: Option<String>,
    /// Watches from a resourceVersion below this get 410 Gone.
    min_watch_rv: u64,
    held: HashSet<String>,
    lists: BTreeMap<String, u32>,
    watches: BTreeMap<String, u32>,
    requests: Vec<String>,
    /// Events created, in order.
    events: Vec<Value>,
}

pub struct Fake {
    inner: Mutex<Inner>,
    changes: broadcast::Sender<Change>,
    /// Bumped to end every open watch stream.
    close: watch::Sender<u64>,
    release: watch::Sender<u64>,
}

const WATCHED: [&str; 4] = ["namespaces", "pods", "services", "virtualservices"];

fn kind_of(resource: &str) -> (&'static str, &'static str) {
    match resource {
        "namespaces" => ("v1", "Namespace"),
        "pods" => ("v1", "Pod"),
        "services" => ("v1", "Service"),
        "wasmplugins" => ("extensions.istio.io/v1alpha1", "WasmPlugin"),
        "destinationrules" => ("networking.istio.io/v1", "DestinationRule"),
        "envoyfilters" => ("networking.istio.io/v1alpha3", "EnvoyFilter"),
        "virtualservices" => ("networking.istio.io/v1", "VirtualService"),
        _ => ("v1", "Unknown"),
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
           "status": if code < 300 { "Success" } else { "Failure" },
           "message": message, "reason": reason, "code": code})
}

fn reply(code: u16, body: &Value) -> Response {
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn labels_of(obj: &Value) -> BTreeMap<String, String> {
    obj["metadata"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("00");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_of(uri: &Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

impl Change {
    /// The event a watch with `selector` sees, as one JSON line.
    fn line(&self, selector: &LabelSelector) -> Option<String> {
        let now = selector.matches(&labels_of(&self.object));
        let before = self
            .old
            .as_ref()
            .is_some_and(|o| selector.matches(&labels_of(o)));
        let kind = match (self.kind, before, now) {
            ("ADDED", _, true) => "ADDED",
            ("MODIFIED", true, true) => "MODIFIED",
            ("MODIFIED", false, true) => "ADDED",
            ("MODIFIED", true, false) => "DELETED",
            ("DELETED", _, true) => "DELETED",
            _ => return None,
        };
        Some(format!(
            "{}\n",
            json!({"type": kind, "object": self.object})
        ))
    }
}

impl Fake {
    /// Starts the server; it runs until the test's runtime ends.
    pub async fn start() -> (Arc<Fake>, SocketAddr) {
        let fake = Arc::new(Fake {
            inner: Mutex::new(Inner {
                rv: 100,
                ..Inner::default()
            }),
            changes: broadcast::channel(4096).0,
            close: watch::channel(0).0,
            release: watch::channel(0).0,
        });
        let app = Router::new().fallback(handle).with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (fake, addr)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }

    /// Creates or replaces an object (as another client would), emitting a watch event.
    pub fn put(&self, resource: &str, mut obj: Value) {
        let mut inner = self.lock();
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        let (api_version, kind) = kind_of(resource);
        obj["apiVersion"] = api_version.into();
        obj["kind"] = kind.into();
        let key = (resource.to_string(), ns, name);
        self.store(&mut inner, key, obj);
    }

    fn store(&self, inner: &mut Inner, key: Key, mut obj: Value) -> Value {
        inner.rv += 1;
        let rv = inner.rv;
        obj["metadata"]["resourceVersion"] = rv.to_string().into();
        if obj["metadata"]["uid"].is_null() {
            obj["metadata"]["uid"] = format!("uid-{rv}").into();
        }
        let old = inner.objects.insert(key.clone(), obj.clone());
        let change = Change {
            rv,
            resource: key.0,
            kind: if old.is_some() { "MODIFIED" } else { "ADDED" },
            object: obj.clone(),
            old,
        };
        inner.log.push(change.clone());
        let _ = self.changes.send(change);
        obj
    }

    fn remove(&self, inner: &mut Inner, key: &Key) -> Option<Value> {
        let mut obj = inner.objects.remove(key)?;
        inner.rv += 1;
        let rv = inner.rv;
        obj["metadata"]["resourceVersion"] = rv.to_string().into();
        let change = Change {
            rv,
            resource: key.0.clone(),
            kind: "DELETED",
            object: obj.clone(),
            old: None,
        };
        inner.log.push(change.clone());
        let _ = self.changes.send(change);
        Some(obj)
    }

    pub fn delete(&self, resource: &str, ns: &str, name: &str) {
        let mut inner = self.lock();
        self.remove(&mut inner, &(resource.into(), ns.into(), name.into()));
    }

    pub fn get(&self, resource: &str, ns: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&(resource.into(), ns.into(), name.into()))
            .cloned()
    }

    /// `namespace/name` of every stored object of `resource`.
    pub fn names(&self, resource: &str) -> Vec<String> {
        self.lock()
            .objects
            .iter()
            .filter(|((r, _, _), _)| r == resource)
            .map(|((_, ns, name), _)| format!("{ns}/{name}"))
            .collect()
    }

    pub fn writes(&self) -> Vec<Write> {
        self.lock().writes.clone()
    }

    /// `METHOD uri` of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    /// Events created so far: (namespace, reason, regarding kind/name, note).
    pub fn events(&self) -> Vec<(String, String, String, String)> {
        self.lock()
            .events
            .iter()
            .map(|e| {
                let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
                (
                    s(&e["metadata"]["namespace"]),
                    s(&e["reason"]),
                    format!(
                        "{}/{}",
                        s(&e["regarding"]["kind"]),
                        s(&e["regarding"]["name"])
                    ),
                    s(&e["note"]),
                )
            })
            .collect()
    }

    pub fn write_count(&self) -> usize {
        self.lock().writes.len()
    }

    pub fn list_count(&self, resource: &str) -> u32 {
        self.lock().lists.get(resource).copied().unwrap_or(0)
    }

    pub fn watch_count(&self, resource: &str) -> u32 {
        self.lock().watches.get(resource).copied().unwrap_or(0)
    }

    /// Every request must answer 500 (open watches end) until `false`.
    pub fn set_failing(&self, failing: bool) {
        self.lock().failing = failing;
        if failing {
            self.drop_watches();
        }
    }

    /// PATCH and DELETE answer 500 (reads and watches work) until `false`.
    pub fn set_failing_writes(&self, failing: bool) {
        self.lock().failing_writes = failing;
    }

    /// PATCH and DELETE in namespace `ns` answer 500 (a webhook or quota that
    /// refuses everything there) until `None`.
    pub fn set_failing_writes_in(&self, ns: Option<&str>) {
        self.lock().failing_writes_in = ns.map(str::to_string);
    }

    /// Ends every open watch stream; clients re-watch from their last version.
    pub fn drop_watches(&self) {
        self.close.send_modify(|v| *v += 1);
    }

    /// Ends every watch and makes all current resourceVersions too old
    /// (410 Gone), so clients must relist.
    pub fn expire_watches(&self) {
        {
            let mut inner = self.lock();
            inner.min_watch_rv = inner.rv + 1;
        }
        self.drop_watches();
    }

    /// Lists of `resource` wait until [`Fake::release_lists`].
    pub fn hold_lists(&self, resource: &str) {
        self.lock().held.insert(resource.into());
    }

    pub fn release_lists(&self) {
        self.lock().held.clear();
        self.release.send_modify(|v| *v += 1);
    }
}

/// Waits until `cond` holds, polling; false after `timeout`.
pub async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn handle(
    State(fake): State<Arc<Fake>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query = query_of(&uri);
    let segments: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    // (resource, namespace, name)
    let target: Option<(String, Option<String>, Option<String>)> = match segments.as_slice() {
        ["api", "v1", resource] => Some(((*resource).into(), None, None)),
        ["api", "v1", "namespaces", ns, resource, name] => {
            Some(((*resource).into(), Some((*ns).into()), Some((*name).into())))
        }
        ["apis", _, _, resource] => Some(((*resource).into(), None, None)),
        ["api", "v1", "namespaces", ns, resource] | ["apis", _, _, "namespaces", ns, resource] => {
            Some(((*resource).into(), Some((*ns).into()), None))
        }
        ["apis", _, _, "namespaces", ns, resource, name] => {
            Some(((*resource).into(), Some((*ns).into()), Some((*name).into())))
        }
        _ => None,
    };
    {
        let mut inner = fake.lock();
        inner.requests.push(format!("{method} {uri}"));
        let write = method == Method::PATCH || method == Method::DELETE;
        let in_failing_ns = inner.failing_writes_in.as_deref().is_some_and(|ns| {
            segments
                .windows(2)
                .any(|w| w[0] == "namespaces" && w[1] == ns)
        });
        if inner.failing || (write && (inner.failing_writes || in_failing_ns)) {
            return reply(
                500,
                &status(500, "InternalError", "fake API server is down"),
            );
        }
    }
    let Some((resource, ns, name)) = target else {
        return reply(404, &status(404, "NotFound", "no such path"));
    };
    match (method, ns, name) {
        (Method::GET, None, None) if query.get("watch").map(String::as_str) == Some("true") => {
            watch_stream(&fake, resource, &query)
        }
        (Method::GET, None, None) => list(&fake, resource, &query).await,
        (Method::GET, Some(ns), Some(name)) => match fake.get(&resource, &ns, &name) {
            Some(obj) => reply(200, &obj),
            None => reply(
                404,
                &status(404, "NotFound", &format!("{resource} {name} not found")),
            ),
        },
        (Method::PATCH, Some(ns), Some(name)) => {
            let content_type = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            apply(&fake, resource, ns, name, query, content_type, &body)
        }
        (Method::POST, Some(ns), None) if resource == "events" => {
            let mut event: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return reply(400, &status(400, "BadRequest", &e.to_string())),
            };
            let mut inner = fake.lock();
            let name = format!("envlane-sync-{}", inner.events.len());
            event["metadata"]["name"] = name.clone().into();
            event["metadata"]["namespace"] = ns.clone().into();
            inner.events.push(event.clone());
            reply(201, &event)
        }
        (Method::DELETE, Some(ns), Some(name)) => {
            let mut inner = fake.lock();
            inner.writes.push(Write {
                method: "DELETE".into(),
                resource: resource.clone(),
                namespace: ns.clone(),
                name: name.clone(),
                query,
                content_type: String::new(),
                body: None,
            });
            match fake.remove(&mut inner, &(resource.clone(), ns, name.clone())) {
                Some(_) => reply(200, &status(200, "", "deleted")),
                None => reply(
                    404,
                    &status(404, "NotFound", &format!("{resource} {name} not found")),
                ),
            }
        }
        _ => reply(
            405,
            &status(405, "MethodNotAllowed", "not supported by the fake"),
        ),
    }
}

async fn list(fake: &Arc<Fake>, resource: String, query: &BTreeMap<String, String>) -> Response {
    let mut release = fake.release.subscribe();
    loop {
        if !fake.lock().held.contains(&resource) {
            break;
        }
        if release.changed().await.is_err() {
            break;
        }
    }
    let selector = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))
        .unwrap_or_default();
    let mut inner = fake.lock();
    if inner.failing {
        return reply(
            500,
            &status(500, "InternalError", "fake API server is down"),
        );
    }
    *inner.lists.entry(resource.clone()).or_default() += 1;
    let items: Vec<Value> = inner
        .objects
        .iter()
        .filter(|((r, _, _), obj)| *r == resource && selector.matches(&labels_of(obj)))
        .map(|(_, obj)| obj.clone())
        .collect();
    let (api_version, kind) = kind_of(&resource);
    reply(
        200,
        &json!({
            "apiVersion": api_version,
            "kind": format!("{kind}List"),
            "metadata": {"resourceVersion": inner.rv.to_string()},
            "items": items,
        }),
    )
}

fn watch_stream(fake: &Arc<Fake>, resource: String, query: &BTreeMap<String, String>) -> Response {
    let selector = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))
        .unwrap_or_default();
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(1024);
    let (api_version, kind) = kind_of(&resource);
    let mut inner = fake.lock();
    *inner.watches.entry(resource.clone()).or_default() += 1;
    if from < inner.min_watch_rv || !WATCHED.contains(&resource.as_str()) {
        let gone = status(410, "Expired", "too old resource version");
        let line = format!("{}\n", json!({"type": "ERROR", "object": gone}));
        let _ = tx.try_send(Ok(Bytes::from(line)));
    } else {
        let mut live = fake.changes.subscribe();
        let mut close = fake.close.subscribe();
        close.mark_unchanged();
        let backlog: Vec<Change> = inner
            .log
            .iter()
            .filter(|c| c.rv > from && c.resource == resource)
            .cloned()
            .collect();
        let mut last = from.max(backlog.last().map_or(0, |c| c.rv));
        let bookmark = json!({"type": "BOOKMARK", "object": {
            "apiVersion": api_version, "kind": kind,
            "metadata": {"resourceVersion": from.to_string()}}});
        let resource = resource.clone();
        tokio::spawn(async move {
            if tx
                .send(Ok(Bytes::from(format!("{bookmark}\n"))))
                .await
                .is_err()
            {
                return;
            }
            for c in &backlog {
                if let Some(line) = c.line(&selector) {
                    if tx.send(Ok(Bytes::from(line))).await.is_err() {
                        return;
                    }
                }
            }
            loop {
                tokio::select! {
                    biased;
                    _ = close.changed() => return,
                    () = tx.closed() => return,
                    c = live.recv() => match c {
                        // A change made after the close was asked for is not
                        // delivered on this stream.
                        _ if close.has_changed().unwrap_or(true) => return,
                        Ok(c) if c.rv > last && c.resource == resource => {
                            last = c.rv;
                            if let Some(line) = c.line(&selector) {
                                if tx.send(Ok(Bytes::from(line))).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    },
                }
            }
        });
    }
    drop(inner);
    let stream = ReceiverStream::new(rx);
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn apply(
    fake: &Arc<Fake>,
    resource: String,
    ns: String,
    name: String,
    query: BTreeMap<String, String>,
    content_type: String,
    body: &[u8],
) -> Response {
    let patch: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return reply(400, &status(400, "BadRequest", &e.to_string())),
    };
    let mut inner = fake.lock();
    inner.writes.push(Write {
        method: "PATCH".into(),
        resource: resource.clone(),
        namespace: ns.clone(),
        name: name.clone(),
        query: query.clone(),
        content_type: content_type.clone(),
        body: Some(patch.clone()),
    });
    if content_type != "application/apply-patch+yaml" {
        return reply(
            415,
            &status(415, "UnsupportedMediaType", "only server-side apply"),
        );
    }
    if !query.contains_key("fieldManager") {
        return reply(
            422,
            &status(422, "Invalid", "fieldManager is required for apply"),
        );
    }
    let key = (resource.clone(), ns.clone(), name.clone());
    let existing = inner.objects.get(&key).cloned();
    let force = query.get("force").map(String::as_str) == Some("true");
    let ours =
        |o: &Value| o["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "envlane-sync";
    // Another manager's object: apply without force conflicts.
    if let Some(old) = &existing {
        if !ours(old) && !force {
            return reply(
                409,
                &status(409, "Conflict", "Apply failed with 1 conflict"),
            );
        }
    }
    // One manager: its applied configuration is the object's content.
    let mut obj = patch;
    if let Some(old) = &existing {
        obj["metadata"]["uid"] = old["metadata"]["uid"].clone();
    }
    obj["metadata"]["managedFields"] =
        json!([{"manager": query["fieldManager"], "operation": "Apply"}]);
    let stored = fake.store(&mut inner, key, obj);
    reply(200, &stored)
}
