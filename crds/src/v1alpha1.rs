//! `ConnectionPool`, group `tidepool.dev`, version `v1alpha1`.
//!
//! Every field carries a doc comment: it becomes the OpenAPI description that
//! `kubectl explain connectionpool.spec.<field>` prints. Validation lives in
//! the schema (types, ranges, enums) and in CEL rules whose messages name the
//! field and the rule, so `kubectl apply` of a bad pool says what to change.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A Go-style duration as Kubernetes CEL's `duration()` accepts it: one or
/// more `<number><unit>` groups, units `h`, `m`, `s`, `ms`, `us`, `ns`.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$";

/// `host:port` with an IPv6 host in brackets; the port range is checked apart.
pub const ADDRESS_PATTERN: &str =
    r"^(\[[0-9a-fA-F:.]+\]|[a-zA-Z0-9]([a-zA-Z0-9.-]*[a-zA-Z0-9])?):[0-9]{1,5}$";

/// The most addresses a static target may list.
pub const MAX_STATIC_ADDRESSES: usize = 256;

/// A namespace name: a DNS-1123 label (lower-case letters, digits and `-`,
/// starting and ending with a letter or digit, at most 63 characters).
pub const NAMESPACE_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// The most namespaces `spec.clients.namespaces` may list.
pub const MAX_CLIENT_NAMESPACES: usize = 64;

/// How a pool of gRPC connections to one target is kept.
///
/// Field meanings follow go-micro's gRPC client pool (PoolSize, PoolTTL,
/// PoolMaxIdle, PoolMaxStreams), applied per backend address by the tidepool
/// agent on every node.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "tidepool.dev",
    version = "v1alpha1",
    kind = "ConnectionPool",
    plural = "connectionpools",
    singular = "connectionpool",
    shortname = "cpool",
    category = "tidepool",
    namespaced,
    doc = "A ConnectionPool declares a gRPC target and how connections to it are pooled by the tidepool agent on every node.",
    status = "ConnectionPoolStatus",
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".status.target","description":"The target as the operator resolved it"}"#,
    printcolumn = r#"{"name":"Size","type":"integer","jsonPath":".spec.size","description":"Connections kept per address"}"#,
    printcolumn = r#"{"name":"Streams","type":"integer","jsonPath":".status.totals.streams","description":"Streams in use, summed over addresses and nodes"}"#,
    printcolumn = r#"{"name":"Connections","type":"integer","jsonPath":".status.totals.connections","description":"Open connections, summed over addresses and nodes"}"#,
    printcolumn = r#"{"name":"Synced","type":"integer","jsonPath":".status.agents.synced","description":"Agents running the current generation"}"#,
    printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".status.agents.desired","description":"Agents that should run this pool"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status","description":"Every desired agent runs the current generation and the pool has addresses"}"#,
    printcolumn = r#"{"name":"Local","type":"string","jsonPath":".status.conditions[?(@.type==\"LocalService\")].status","description":"The node-local Service reaches a ready agent on every node (empty: the pool has none)"}"#,
    printcolumn = r#"{"name":"Advice","type":"string","jsonPath":".status.recommendation.summary","description":"ok when the settings running match the tuning advice; else the settings that differ, or how much is still to observe"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.maxIdle) || self.maxIdle <= self.size")
    .message("spec.maxIdle must be less than or equal to spec.size")
    .field_path(".maxIdle")
    .reason(Reason::FieldValueInvalid))]
#[x_kube(validation = Rule::new("!has(self.nodeLocalService) || has(self.listenPort)")
    .message("spec.nodeLocalService needs spec.listenPort: the port each agent serves this pool on, which the Service targets (such as 16001)")
    .field_path(".nodeLocalService")
    .reason(Reason::FieldValueRequired))]
#[x_kube(validation = Rule::new("!has(self.nodeLocalService) || !has(self.target.service) || self.nodeLocalService.name != self.target.service.name")
    .message("spec.nodeLocalService.name must differ from spec.target.service.name: the pooled Service cannot be its own backend")
    .field_path(".nodeLocalService.name")
    .reason(Reason::FieldValueInvalid))]
pub struct ConnectionPoolSpec {
    /// The gRPC backend: a Service in this namespace, or a static list of
    /// addresses. Exactly one of `service` and `addresses` must be set.
    pub target: Target,

    /// Connections kept per backend address (go-micro PoolSize). Streams that
    /// find every kept connection at maxStreams follow `whenFull`. At least 1.
    #[serde(default = "default_size")]
    #[schemars(range(min = 1, max = 100000))]
    pub size: i32,

    /// How long a connection lives before it is retired, as a duration such
    /// as `60s` or `5m` (go-micro PoolTTL). A retired connection takes no new
    /// streams and closes when its last stream ends; each connection's
    /// lifetime is jittered by ±10% so they do not all reconnect at once.
    /// At least 1s.
    #[serde(default = "default_ttl")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new(r"self.matches('^([0-9]+(\\.[0-9]+)?(ns|us|ms|s|m|h))+$') && duration(self) >= duration('1s')")
        .message("spec.ttl must be a duration of at least 1s, such as 30s, 1m or 1h30m")
        .reason(Reason::FieldValueInvalid))]
    pub ttl: String,

    /// Idle connections (no streams) kept per address (go-micro PoolMaxIdle);
    /// an idle connection beyond this is closed. Between 0 and `size`. When
    /// unset: 50, or `size` if that is smaller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_idle: Option<i32>,

    /// Concurrent streams (in-flight RPCs) per connection (go-micro
    /// PoolMaxStreams). The agent uses the smaller of this and the server's
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS. At least 1.
    #[serde(default = "default_max_streams")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_streams: i32,

    /// What a stream does when every kept connection to its address is at
    /// maxStreams and the pool already holds `size` connections: `Overflow`
    /// dials an extra connection outside the pool, used once and closed, as
    /// go-micro does; `Wait` queues the stream (first in, first out) for up
    /// to `acquireTimeout`, then fails it with RESOURCE_EXHAUSTED.
    #[serde(default)]
    pub when_full: WhenFull,

    /// With `whenFull: Wait`, how long a stream may wait for a free slot, as
    /// a duration such as `500ms` or `2s`.
    #[serde(default = "default_acquire_timeout")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new(r"self.matches('^([0-9]+(\\.[0-9]+)?(ns|us|ms|s|m|h))+$')")
        .message("spec.acquireTimeout must be a duration such as 500ms, 1s or 2m")
        .reason(Reason::FieldValueInvalid))]
    pub acquire_timeout: String,

    /// A dedicated port on which every agent accepts this pool's traffic,
    /// for clients that cannot set the HTTP/2 authority. Without it, clients
    /// reach the pool on the agent's shared port (15000) by authority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub listen_port: Option<i32>,

    /// A Service the operator creates in the pool's namespace so that
    /// applications reach the pool by name, with no authority override, no
    /// node IP and no hostPort: `<name>.<namespace>:<port>`. It has no
    /// selector and `internalTrafficPolicy: Local`, and its EndpointSlices
    /// list every agent pod at `listenPort`, so kube-proxy sends each
    /// connection to the agent on the caller's own node. Needs `listenPort`.
    /// A Service of that name the operator does not own is never touched:
    /// the pool's `LocalService` condition names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_local_service: Option<NodeLocalService>,

    /// Who may use the pool. Unset: pods of every namespace, as a Service
    /// allows. Set: only pods of the namespaces listed, told apart by the
    /// source IP of their connection to the agent (the pod IPs of the
    /// agent's own node); any other client gets PERMISSION_DENIED and no
    /// backend is dialed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients: Option<Clients>,

    /// Tuning advice from observed occupancy. The operator always writes a
    /// recommendation for `size`, `maxIdle`, `maxStreams` and `whenFull` in
    /// `status.recommendation`; with `mode: Apply` it also runs it, within
    /// the bounds set here. Unset: `mode: Recommend`, no bounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tuning: Option<Tuning>,
}

/// Whether the operator applies its tuning advice, and within what bounds.
// The bound rules' messages are static: a messageExpression naming the
// values (`string(self.size.min)`) is refused by the API server, its
// estimated cost over budget.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.size) || !has(self.size.min) || !has(self.size.max) || self.size.min <= self.size.max")
    .message("spec.tuning.size.min must be less than or equal to spec.tuning.size.max")
    .field_path(".size.min")
    .reason(Reason::FieldValueInvalid))]
#[x_kube(validation = Rule::new("!has(self.maxIdle) || !has(self.maxIdle.min) || !has(self.maxIdle.max) || self.maxIdle.min <= self.maxIdle.max")
    .message("spec.tuning.maxIdle.min must be less than or equal to spec.tuning.maxIdle.max")
    .field_path(".maxIdle.min")
    .reason(Reason::FieldValueInvalid))]
#[x_kube(validation = Rule::new("!has(self.maxStreams) || !has(self.maxStreams.min) || !has(self.maxStreams.max) || self.maxStreams.min <= self.maxStreams.max")
    .message("spec.tuning.maxStreams.min must be less than or equal to spec.tuning.maxStreams.max")
    .field_path(".maxStreams.min")
    .reason(Reason::FieldValueInvalid))]
pub struct Tuning {
    /// `Recommend` (the default) only writes the advice to
    /// `status.recommendation`. `Apply` also runs it: the operator sends
    /// agents the recommended settings in place of the spec's (which stay
    /// as written, the starting point), at most once per tuning interval
    /// (the operator's `--tuning-interval`, 10m by default), live, and
    /// records each change in `status.tuned` and as an Event.
    #[serde(default)]
    pub mode: TuningMode,

    /// Bounds for the advised `size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Bounds>,

    /// Bounds for the advised `maxIdle`; it never exceeds the advised size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_idle: Option<Bounds>,

    /// Bounds for the advised `maxStreams`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_streams: Option<Bounds>,
}

/// Whether tuning advice is applied.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum TuningMode {
    /// Write the advice in `status.recommendation` only.
    #[default]
    Recommend,
    /// Write it and run it, within the bounds.
    Apply,
}

/// The range a tuned setting is kept in, both ends included.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Bounds {
    /// The smallest value advised; unset: no lower bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000000))]
    pub min: Option<i32>,
    /// The largest value advised; unset: no upper bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000000))]
    pub max: Option<i32>,
}

impl Bounds {
    /// `value` kept within the bounds (`min` wins if they cross, which
    /// admission refuses).
    pub fn clamp(bounds: Option<&Self>, value: i32) -> i32 {
        let Some(b) = bounds else {
            return value;
        };
        let value = b.max.map_or(value, |max| value.min(max));
        b.min.map_or(value, |min| value.max(min))
    }
}

/// The node-local Service of a pool.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeLocalService {
    /// The Service's name in the pool's namespace: a DNS-1035 label
    /// (lower-case letters, digits and '-', starting with a letter, at most
    /// 63 characters), such as `payments-pooled`.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')")
        .message("spec.nodeLocalService.name must be a Service name (a DNS-1035 label: lower-case letters, digits and '-', starting with a letter and ending with a letter or digit, at most 63 characters), such as payments-pooled")
        .reason(Reason::FieldValueInvalid))]
    pub name: String,

    /// The port applications dial on the Service, from 1 to 65535. Unset:
    /// the pool's `listenPort`. Pools may share a Service port (each has its
    /// own Service); they may not share a `listenPort`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
}

impl NodeLocalService {
    /// The Service port: `port`, or else the pool's `listenPort`.
    pub fn service_port(&self, listen_port: Option<i32>) -> Option<i32> {
        self.port.or(listen_port)
    }
}

/// The clients a pool serves.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Clients {
    /// The namespaces whose pods may use the pool, at least one and at most
    /// 64, each listed once. Pods on the host network, pods of other nodes
    /// and addresses the agent does not know are refused. To refuse every
    /// client, delete the pool; an empty list is not accepted.
    // "At least one" is a CEL rule rather than `minItems`, so the message
    // can say what an empty list would have to be replaced with.
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    #[x_kube(validation = Rule::new("size(self) >= 1")
        .message("spec.clients.namespaces must list at least one namespace; an empty list is not accepted (to let every namespace in, remove spec.clients; to refuse every client, delete the pool)")
        .reason(Reason::FieldValueInvalid))]
    pub namespaces: Vec<NamespaceName>,
}

/// A namespace named in `spec.clients.namespaces`.
// The rule stays raw JSON: `KubeSchema` derives only structs with named
// fields, and this is a transparent newtype (its schema is the string's).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(transparent)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')",
        "message": "spec.clients.namespaces: each entry must be a namespace name (a DNS-1123 label: lower-case letters, digits and '-', starting and ending with a letter or digit, at most 63 characters), such as shop",
        "reason": "FieldValueInvalid"
    }
]))]
pub struct NamespaceName(#[schemars(length(min = 1, max = 63))] pub String);

/// Where a pool's connections go.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.service) != has(self.addresses)")
    .message("spec.target must set exactly one of service or addresses")
    .reason(Reason::FieldValueInvalid))]
pub struct Target {
    /// A Service in the pool's namespace. The operator resolves its ready
    /// endpoints through EndpointSlices and follows them as pods come and go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceTarget>,

    /// Static backend addresses as `host:port`, IPv6 hosts in brackets
    /// (`[fd00::7]:50051`). For backends outside the cluster and standalone
    /// agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub addresses: Option<Vec<Address>>,
}

/// A static backend address.
// The rule stays raw JSON, as `NamespaceName`'s does: a transparent
// newtype, which `KubeSchema` cannot derive.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(transparent)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.matches('^(\\\\[[0-9a-fA-F:.]+\\\\]|[a-zA-Z0-9]([a-zA-Z0-9.-]*[a-zA-Z0-9])?):[0-9]{1,5}$') && int(self.substring(self.lastIndexOf(':') + 1)) >= 1 && int(self.substring(self.lastIndexOf(':') + 1)) <= 65535",
        "message": "spec.target.addresses: each address must be host:port with a port from 1 to 65535, IPv6 hosts in brackets, such as 10.0.3.7:50051 or [fd00::7]:50051",
        "reason": "FieldValueInvalid"
    }
]))]
pub struct Address(#[schemars(length(min = 3, max = 261))] pub String);

/// A Service and one of its ports.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceTarget {
    /// The Service's name, in the pool's namespace.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,

    /// The Service port: a number from 1 to 65535, or the name of one of the
    /// Service's ports (such as `grpc`).
    #[x_kube(validation = Rule::new("type(self) == int ? (self >= 1 && self <= 65535) : self.matches('^[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$')")
        .message("spec.target.service.port must be a port number from 1 to 65535 or a port name (lower-case letters, digits and '-', at most 15 characters)")
        .reason(Reason::FieldValueInvalid))]
    pub port: IntOrString,
}

/// What a stream does when the pool is full.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum WhenFull {
    /// Dial an extra connection outside the pool, used once and closed
    /// (go-micro's behaviour); counted as overflow.
    #[default]
    Overflow,
    /// Queue for up to `acquireTimeout`, then fail with RESOURCE_EXHAUSTED.
    Wait,
}

fn default_size() -> i32 {
    100
}
fn default_ttl() -> String {
    "1m".into()
}
fn default_max_streams() -> i32 {
    20
}
fn default_acquire_timeout() -> String {
    "1s".into()
}

/// The default for `maxIdle` when it is unset: 50, or `size` if smaller.
pub fn effective_max_idle(spec: &ConnectionPoolSpec) -> i32 {
    spec.max_idle.unwrap_or(50.min(spec.size))
}

/// What the operator observed of a pool, written by server-side apply.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPoolStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// The target as resolved: `service:port` or the first static address
    /// and how many more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,

    /// `Ready`: every desired agent runs the current generation and the pool
    /// has addresses. `Distributed`: how many agents acknowledged it.
    /// `Degraded`: an agent rejected it, or the target cannot be resolved;
    /// the reason and message say which.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// How many agents should run this pool and how many do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agents: Option<AgentCounts>,

    /// Occupancy summed over every address and node. Exact even when
    /// `addresses` is capped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totals: Option<Totals>,

    /// Occupancy per backend address, summed over nodes; the busiest
    /// addresses first, at most 50 entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    pub addresses: Vec<AddressStatus>,

    /// Tuning advice from the occupancy agents observed over their window:
    /// each setting with the reason and the numbers behind it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recommendation: Option<Recommendation>,

    /// With `spec.tuning.mode: Apply`, the settings the operator runs in
    /// place of the spec's, and when it last changed them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tuned: Option<Tuned>,
}

/// Tuning advice for a pool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Recommendation {
    /// `ok` when the settings running match the advice; else the settings
    /// that differ (`size 100→4, maxStreams 20→100`), or `observing 2m/10m`
    /// until enough was observed, or `no traffic`.
    pub summary: String,
    /// How long the agents have observed (the longest any of them has, up
    /// to their window), such as `10m0s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed: Option<String>,
    /// The advised `size`; unset until there is advice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<i32>,
    /// The advised `maxIdle`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_idle: Option<i32>,
    /// The advised `maxStreams`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_streams: Option<i32>,
    /// The advised `whenFull`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when_full: Option<WhenFull>,
    /// Why, per setting, with the numbers behind it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasons: Option<Reasons>,
}

/// One short reason per advised setting.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Reasons {
    /// Why this `size`.
    pub size: String,
    /// Why this `maxIdle`.
    pub max_idle: String,
    /// Why this `maxStreams`.
    pub max_streams: String,
    /// Why this `whenFull`.
    pub when_full: String,
}

/// The settings `spec.tuning.mode: Apply` runs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Tuned {
    /// The `size` running.
    pub size: i32,
    /// The `maxIdle` running.
    pub max_idle: i32,
    /// The `maxStreams` running.
    pub max_streams: i32,
    /// The `whenFull` running.
    pub when_full: WhenFull,
    /// When the operator last changed them.
    pub applied_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
}

/// Agents for a pool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentCounts {
    /// Agents that should run the pool (one per eligible node).
    pub desired: i32,
    /// Agents that acknowledged the pool's current generation.
    pub synced: i32,
    /// Agents that rejected the current generation; see the Degraded condition.
    #[serde(default)]
    pub rejected: i32,
}

/// Occupancy summed over a pool's addresses and nodes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    /// Backend addresses the pool currently resolves to.
    pub addresses: i32,
    /// Open pooled connections.
    pub connections: i64,
    /// Streams (in-flight RPCs) in use.
    pub streams: i64,
    /// Connections with no stream.
    pub idle: i64,
    /// Connections at max streams.
    #[serde(default)]
    pub busy: i64,
    /// Streams that found the pool full and used an overflow connection.
    #[serde(default)]
    pub overflow: i64,
}

/// Occupancy of one backend address, summed over nodes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AddressStatus {
    /// The backend `host:port`.
    pub address: String,
    /// Open pooled connections to this address.
    pub connections: i64,
    /// Connections at max streams.
    pub busy: i64,
    /// Connections with no stream.
    pub idle: i64,
    /// Streams in use.
    pub streams: i64,
    /// Streams that used an overflow connection.
    #[serde(default)]
    pub overflow: i64,
    /// Nodes whose agents reported this address.
    pub nodes: i32,
}
