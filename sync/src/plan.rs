//! The write plan: what was rendered and what the cluster holds in, the
//! writes out, in the order they must happen. A pure function; the loop in
//! [`crate::controller`] only executes it.

use std::collections::{HashMap, HashSet};

use crate::render::{DesiredObject, Kind, ObjectKey};

/// The largest object envlane-sync sends. etcd refuses requests over 1.5 MiB
/// (`--max-request-bytes` default) and the stored object also carries its
/// managed fields, so an object is refused here, whole, well before that:
/// never half-written, never failing in a loop.
pub const DEFAULT_MAX_OBJECT_BYTES: usize = 1024 * 1024;

/// What the cluster holds, as far as the plan needs it.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    /// Objects labelled as envlane-sync's, with their content hash.
    pub owned: &'a HashMap<ObjectKey, Option<String>>,
    /// Names held by someone else: never written.
    pub foreign: &'a HashSet<ObjectKey>,
    /// Namespaces whose writes failed and are backing off: nothing of theirs
    /// ([`ObjectKey::tenant`]) is written (or deleted) in this pass.
    pub paused: &'a HashSet<String>,
    /// Services left out of the table because one of their objects cannot
    /// be written: their other objects are kept as they are, not deleted
    /// (a failure must not turn into deletions, nor into churn on retry).
    pub held: &'a HashSet<(String, String)>,
}

/// One write.
#[derive(Debug, PartialEq)]
pub enum Write<'a> {
    /// Listed as envlane-sync's: apply, taking over changed fields.
    Update(&'a DesiredObject),
    /// Not listed as envlane-sync's: check that the name is free (or ours)
    /// first, then apply without force.
    Create(&'a DesiredObject),
    /// Owned and no longer wanted.
    Delete(ObjectKey),
}

impl Write<'_> {
    pub fn key(&self) -> &ObjectKey {
        match self {
            Write::Update(o) | Write::Create(o) => &o.key,
            Write::Delete(k) => k,
        }
    }
}

#[derive(Debug, Default, PartialEq)]
pub struct Plan<'a> {
    /// Objects that define subsets (DestinationRules, per-env Services,
    /// route EnvoyFilters) first, then the tables (WasmPlugins) that name
    /// them, then deletions: a table never names a subset not yet written,
    /// and nothing is removed before the tables stop naming it.
    pub writes: Vec<Write<'a>>,
    /// Wanted but over the size limit: not written; an old copy is kept.
    pub too_large: Vec<&'a DesiredObject>,
    /// Wanted and already as wanted.
    pub unchanged: usize,
    /// Would be written (or deleted), but their namespace is backing off:
    /// left for a later pass.
    pub deferred: Vec<ObjectKey>,
}

/// Plans the writes that make the cluster hold `desired` (sorted by key).
pub fn plan<'d>(
    desired: &'d [DesiredObject],
    observed: Observed<'_>,
    max_object_bytes: usize,
) -> Plan<'d> {
    let Observed {
        owned,
        foreign,
        paused,
        held,
    } = observed;
    let is_held = |key: &ObjectKey| {
        key.service()
            .is_some_and(|(ns, svc)| held.contains(&(ns.to_string(), svc.to_string())))
    };

    let mut out = Plan::default();
    let mut tables = Vec::new();
    for obj in desired {
        if foreign.contains(&obj.key) {
            continue;
        }
        let write = match owned.get(&obj.key) {
            Some(Some(hash)) if *hash == obj.hash => {
                out.unchanged += 1;
                continue;
            }
            Some(_) => Write::Update(obj),
            None => Write::Create(obj),
        };
        if paused.contains(obj.key.tenant()) {
            out.deferred.push(obj.key.clone());
            continue;
        }
        if obj.size_bytes() > max_object_bytes {
            out.too_large.push(obj);
            continue;
        }
        if obj.key.kind == Kind::WasmPlugin {
            tables.push(write);
        } else {
            out.writes.push(write);
        }
    }
    out.writes.append(&mut tables);

    let wanted: HashSet<&ObjectKey> = desired.iter().map(|o| &o.key).collect();
    let mut stale: Vec<&ObjectKey> = owned
        .keys()
        .filter(|k| !wanted.contains(k) && !is_held(k))
        .collect();
    stale.sort();
    for key in stale {
        if paused.contains(key.tenant()) {
            out.deferred.push(key.clone());
        } else {
            out.writes.push(Write::Delete(key.clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kind: Kind, ns: &str, name: &str) -> ObjectKey {
        ObjectKey {
            namespace: ns.into(),
            kind,
            name: name.into(),
        }
    }

    fn obj(kind: Kind, ns: &str, name: &str, hash: &str, bytes: usize) -> DesiredObject {
        DesiredObject::for_tests(key(kind, ns, name), hash, bytes)
    }

    /// The writes as short strings: `update DestinationRule/a/x`.
    fn show(plan: &Plan<'_>) -> Vec<String> {
        plan.writes
            .iter()
            .map(|w| {
                let verb = match w {
                    Write::Update(_) => "update",
                    Write::Create(_) => "create",
                    Write::Delete(_) => "delete",
                };
                format!("{verb} {}", w.key())
            })
            .collect()
    }

    struct Case {
        name: &'static str,
        desired: Vec<DesiredObject>,
        owned: Vec<(ObjectKey, Option<&'static str>)>,
        foreign: Vec<ObjectKey>,
        paused: Vec<&'static str>,
        held: Vec<(&'static str, &'static str)>,
        writes: Vec<&'static str>,
        too_large: Vec<&'static str>,
        deferred: Vec<&'static str>,
        unchanged: usize,
    }

    fn case(name: &'static str) -> Case {
        Case {
            name,
            desired: vec![],
            owned: vec![],
            foreign: vec![],
            paused: vec![],
            held: vec![],
            writes: vec![],
            too_large: vec![],
            deferred: vec![],
            unchanged: 0,
        }
    }

    const LIMIT: usize = 1000;

    #[test]
    fn plans() {
        use Kind::{DestinationRule as Dr, EnvoyFilter as Ef, WasmPlugin as Wp};
        let cases = vec![
            Case {
                desired: vec![
                    obj(Dr, "a", "envlane-x", "h1", 10),
                    obj(Wp, "a", "envlane", "t1", 10),
                ],
                writes: vec![
                    "create DestinationRule/a/envlane-x",
                    "create WasmPlugin/a/envlane",
                ],
                ..case("nothing observed: create, subsets before tables")
            },
            Case {
                desired: vec![
                    obj(Wp, "a", "envlane", "t2", 10),
                    obj(Dr, "b", "envlane-x", "h1", 10),
                    obj(Ef, "istio-system", "envlane-routes.b.x", "e1", 10),
                ],
                owned: vec![
                    (key(Wp, "a", "envlane"), Some("t1")),
                    (key(Dr, "b", "envlane-x"), Some("h1")),
                    (key(Ef, "istio-system", "envlane-routes.b.x"), None),
                ],
                writes: vec![
                    "update EnvoyFilter/istio-system/envlane-routes.b.x",
                    "update WasmPlugin/a/envlane",
                ],
                unchanged: 1,
                ..case("owned: unchanged hash skipped, changed or unknown hash updated")
            },
            Case {
                desired: vec![obj(Wp, "a", "envlane", "t1", 10)],
                owned: vec![
                    (key(Wp, "a", "envlane"), Some("t1")),
                    (key(Dr, "a", "envlane-old"), Some("h")),
                    (key(Wp, "gone", "envlane"), Some("t0")),
                ],
                writes: vec![
                    "delete DestinationRule/a/envlane-old",
                    "delete WasmPlugin/gone/envlane",
                ],
                unchanged: 1,
                ..case("owned and not wanted: deleted, last and sorted")
            },
            Case {
                desired: vec![
                    obj(Dr, "a", "envlane-x", "h1", 10),
                    obj(Dr, "a", "envlane-y", "h1", 10),
                ],
                foreign: vec![key(Dr, "a", "envlane-x")],
                writes: vec!["create DestinationRule/a/envlane-y"],
                ..case("a name someone else holds is never written")
            },
            Case {
                desired: vec![
                    obj(Dr, "a", "envlane-x", "h1", LIMIT + 1),
                    obj(Wp, "a", "envlane", "t1", LIMIT),
                    obj(Wp, "b", "envlane", "t1", LIMIT + 1),
                ],
                owned: vec![(key(Wp, "b", "envlane"), Some("t0"))],
                writes: vec!["create WasmPlugin/a/envlane"],
                too_large: vec!["DestinationRule/a/envlane-x", "WasmPlugin/b/envlane"],
                ..case("over the limit: not written, and an old copy is not deleted")
            },
            Case {
                desired: vec![obj(Wp, "a", "envlane", "t1", 2 * LIMIT)],
                owned: vec![(key(Wp, "a", "envlane"), Some("t1"))],
                unchanged: 1,
                ..case("an unchanged object is not reported as too large again")
            },
            Case {
                desired: vec![
                    obj(Dr, "a", "envlane-x", "h1", 10),
                    obj(Wp, "a", "envlane", "t1", 10),
                    obj(Wp, "b", "envlane", "t1", 10),
                ],
                owned: vec![
                    (key(Dr, "a", "envlane-old"), Some("h")),
                    (key(Dr, "b", "envlane-old"), Some("h")),
                ],
                paused: vec!["a"],
                writes: vec![
                    "create WasmPlugin/b/envlane",
                    "delete DestinationRule/b/envlane-old",
                ],
                deferred: vec![
                    "DestinationRule/a/envlane-x",
                    "WasmPlugin/a/envlane",
                    "DestinationRule/a/envlane-old",
                ],
                ..case("a namespace backing off is left alone; the others proceed")
            },
            Case {
                desired: vec![obj(Wp, "b", "envlane", "t1", 10)],
                owned: vec![
                    (key(Ef, "istio-system", "envlane-routes.a.x"), Some("e")),
                    (key(Ef, "istio-system", "envlane-routes.b.x"), Some("e")),
                ],
                paused: vec!["a"],
                writes: vec![
                    "create WasmPlugin/b/envlane",
                    "delete EnvoyFilter/istio-system/envlane-routes.b.x",
                ],
                deferred: vec!["EnvoyFilter/istio-system/envlane-routes.a.x"],
                ..case("a route EnvoyFilter belongs to its Service's namespace, not the root's")
            },
            Case {
                desired: vec![obj(Wp, "a", "envlane", "t1", 10)],
                owned: vec![
                    (key(Dr, "a", "envlane-x"), Some("h")),
                    (key(Ef, "istio-system", "envlane-routes.a.x"), Some("e")),
                    (key(Dr, "a", "envlane-y"), Some("h")),
                ],
                held: vec![("a", "x")],
                writes: vec![
                    "create WasmPlugin/a/envlane",
                    "delete DestinationRule/a/envlane-y",
                ],
                ..case("a Service held out of the table keeps its objects")
            },
        ];
        for c in cases {
            let owned: HashMap<ObjectKey, Option<String>> = c
                .owned
                .into_iter()
                .map(|(k, h)| (k, h.map(String::from)))
                .collect();
            let foreign: HashSet<ObjectKey> = c.foreign.into_iter().collect();
            let paused: HashSet<String> = c.paused.into_iter().map(String::from).collect();
            let held: HashSet<(String, String)> = c
                .held
                .into_iter()
                .map(|(n, s)| (n.to_string(), s.to_string()))
                .collect();
            let observed = Observed {
                owned: &owned,
                foreign: &foreign,
                paused: &paused,
                held: &held,
            };
            let p = plan(&c.desired, observed, LIMIT);
            assert_eq!(show(&p), c.writes, "{}: writes", c.name);
            let too_large: Vec<String> = p.too_large.iter().map(|o| o.key.to_string()).collect();
            assert_eq!(too_large, c.too_large, "{}: too large", c.name);
            let deferred: Vec<String> = p.deferred.iter().map(|k| k.to_string()).collect();
            assert_eq!(deferred, c.deferred, "{}: deferred", c.name);
            assert_eq!(p.unchanged, c.unchanged, "{}: unchanged", c.name);
        }
    }
}
