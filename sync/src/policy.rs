//! The ValidatingAdmissionPolicy that fences envlane-sync's own writes.
//!
//! RBAC cannot say "only objects labelled as envlane's, only under envlane's
//! names, only in opted-in namespaces": its verbs hold for every object of a
//! resource. The API server enforces the rest with this policy, made here
//! from the same names render uses, so the two cannot drift.

use serde_json::{json, Value};

use crate::model::{MANAGED_BY_KEY, MANAGED_BY_VALUE};
use crate::render::{Kind, RenderOptions, DESTINATION_RULE_PREFIX, SUBSET_LABEL};
use crate::routes::ENVOY_FILTER_NAME;
use crate::shared::{GATEWAY_NAMESPACE_LABEL, GATEWAY_PLUGIN_NAME, WAYPOINT_PLUGIN_NAME};

pub const POLICY_NAME: &str = "envlane-sync-writes";

/// The policy and its binding, for envlane-sync running as `user`
/// (`system:serviceaccount:<namespace>:<name>`).
pub fn admission_policy(opts: &RenderOptions, user: &str) -> Vec<Value> {
    let owned = |o: &str| {
        format!(
            "(has({o}.metadata.labels) && '{MANAGED_BY_KEY}' in {o}.metadata.labels && \
             {o}.metadata.labels['{MANAGED_BY_KEY}'] == '{MANAGED_BY_VALUE}')"
        )
    };
    let opted_in = opts.namespace_selector.to_cel(
        "has(namespaceObject.metadata.labels)",
        "namespaceObject.metadata.labels",
    );
    // A centralized gateway lives in its own namespace, which must not opt
    // in (its sidecar-mode plugin would apply to the gateway too): the
    // operator marks it with its own label instead.
    let gateway_ns = format!(
        "(has(namespaceObject.metadata.labels) && '{GATEWAY_NAMESPACE_LABEL}' in namespaceObject.metadata.labels && \
         namespaceObject.metadata.labels['{GATEWAY_NAMESPACE_LABEL}'] == 'true')"
    );
    let root = &opts.istio_root_namespace;
    let plugin = &opts.wasm_plugin_name;
    let rule = |kind: Kind| {
        json!({
            "apiGroups": [kind.group()],
            "apiVersions": ["*"],
            "resources": [kind.plural()],
            "operations": ["CREATE", "UPDATE", "DELETE"],
        })
    };
    let name_rule = format!(
        "request.resource.resource == 'wasmplugins' ? variables.target.metadata.name in ['{plugin}', '{GATEWAY_PLUGIN_NAME}', '{WAYPOINT_PLUGIN_NAME}'] : \
         request.resource.resource == 'destinationrules' ? variables.target.metadata.name.startsWith('{DESTINATION_RULE_PREFIX}') : \
         request.resource.resource == 'envoyfilters' ? (request.namespace == '{root}' && variables.target.metadata.name.startsWith('{ENVOY_FILTER_NAME}.')) : \
         request.resource.resource == 'services' ? (has(variables.target.metadata.labels) && '{SUBSET_LABEL}' in variables.target.metadata.labels) : \
         false"
    );
    let policy = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": POLICY_NAME},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    rule(Kind::WasmPlugin),
                    rule(Kind::DestinationRule),
                    rule(Kind::EnvoyFilter),
                    rule(Kind::Service),
                ],
            },
            "matchConditions": [
                {"name": "only-envlane-sync", "expression": format!("request.userInfo.username == '{user}'")},
            ],
            "variables": [
                {"name": "target", "expression": "request.operation == 'DELETE' ? oldObject : object"},
            ],
            "validations": [
                {
                    "expression": owned("variables.target"),
                    "message": format!("envlane-sync writes and deletes only objects labelled {MANAGED_BY_KEY}={MANAGED_BY_VALUE}"),
                    "reason": "Forbidden",
                },
                {
                    "expression": format!("request.operation != 'UPDATE' || {}", owned("oldObject")),
                    "message": "envlane-sync never takes over an object it did not create",
                    "reason": "Forbidden",
                },
                {
                    "expression": name_rule,
                    "message": format!("envlane-sync writes only WasmPlugins {plugin}, {GATEWAY_PLUGIN_NAME} and {WAYPOINT_PLUGIN_NAME}, DestinationRules {DESTINATION_RULE_PREFIX}*, EnvoyFilters {ENVOY_FILTER_NAME}.* in {root} and per-env Services labelled {SUBSET_LABEL}"),
                    "reason": "Forbidden",
                },
                {
                    // Deletes are allowed anywhere (cleanup after an opt-out).
                    "expression": format!(
                        "request.operation == 'DELETE' || request.resource.resource == 'envoyfilters' || \
                         (request.resource.resource == 'wasmplugins' && variables.target.metadata.name == '{GATEWAY_PLUGIN_NAME}' ? {gateway_ns} : ({opted_in}))"
                    ),
                    "message": format!("envlane-sync creates and updates objects only in namespaces selected by {}, and the gateway's WasmPlugin {GATEWAY_PLUGIN_NAME} only in namespaces labelled {GATEWAY_NAMESPACE_LABEL}=true", opts.namespace_selector),
                    "reason": "Forbidden",
                },
            ],
        },
    });
    let binding = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": POLICY_NAME},
        "spec": {
            "policyName": POLICY_NAME,
            "validationActions": ["Deny"],
        },
    });
    vec![policy, binding]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_render_options() {
        let opts = RenderOptions {
            wasm_plugin_name: "lanes".into(),
            istio_root_namespace: "mesh-root".into(),
            namespace_selector: crate::selector::LabelSelector::parse("team=a,!frozen")
                .unwrap_or_default(),
            ..RenderOptions::default()
        };
        let docs = admission_policy(&opts, "system:serviceaccount:x:y");
        let text = serde_json::to_string(&docs).unwrap_or_default();
        for part in [
            "in ['lanes', 'envlane-gateway', 'envlane-waypoint']",
            "'envlane.io/gateway' in namespaceObject.metadata.labels",
            "request.namespace == 'mesh-root'",
            "'team' in namespaceObject.metadata.labels",
            "!(has(namespaceObject.metadata.labels) && 'frozen' in",
            "request.userInfo.username == 'system:serviceaccount:x:y'",
            "startsWith('envlane-routes.')",
        ] {
            assert!(text.contains(part), "{part} missing in {text}");
        }
    }
}
