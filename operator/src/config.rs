//! The operator's command line: every flag also settable by a `TIDEPOOL_*`
//! environment variable, parsed once into a typed [`Config`].

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use tidepool_common::flags::{duration, log_filter};
pub use tidepool_common::log::LogFormat;

use crate::resolve::AddressMap;

/// The command line of `tidepool-operator`.
#[derive(Debug, Parser)]
#[command(
    name = "tidepool-operator",
    version,
    about = "tidepool's operator: reconciles ConnectionPools and pushes them to agents"
)]
pub struct Args {
    /// Address of the control service agents connect to (gRPC over TLS).
    #[arg(long, env = "TIDEPOOL_CONTROL_LISTEN", default_value = "0.0.0.0:15010")]
    pub control_listen: SocketAddr,

    /// Address of the admin server (`/metrics`, `/healthz`, `/readyz`).
    #[arg(long, env = "TIDEPOOL_ADMIN_LISTEN", default_value = "0.0.0.0:15020")]
    pub admin_listen: SocketAddr,

    /// Watch ConnectionPools (and their Services and EndpointSlices) in this
    /// namespace only; all namespaces when unset.
    #[arg(long, env = "TIDEPOOL_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,

    /// Label selector of the Nodes that run agents (the agent DaemonSet's
    /// node selector); every Node when unset. Agents on other nodes are
    /// refused.
    #[arg(long, env = "TIDEPOOL_NODE_SELECTOR")]
    pub node_selector: Option<String>,

    /// The least time between two status writes of one pool.
    #[arg(long, env = "TIDEPOOL_STATUS_INTERVAL", default_value = "5s", value_parser = duration)]
    pub status_interval: Duration,

    /// How long agents must have observed a pool before the operator
    /// advises its settings (status.recommendation). At most the agents'
    /// `--observe-window` is useful: they observe no longer than that.
    #[arg(long, env = "TIDEPOOL_ADVICE_AFTER", default_value = "10m", value_parser = duration)]
    pub advice_after: Duration,

    /// The least time between two applies of advised settings to one pool
    /// with `spec.tuning.mode: Apply`.
    #[arg(long, env = "TIDEPOOL_TUNING_INTERVAL", default_value = "10m", value_parser = duration)]
    pub tuning_interval: Duration,

    /// How long the desired pools must be quiet before a push.
    #[arg(long, env = "TIDEPOOL_PUSH_DEBOUNCE", default_value = "100ms", value_parser = duration)]
    pub push_debounce: Duration,

    /// Most sessions writing a snapshot at once.
    #[arg(long, env = "TIDEPOOL_PUSH_CONCURRENCY", default_value_t = 64)]
    pub push_concurrency: usize,

    /// Elect a leader on a Lease, so more than one replica may run.
    #[arg(long, env = "TIDEPOOL_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,

    /// The leader Lease's name.
    #[arg(long, env = "TIDEPOOL_LEASE_NAME", default_value = "tidepool-operator")]
    pub lease_name: String,

    /// The leader Lease's namespace (the operator's own, from the downward
    /// API's `POD_NAMESPACE` in the chart).
    #[arg(long, env = "TIDEPOOL_LEASE_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,

    /// How long a leader's lease lasts without renewal.
    #[arg(long, env = "TIDEPOOL_LEASE_DURATION", default_value = "15s", value_parser = duration)]
    pub lease_duration: Duration,

    /// This replica's name in the Lease (the pod name in the chart); the
    /// host name when unset.
    #[arg(long, env = "TIDEPOOL_IDENTITY")]
    pub identity: Option<String>,

    /// This replica's pod (the downward API's `metadata.name` in the
    /// chart). When set, with leader election, the pod's label
    /// `tidepool.dev/role` says `leader` or `standby`, so a Service that
    /// selects `tidepool.dev/role: leader` routes agents to the leader only.
    /// Its namespace is the Lease's.
    #[arg(long, env = "TIDEPOOL_POD_NAME")]
    pub pod_name: Option<String>,

    /// Rewrite endpoint IPv4 addresses from one network to another, such as
    /// `192.0.2.0/24=127.0.0.0/24` (comma-separated rules). Only for local
    /// control planes, whose API server refuses loopback endpoints while
    /// local backends listen on loopback (`make demo`, the e2e tests).
    #[arg(long, env = "TIDEPOOL_ENDPOINT_ADDRESS_MAP", default_value = "")]
    pub endpoint_address_map: AddressMap,

    /// Serve the control port in plain text and accept agents without a
    /// token. For in-process tests and benchmarks only: anyone who reaches
    /// the port can then claim any node. The chart has no value for it.
    #[arg(long, env = "TIDEPOOL_INSECURE_CONTROL", default_value_t = false, action = clap::ArgAction::Set)]
    pub insecure_control: bool,

    /// The audience agents' projected tokens are minted for.
    #[arg(
        long,
        env = "TIDEPOOL_CONTROL_AUDIENCE",
        default_value = "control.tidepool.dev"
    )]
    pub control_audience: String,

    /// The agents' ServiceAccount, as `namespace/name` or
    /// `system:serviceaccount:namespace:name`: only its tokens are accepted.
    #[arg(long, env = "TIDEPOOL_AGENT_SERVICE_ACCOUNT")]
    pub agent_service_account: Option<String>,

    /// Most TokenReviews in flight at once (a reconnect storm queues behind
    /// them; successes are cached until the token expires).
    #[arg(long, env = "TIDEPOOL_TOKEN_REVIEW_CONCURRENCY", default_value_t = 16)]
    pub token_review_concurrency: usize,

    /// How long an accepted token is trusted without a new review (never
    /// past its expiry). A revoked token (its pod deleted) may open streams
    /// for this long; a reconnect storm within it costs no reviews.
    #[arg(long, env = "TIDEPOOL_TOKEN_REVIEW_CACHE_TTL", default_value = "10m", value_parser = duration)]
    pub token_review_cache_ttl: Duration,

    /// Limit for one TokenReview call.
    #[arg(long, env = "TIDEPOOL_TOKEN_REVIEW_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub token_review_timeout: Duration,

    /// The longest a control session lasts even when its token lives
    /// longer (sessions always end at the token's expiry).
    #[arg(long, env = "TIDEPOOL_CONTROL_MAX_SESSION", value_parser = duration)]
    pub control_max_session: Option<Duration>,

    /// The Secret holding the control CA (in `--ca-namespace`). The chart
    /// creates it empty; the operator fills it.
    #[arg(
        long,
        env = "TIDEPOOL_CA_SECRET",
        default_value = "tidepool-control-ca"
    )]
    pub ca_secret: String,

    /// The ConfigMap the CA certificates are published in, for agents.
    #[arg(
        long,
        env = "TIDEPOOL_CA_CONFIGMAP",
        default_value = "tidepool-control-ca"
    )]
    pub ca_configmap: String,

    /// The namespace of the CA Secret and ConfigMap; the Lease's when unset.
    #[arg(long, env = "TIDEPOOL_CA_NAMESPACE")]
    pub ca_namespace: Option<String>,

    /// How often the CA Secret is checked (renewal, rollover, another
    /// replica's writes).
    #[arg(long, env = "TIDEPOOL_CA_CHECK_INTERVAL", default_value = "1m", value_parser = duration)]
    pub ca_check_interval: Duration,

    /// How long a new CA is trusted (published to agents) before it signs.
    #[arg(long, env = "TIDEPOOL_CA_ROLLOVER_OVERLAP", default_value = "10m", value_parser = duration)]
    pub ca_rollover_overlap: Duration,

    /// The DNS names of the control port's serving certificate
    /// (comma-separated), which agents verify: the control Service's
    /// `<svc>.<ns>.svc` and `<svc>.<ns>.svc.cluster.local`.
    #[arg(long, env = "TIDEPOOL_CONTROL_DNS_NAMES", value_delimiter = ',')]
    pub control_dns_names: Vec<String>,

    /// The serving certificate's lifetime; it is renewed at half of it.
    #[arg(long, env = "TIDEPOOL_CONTROL_CERT_TTL", default_value = "24h", value_parser = duration)]
    pub control_cert_ttl: Duration,

    /// Limit for a TLS handshake on the control port.
    #[arg(long, env = "TIDEPOOL_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub tls_handshake_timeout: Duration,

    /// Label selector of the agent pods (the agent DaemonSet's), in
    /// `--agent-namespace`: the endpoints of every pool's node-local Service.
    /// Unset: pools that ask for a node-local Service get none, and their
    /// `LocalService` condition says why.
    #[arg(long, env = "TIDEPOOL_AGENT_SELECTOR")]
    pub agent_selector: Option<String>,

    /// The agent pods' namespace; the lease namespace when unset.
    #[arg(long, env = "TIDEPOOL_AGENT_NAMESPACE")]
    pub agent_namespace: Option<String>,

    /// Log format.
    #[arg(long, env = "TIDEPOOL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// What to log: a level (`trace`, `debug`, `info`, `warn`, `error`,
    /// `off`) or `target=level` directives (`tidepool_operator=debug,h2=warn`).
    /// A value that is not one is refused at start.
    #[arg(long = "log", env = "TIDEPOOL_LOG", default_value = "info", value_parser = log_filter)]
    pub log_filter: String,
}

/// Leader election settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderConfig {
    /// The Lease's namespace.
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// This replica's identity.
    pub identity: String,
    /// The lease duration.
    pub duration: Duration,
    /// The pod whose role label follows the leadership, if any.
    pub pod: Option<String>,
}

/// How the control port is secured.
#[derive(Debug, Clone)]
pub struct ControlSecurity {
    /// What agents' tokens must be.
    pub auth: crate::auth::AuthConfig,
    /// Limit for one TokenReview.
    pub review_timeout: Duration,
    /// The CA's objects and timing.
    pub ca: crate::ca::CaConfig,
    /// The serving certificate.
    pub leaf: crate::tls::LeafConfig,
    /// Limit for a handshake.
    pub handshake_timeout: Duration,
}

/// The operator's configuration, checked and typed.
#[derive(Debug, Clone)]
pub struct Config {
    /// The control service's address.
    pub control_listen: SocketAddr,
    /// The admin server's address.
    pub admin_listen: SocketAddr,
    /// The namespace watched, or all.
    pub watch_namespace: Option<String>,
    /// Nodes that run agents.
    pub node_selector: Option<String>,
    /// Least time between two status writes of a pool.
    pub status_interval: Duration,
    /// Tuning advice and apply.
    pub tuning: crate::advice::Options,
    /// Push debounce.
    pub push_debounce: Duration,
    /// Push fan-out bound.
    pub push_concurrency: usize,
    /// Leader election, unless turned off.
    pub leader: Option<LeaderConfig>,
    /// Endpoint address rewrites.
    pub address_map: AddressMap,
    /// TLS and authentication on the control port; `None` only with
    /// `--insecure-control`.
    pub security: Option<ControlSecurity>,
    /// The cap on a session's length.
    pub max_session: Option<Duration>,
    /// The agent pods node-local Services list, if configured.
    pub agent_pods: Option<crate::local::AgentPods>,
    /// Log format.
    pub log_format: LogFormat,
    /// The log filter, checked ([`tidepool_common::log::check_log_filter`]).
    pub log_filter: String,
}

/// A flag value clap could not check by itself.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--push-concurrency 0`.
    #[error("--push-concurrency (TIDEPOOL_PUSH_CONCURRENCY) = 0: must be at least 1")]
    ZeroConcurrency,
    /// A lease shorter than a second.
    #[error("--lease-duration (TIDEPOOL_LEASE_DURATION) = {0:?}: must be at least 1s")]
    ShortLease(Duration),
    /// No agent ServiceAccount, so no token could be accepted.
    #[error(
        "--agent-service-account (TIDEPOOL_AGENT_SERVICE_ACCOUNT) is required: the agents' ServiceAccount as namespace/name (or pass --insecure-control for an unauthenticated test setup)"
    )]
    NoAgentServiceAccount,
    /// A ServiceAccount that is not `namespace/name`.
    #[error(
        "--agent-service-account (TIDEPOOL_AGENT_SERVICE_ACCOUNT) = {0:?}: expected namespace/name or system:serviceaccount:namespace:name"
    )]
    BadServiceAccount(String),
    /// No DNS names for the serving certificate.
    #[error(
        "--control-dns-names (TIDEPOOL_CONTROL_DNS_NAMES) is required: the control Service's names agents verify, such as tidepool-operator.tidepool.svc"
    )]
    NoDnsNames,
    /// A zero concurrency or a too short certificate life.
    #[error("{flag} = {value}: {expected}")]
    Bad {
        /// The flag and its variable.
        flag: &'static str,
        /// The value given.
        value: String,
        /// What is accepted.
        expected: &'static str,
    },
}

/// `namespace/name` or `system:serviceaccount:namespace:name` as the user
/// name the API server gives the ServiceAccount's tokens.
fn service_account_user(s: &str) -> Result<String, ConfigError> {
    let bad = || ConfigError::BadServiceAccount(s.to_string());
    let rest = s.strip_prefix("system:serviceaccount:");
    let (ns, name) = match rest {
        Some(r) => r.split_once(':').ok_or_else(bad)?,
        None => s.split_once('/').ok_or_else(bad)?,
    };
    let label = |x: &str| {
        !x.is_empty()
            && x.len() <= 253
            && x.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    if !label(ns) || !label(name) {
        return Err(bad());
    }
    Ok(format!("system:serviceaccount:{ns}:{name}"))
}

impl Config {
    /// Checks parsed flags and builds the configuration.
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        if args.push_concurrency == 0 {
            return Err(ConfigError::ZeroConcurrency);
        }
        if args.leader_elect && args.lease_duration < Duration::from_secs(1) {
            return Err(ConfigError::ShortLease(args.lease_duration));
        }
        let security = if args.insecure_control {
            None
        } else {
            let sa = args
                .agent_service_account
                .as_deref()
                .filter(|s| !s.is_empty())
                .ok_or(ConfigError::NoAgentServiceAccount)?;
            let agent_user = service_account_user(sa)?;
            let dns_names: Vec<String> = args
                .control_dns_names
                .iter()
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
                .collect();
            if dns_names.is_empty() {
                return Err(ConfigError::NoDnsNames);
            }
            if args.token_review_concurrency == 0 {
                return Err(ConfigError::Bad {
                    flag: "--token-review-concurrency (TIDEPOOL_TOKEN_REVIEW_CONCURRENCY)",
                    value: "0".into(),
                    expected: "must be at least 1",
                });
            }
            if args.control_cert_ttl < Duration::from_secs(10) {
                return Err(ConfigError::Bad {
                    flag: "--control-cert-ttl (TIDEPOOL_CONTROL_CERT_TTL)",
                    value: format!("{:?}", args.control_cert_ttl),
                    expected: "must be at least 10s (24h is the default)",
                });
            }
            Some(ControlSecurity {
                auth: crate::auth::AuthConfig {
                    audience: args.control_audience.clone(),
                    agent_user,
                    max_concurrent_reviews: args.token_review_concurrency,
                    cache_ttl: args.token_review_cache_ttl,
                },
                review_timeout: args.token_review_timeout,
                ca: crate::ca::CaConfig {
                    namespace: args
                        .ca_namespace
                        .clone()
                        .filter(|n| !n.is_empty())
                        .unwrap_or_else(|| args.lease_namespace.clone()),
                    secret: args.ca_secret.clone(),
                    configmap: args.ca_configmap.clone(),
                    check_interval: args.ca_check_interval,
                    timing: crate::ca::Timing {
                        overlap: args.ca_rollover_overlap,
                        retire_after: args.control_cert_ttl,
                    },
                },
                leaf: crate::tls::LeafConfig {
                    dns_names,
                    ttl: args.control_cert_ttl,
                },
                handshake_timeout: args.tls_handshake_timeout,
            })
        };
        let lease_namespace = args.lease_namespace.clone();
        let leader = args.leader_elect.then(|| LeaderConfig {
            namespace: args.lease_namespace,
            name: args.lease_name,
            identity: args.identity.unwrap_or_else(hostname),
            duration: args.lease_duration,
            pod: args.pod_name.filter(|p| !p.is_empty()),
        });
        Ok(Self {
            control_listen: args.control_listen,
            admin_listen: args.admin_listen,
            watch_namespace: args.watch_namespace.filter(|n| !n.is_empty()),
            node_selector: args.node_selector.filter(|s| !s.is_empty()),
            status_interval: args.status_interval,
            tuning: crate::advice::Options {
                advice_after: args.advice_after,
                interval: args.tuning_interval,
            },
            push_debounce: args.push_debounce,
            push_concurrency: args.push_concurrency,
            leader,
            address_map: args.endpoint_address_map,
            security,
            max_session: args.control_max_session,
            agent_pods: args
                .agent_selector
                .filter(|s| !s.trim().is_empty())
                .map(|selector| crate::local::AgentPods {
                    namespace: args
                        .agent_namespace
                        .filter(|n| !n.is_empty())
                        .unwrap_or_else(|| lease_namespace.clone()),
                    selector,
                }),
            log_format: args.log_format,
            log_filter: args.log_filter,
        })
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "tidepool-operator".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = Config::from_args(
            Args::try_parse_from([
                "tidepool-operator",
                "--identity",
                "me",
                "--agent-service-account",
                "tidepool/tp-agent",
                "--control-dns-names",
                "op.tidepool.svc,op.tidepool.svc.cluster.local",
            ])
            .unwrap(),
        )
        .unwrap();
        let sec = c.security.as_ref().unwrap();
        assert_eq!(
            sec.auth.agent_user,
            "system:serviceaccount:tidepool:tp-agent"
        );
        assert_eq!(sec.auth.audience, "control.tidepool.dev");
        assert_eq!(sec.leaf.dns_names.len(), 2);
        assert_eq!(sec.leaf.ttl, Duration::from_secs(86400));
        assert_eq!(sec.ca.namespace, "default");
        assert_eq!(c.control_listen.port(), 15010);
        assert_eq!(c.admin_listen.port(), 15020);
        assert_eq!(c.status_interval, Duration::from_secs(5));
        assert_eq!(c.push_debounce, Duration::from_millis(100));
        let l = c.leader.unwrap();
        assert_eq!(
            (l.name.as_str(), l.identity.as_str(), l.duration),
            ("tidepool-operator", "me", Duration::from_secs(15))
        );
    }

    #[test]
    fn bad_values_name_the_flag() {
        let err = Args::try_parse_from(["tidepool-operator", "--status-interval", "often"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--status-interval") && err.contains("often"),
            "{err}"
        );
        let err = Config::from_args(
            Args::try_parse_from(["tidepool-operator", "--push-concurrency", "0"]).unwrap(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("--push-concurrency"), "{err}");
        let c = Config::from_args(
            Args::try_parse_from([
                "tidepool-operator",
                "--leader-elect",
                "false",
                "--insecure-control",
                "true",
            ])
            .unwrap(),
        )
        .unwrap();
        assert!(c.leader.is_none());
        assert!(c.security.is_none());
    }

    #[test]
    fn security_flags_are_required_and_checked() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["tidepool-operator"];
            argv.extend_from_slice(extra);
            Config::from_args(Args::try_parse_from(argv).unwrap()).map(|_| ())
        };
        let err = parse(&[]).unwrap_err().to_string();
        assert!(err.contains("--agent-service-account"), "{err}");
        let err = parse(&["--agent-service-account", "tp-agent"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"tp-agent\"") && err.contains("namespace/name"),
            "{err}"
        );
        let err = parse(&["--agent-service-account", "system:serviceaccount:ns:a"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--control-dns-names"), "{err}");
        let err = parse(&[
            "--agent-service-account",
            "ns/a",
            "--control-dns-names",
            "x.ns.svc",
            "--control-cert-ttl",
            "1s",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("--control-cert-ttl"), "{err}");
    }

    #[test]
    fn a_bad_log_level_is_refused_naming_it() {
        let err = Args::try_parse_from(["tidepool-operator", "--log", "verbose"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--log") && err.contains("TIDEPOOL_LOG") && err.contains("\"verbose\""),
            "{err}"
        );
        let ok =
            Args::try_parse_from(["tidepool-operator", "--log", "tidepool_operator=debug,warn"])
                .unwrap();
        assert_eq!(ok.log_filter, "tidepool_operator=debug,warn");
    }
}
