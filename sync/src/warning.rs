//! What envlane-sync left out or could not do, and the object an operator
//! looks at to find out: each becomes a log line, a metric and a Kubernetes
//! Event on that object.

use crate::render::ObjectKey;

/// Why, as the Event's `reason` (CamelCase, stable: alerts may match it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// A headless Service: Istio routes it by original destination.
    HeadlessService,
    /// A Service left out because an object it needs cannot be written.
    ServiceBlocked,
    /// Envs of one Service map to one subset name.
    SubsetCollision,
    /// Host mode: a per-env Service name is another pair's or a user's.
    HostNameClash,
    /// A VirtualService rule to the Service has no name.
    UnnamedRoute,
    /// An object envlane-sync would write exceeds the size limit.
    ObjectTooLarge,
    /// The name envlane-sync would write is held by an object it does not own.
    ForeignObject,
    /// The API server refused a write.
    WriteFailed,
    /// A pod's env label is not a valid env.
    InvalidEnvLabel,
    /// A Service with env pods but none of the default env (or no default
    /// env set): requests without an env spread over every env's pods.
    NoDefaultEnv,
    /// Pods of different envs hold one address: no caller table names it.
    CallerAddressShared,
    /// A VirtualService covers a Service: waypoints get no envlane route.
    WaypointRoutesNotPatched,
    /// More caller addresses than `--max-callers`: no caller table.
    CallerTableTooLarge,
    /// Endpoint mode: a Service's targetPort does not resolve for some or
    /// all of its pods.
    TargetPortUnresolved,
    /// Not a warning: a namespace's table was written (a Normal Event).
    TableWritten,
}

impl Reason {
    /// The Event's `type`: `Normal` for what went as intended.
    pub fn event_type(self) -> &'static str {
        match self {
            Reason::TableWritten => "Normal",
            _ => "Warning",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::HeadlessService => "HeadlessService",
            Reason::ServiceBlocked => "ServiceBlocked",
            Reason::SubsetCollision => "SubsetCollision",
            Reason::HostNameClash => "HostNameClash",
            Reason::UnnamedRoute => "UnnamedRoute",
            Reason::ObjectTooLarge => "ObjectTooLarge",
            Reason::ForeignObject => "ForeignObject",
            Reason::WriteFailed => "WriteFailed",
            Reason::InvalidEnvLabel => "InvalidEnvLabel",
            Reason::NoDefaultEnv => "NoDefaultEnv",
            Reason::CallerAddressShared => "CallerAddressShared",
            Reason::WaypointRoutesNotPatched => "WaypointRoutesNotPatched",
            Reason::CallerTableTooLarge => "CallerTableTooLarge",
            Reason::TargetPortUnresolved => "TargetPortUnresolved",
            Reason::TableWritten => "TableWritten",
        }
    }
}

/// The object an Event is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Regarding {
    pub api_version: String,
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
}

impl Regarding {
    pub fn service(namespace: &str, name: &str) -> Self {
        Self::core("Service", namespace, name)
    }

    pub fn pod(namespace: &str, name: &str) -> Self {
        Self::core("Pod", namespace, name)
    }

    /// A namespace: its Events live in it.
    pub fn namespace(name: &str) -> Self {
        Self::core("Namespace", name, name)
    }

    pub fn virtual_service(namespace: &str, name: &str) -> Self {
        Self {
            api_version: "networking.istio.io/v1".into(),
            kind: "VirtualService",
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// An object envlane-sync writes (or would).
    pub fn object(key: &ObjectKey) -> Self {
        Self {
            api_version: key.kind.api_version(),
            kind: key.kind.kind(),
            namespace: key.namespace.clone(),
            name: key.name.clone(),
        }
    }

    fn core(kind: &'static str, namespace: &str, name: &str) -> Self {
        Self {
            api_version: "v1".into(),
            kind,
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Warning {
    pub regarding: Regarding,
    pub reason: Reason,
    /// One line naming every side involved.
    pub message: String,
}

impl Warning {
    pub fn new(regarding: Regarding, reason: Reason, message: String) -> Self {
        Self {
            regarding,
            reason,
            message,
        }
    }
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}
