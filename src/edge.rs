//! Edge hygiene: at an ingress gateway (`edge: true`) the filter removes from
//! each request entering the mesh what only the mesh may set: the env header,
//! the env's baggage member, alias headers and cookies, and the debug header. Pure; the glue applies the [`EdgePlan`].

use crate::decide::Headers;
use crate::table::{AliasSource, RoutingTable};

/// A header that holds a list (`baggage`, `cookie`) and loses some members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rewrite {
    /// Nothing to remove.
    Keep,
    /// Every member went: remove the header.
    Remove,
    /// The members left, as one header value.
    Set(String),
}

/// What to strip from one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgePlan<'t> {
    /// Headers present on the request that must go.
    pub remove: Vec<&'t str>,
    pub baggage: Rewrite,
    pub cookie: Rewrite,
}

impl EdgePlan<'_> {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.baggage == Rewrite::Keep && self.cookie == Rewrite::Keep
    }
}

pub fn edge_plan<'t>(table: &'t RoutingTable, headers: &impl Headers) -> EdgePlan<'t> {
    let s = &table.settings;
    let mut remove: Vec<&'t str> = Vec::new();
    let mut names: Vec<&'t str> = vec![&s.env_header, &s.debug_header];
    let mut cookies: Vec<&'t str> = Vec::new();
    for alias in s.aliases.iter() {
        match alias {
            AliasSource::Header(h) => names.push(h),
            AliasSource::Cookie(c) => cookies.push(c),
        }
    }
    for name in names {
        if headers.values(name).next().is_some() && !remove.contains(&name) {
            remove.push(name);
        }
    }
    let baggage = match &s.baggage_key {
        Some(key) => without_members(headers, "baggage", ",", ", ", |member| {
            member
                .split(';')
                .next()
                .and_then(|kv| kv.split_once('='))
                .map(|(k, _)| k.trim_matches([' ', '\t']))
                == Some(key.as_ref())
        }),
        None => Rewrite::Keep,
    };
    let cookie = if cookies.is_empty() {
        Rewrite::Keep
    } else {
        without_members(headers, "cookie", ";", "; ", |pair| {
            pair.split_once('=')
                .is_some_and(|(k, _)| cookies.contains(&k.trim_matches([' ', '\t'])))
        })
    };
    EdgePlan {
        remove,
        baggage,
        cookie,
    }
}

/// The values of list header `name` without the members `drop` selects.
/// A value that is not text is dropped whole: no env can hide in it.
fn without_members(
    headers: &impl Headers,
    name: &str,
    separator: &str,
    joiner: &str,
    drop: impl Fn(&str) -> bool,
) -> Rewrite {
    let mut kept: Vec<&str> = Vec::new();
    let mut dropped = false;
    for value in headers.values(name) {
        let Ok(text) = std::str::from_utf8(value) else {
            dropped = true;
            continue;
        };
        for member in text.split(separator) {
            let member = member.trim_matches([' ', '\t']);
            if member.is_empty() {
                continue;
            }
            if drop(member) {
                dropped = true;
            } else {
                kept.push(member);
            }
        }
    }
    match (dropped, kept.is_empty()) {
        (false, _) => Rewrite::Keep,
        (true, true) => Rewrite::Remove,
        (true, false) => Rewrite::Set(kept.join(joiner)),
    }
}
