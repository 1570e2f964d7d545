//! The rules of the ConnectionPool schema and its CEL validations, applied
//! in Rust for inputs that never reach the API server: standalone agent
//! files and the settings an agent receives. Messages match the API server's
//! so a user sees the same words either way.

use std::fmt;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::v1alpha1::{
    Bounds, ConnectionPoolSpec, MAX_CLIENT_NAMESPACES, MAX_STATIC_ADDRESSES, effective_max_idle,
};

/// One rule a field breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field's path, such as `spec.maxIdle`.
    pub field: String,
    /// What is wrong and what would be accepted.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every rule a spec breaks, joined for display.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct SpecErrors(pub Vec<FieldError>);

/// A spec's settings in the units the agent uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Connections kept per address.
    pub size: u32,
    /// A connection's lifetime before jitter.
    pub ttl: Duration,
    /// Idle connections kept per address.
    pub max_idle: u32,
    /// Streams per connection.
    pub max_streams: u32,
    /// Whether a full pool waits (`true`) or overflows.
    pub wait_when_full: bool,
    /// How long a waiting stream may wait.
    pub acquire_timeout: Duration,
}

/// The longest duration accepted, in seconds (about 31,700 years): past
/// it a value is a typo, not a setting.
const MAX_DURATION_SECS: u64 = 1_000_000_000_000;

/// Parses a Go-style duration (`1h30m`, `500ms`, `1.5s`, `0`) as Kubernetes
/// CEL's `duration()` reads it, with kube-core's port of Go's parser
/// ([`kube::core::Duration`]). Returns `None` for anything else, and for
/// what no setting can be: a sign (Go accepts `-1s` and `+1s`), or more
/// than 10^12 seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    // kube-core's parser reads "" and a lone sign as zero, and panics on a
    // number std's Duration cannot hold or on a sign after the first unit
    // (`1h-3m`); those never reach it. Ten integer digits a number and 64
    // characters keep any sum of units far inside a Duration.
    let numbers_fit = s
        .split(|c: char| c.is_alphabetic())
        .all(|n| n.split('.').next().is_none_or(|int| int.len() <= 10));
    let charset = s
        .chars()
        .all(|c| c.is_ascii_digit() || c == '.' || c.is_alphabetic());
    if s.is_empty() || s.len() > 64 || !charset || !numbers_fit {
        return None;
    }
    let parsed: kube::core::Duration = s.parse().ok()?;
    let duration = Duration::from(parsed);
    (!parsed.is_negative() && duration.as_secs() <= MAX_DURATION_SECS).then_some(duration)
}

/// Checks a `host:port` address: a DNS name or IPv4 address, or an IPv6
/// address in brackets, and a port from 1 to 65535.
pub fn check_address(a: &str) -> Result<(), String> {
    let accepted = "must be host:port with a port from 1 to 65535, IPv6 hosts in brackets, such as 10.0.3.7:50051 or [fd00::7]:50051";
    let Some((host, port)) = a.rsplit_once(':') else {
        return Err(format!("{a:?} {accepted}"));
    };
    let port_ok = !port.is_empty()
        && port.len() <= 5
        && port.chars().all(|c| c.is_ascii_digit())
        && matches!(port.parse::<u32>(), Ok(1..=65535));
    let host_ok = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        inner.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.len() <= 253
            && !host.starts_with(['-', '.'])
            && !host.ends_with(['-', '.'])
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    };
    if port_ok && host_ok {
        Ok(())
    } else {
        Err(format!("{a:?} {accepted}"))
    }
}

/// Checks a namespace name: a DNS-1123 label, as the API server requires
/// of `metadata.namespace`.
pub fn check_namespace(ns: &str) -> Result<(), String> {
    let b = ns.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-';
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{ns:?} must be a namespace name (a DNS-1123 label: lower-case letters, digits and '-', starting and ending with a letter or digit, at most 63 characters), such as shop"
        ))
    }
}

/// Checks a resource name: a DNS-1123 subdomain, as the API server
/// requires of a custom resource's `metadata.name` (lower-case letters,
/// digits, '-' and '.', starting and ending with a letter or digit, at most
/// 253 characters).
pub fn check_resource_name(name: &str) -> Result<(), String> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 253
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'.')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} must be a resource name (a DNS-1123 subdomain: lower-case letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters), such as payments"
        ))
    }
}

/// Checks a Service name: a DNS-1035 label, as the API server requires of
/// a Service's `metadata.name`.
pub fn check_service_name(name: &str) -> Result<(), String> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0].is_ascii_lowercase()
        && b[b.len() - 1] != b'-';
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} must be a Service name (a DNS-1035 label: lower-case letters, digits and '-', starting with a letter and ending with a letter or digit, at most 63 characters), such as payments-pooled"
        ))
    }
}

fn is_port_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 15
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

impl ConnectionPoolSpec {
    /// Applies every rule the CRD enforces and converts the spec into the
    /// agent's units. All broken rules are reported, not just the first.
    pub fn settings(&self) -> Result<Settings, SpecErrors> {
        let mut errs = Vec::new();
        let mut err = |field: &str, message: String| {
            errs.push(FieldError {
                field: field.into(),
                message,
            })
        };

        match (&self.target.service, &self.target.addresses) {
            (Some(_), Some(_)) | (None, None) => err(
                "spec.target",
                "must set exactly one of service or addresses".into(),
            ),
            _ => {}
        }
        if let Some(svc) = &self.target.service {
            if svc.name.is_empty() {
                err("spec.target.service.name", "must not be empty".into());
            }
            match &svc.port {
                IntOrString::Int(p) if !(1..=65535).contains(p) => err(
                    "spec.target.service.port",
                    format!("{p} must be a port number from 1 to 65535 or a port name"),
                ),
                IntOrString::String(n) if !is_port_name(n) => err(
                    "spec.target.service.port",
                    format!(
                        "{n:?} must be a port number from 1 to 65535 or a port name (lower-case letters, digits and '-', at most 15 characters)"
                    ),
                ),
                _ => {}
            }
        }
        if let Some(addrs) = &self.target.addresses {
            if addrs.is_empty() {
                err(
                    "spec.target.addresses",
                    "must list at least one address".into(),
                );
            }
            if addrs.len() > MAX_STATIC_ADDRESSES {
                err(
                    "spec.target.addresses",
                    format!(
                        "lists {} addresses; at most {MAX_STATIC_ADDRESSES} are accepted",
                        addrs.len()
                    ),
                );
            }
            for (i, a) in addrs.iter().enumerate() {
                if let Err(m) = check_address(&a.0) {
                    err(&format!("spec.target.addresses[{i}]"), m);
                }
            }
        }
        if self.size < 1 {
            err("spec.size", format!("{} must be at least 1", self.size));
        }
        if self.max_streams < 1 {
            err(
                "spec.maxStreams",
                format!("{} must be at least 1", self.max_streams),
            );
        }
        let max_idle = effective_max_idle(self);
        if max_idle < 0 {
            err("spec.maxIdle", format!("{max_idle} must be at least 0"));
        } else if max_idle > self.size {
            err(
                "spec.maxIdle",
                format!(
                    "{max_idle} must be less than or equal to spec.size ({})",
                    self.size
                ),
            );
        }
        let ttl = parse_duration(&self.ttl);
        match ttl {
            Some(d) if d >= Duration::from_secs(1) => {}
            _ => err(
                "spec.ttl",
                format!(
                    "{:?} must be a duration of at least 1s, such as 30s, 1m or 1h30m",
                    self.ttl
                ),
            ),
        }
        let acquire_timeout = parse_duration(&self.acquire_timeout);
        let wait = self.when_full == crate::v1alpha1::WhenFull::Wait;
        match acquire_timeout {
            None => err(
                "spec.acquireTimeout",
                format!(
                    "{:?} must be a duration such as 500ms, 1s or 2m",
                    self.acquire_timeout
                ),
            ),
            // The pool refuses a zero wait (`pool::Settings::validate`):
            // said here, by field, rather than by every agent at apply.
            Some(d) if wait && d.is_zero() => err(
                "spec.acquireTimeout",
                format!(
                    "{:?} must be greater than zero when spec.whenFull is Wait, such as 500ms or 1s (or set whenFull: Overflow)",
                    self.acquire_timeout
                ),
            ),
            Some(_) => {}
        }
        if let Some(p) = self.listen_port
            && !(1..=65535).contains(&p)
        {
            err(
                "spec.listenPort",
                format!("{p} must be a port number from 1 to 65535"),
            );
        }

        if let Some(tuning) = &self.tuning {
            for (field, bounds) in [
                ("size", tuning.size),
                ("maxIdle", tuning.max_idle),
                ("maxStreams", tuning.max_streams),
            ] {
                if let Some(Bounds {
                    min: Some(min),
                    max: Some(max),
                }) = bounds
                    && min > max
                {
                    err(
                        &format!("spec.tuning.{field}.min"),
                        format!(
                            "{min} must be less than or equal to spec.tuning.{field}.max ({max})"
                        ),
                    );
                }
            }
        }

        if let Some(local) = &self.node_local_service {
            if let Err(m) = check_service_name(&local.name) {
                err("spec.nodeLocalService.name", m);
            } else if self
                .target
                .service
                .as_ref()
                .is_some_and(|t| t.name == local.name)
            {
                err(
                    "spec.nodeLocalService.name",
                    "must differ from spec.target.service.name: the pooled Service cannot be its own backend".into(),
                );
            }
            if let Some(p) = local.port
                && !(1..=65535).contains(&p)
            {
                err(
                    "spec.nodeLocalService.port",
                    format!("{p} must be a port number from 1 to 65535"),
                );
            }
            if self.listen_port.is_none() {
                err(
                    "spec.nodeLocalService",
                    "needs spec.listenPort: the port each agent serves this pool on, which the Service targets (such as 16001)".into(),
                );
            }
        }

        if let Some(clients) = &self.clients {
            let namespaces = &clients.namespaces;
            if namespaces.is_empty() {
                err(
                    "spec.clients.namespaces",
                    "must list at least one namespace; an empty list is not accepted (to let every namespace in, remove spec.clients; to refuse every client, delete the pool)"
                        .into(),
                );
            }
            if namespaces.len() > MAX_CLIENT_NAMESPACES {
                err(
                    "spec.clients.namespaces",
                    format!(
                        "lists {} namespaces; at most {MAX_CLIENT_NAMESPACES} are accepted",
                        namespaces.len()
                    ),
                );
            }
            for (i, ns) in namespaces.iter().enumerate() {
                if let Err(m) = check_namespace(&ns.0) {
                    err(&format!("spec.clients.namespaces[{i}]"), m);
                } else if namespaces[..i].contains(ns) {
                    err(
                        &format!("spec.clients.namespaces[{i}]"),
                        format!("{:?} is listed twice; list each namespace once", ns.0),
                    );
                }
            }
        }

        if !errs.is_empty() {
            return Err(SpecErrors(errs));
        }
        Ok(Settings {
            size: self.size as u32,
            ttl: ttl.unwrap_or_default(),
            max_idle: max_idle as u32,
            max_streams: self.max_streams as u32,
            wait_when_full: wait,
            acquire_timeout: acquire_timeout.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1alpha1::{
        Address, Clients, NamespaceName, NodeLocalService, ServiceTarget, Target, WhenFull,
    };

    fn spec() -> ConnectionPoolSpec {
        serde_yaml::from_str("target: {addresses: ['10.0.0.1:50051']}").unwrap()
    }

    #[test]
    fn defaults_are_go_micros() {
        let s = spec().settings().unwrap();
        assert_eq!(
            s,
            Settings {
                size: 100,
                ttl: Duration::from_secs(60),
                max_idle: 50,
                max_streams: 20,
                wait_when_full: false,
                acquire_timeout: Duration::from_secs(1),
            }
        );
    }

    /// Found by the `standalone` fuzz target: `whenFull: Wait` with a zero
    /// `acquireTimeout` passed these rules and was then refused by the pool
    /// at apply, without the field's path.
    #[test]
    fn a_zero_wait_is_refused_by_field_when_whenfull_is_wait() {
        for zero in ["0s", "000ms", "0.0000000001s"] {
            let mut s = spec();
            s.when_full = WhenFull::Wait;
            s.acquire_timeout = zero.into();
            let errs = s.settings().unwrap_err();
            assert_eq!(errs.0.len(), 1, "{errs}");
            assert_eq!(errs.0[0].field, "spec.acquireTimeout");
            assert!(errs.0[0].message.contains("greater than zero"), "{errs}");
            s.when_full = WhenFull::Overflow;
            assert_eq!(s.settings().unwrap().acquire_timeout, Duration::ZERO);
        }
    }

    #[test]
    fn resource_names_are_dns_subdomains() {
        for good in ["payments", "a", "payments.v2", "0-x"] {
            assert_eq!(check_resource_name(good), Ok(()), "{good}");
        }
        for bad in ["", "Payments", "a@b", "-a", "a.", "a_b", &"a".repeat(254)] {
            let err = check_resource_name(bad).unwrap_err();
            assert!(err.contains("DNS-1123 subdomain"), "{bad}: {err}");
        }
    }

    #[test]
    fn tuning_bounds_that_cross_are_refused_naming_both_fields() {
        let s: ConnectionPoolSpec = serde_yaml::from_str(
            "target: {addresses: ['10.0.0.1:50051']}\ntuning: {mode: Apply, size: {min: 8, max: 4}, maxIdle: {min: 2, max: 2}, maxStreams: {min: 50, max: 10}}",
        )
        .unwrap();
        let errs = s.settings().unwrap_err().to_string();
        assert!(
            errs.contains(
                "spec.tuning.size.min: 8 must be less than or equal to spec.tuning.size.max (4)"
            ),
            "{errs}"
        );
        assert!(errs.contains("spec.tuning.maxStreams.min: 50"), "{errs}");
        assert!(!errs.contains("maxIdle"), "equal bounds are fine: {errs}");
        let ok: ConnectionPoolSpec = serde_yaml::from_str(
            "target: {addresses: ['10.0.0.1:50051']}\ntuning: {size: {min: 2}, maxStreams: {max: 100}}",
        )
        .unwrap();
        assert!(ok.settings().is_ok());
    }

    #[test]
    fn max_idle_defaults_to_size_when_size_is_small() {
        let mut s = spec();
        s.size = 10;
        assert_eq!(s.settings().unwrap().max_idle, 10);
    }

    #[test]
    fn durations_parse_like_go() {
        for (good, expected) in [
            ("1h30m", Duration::from_secs(5400)),
            ("500ms", Duration::from_millis(500)),
            ("1.5s", Duration::from_millis(1500)),
            ("2us", Duration::from_micros(2)),
            ("2µs", Duration::from_micros(2)),
            ("7ns", Duration::from_nanos(7)),
            // Go (so CEL) accepts these too.
            ("0", Duration::ZERO),
            (".5s", Duration::from_millis(500)),
            ("1.s", Duration::from_secs(1)),
            ("0.100000000000000000000h", Duration::from_secs(360)),
        ] {
            assert_eq!(parse_duration(good), Some(expected), "{good:?}");
        }
    }

    #[test]
    fn bad_durations_are_refused_not_panicked_on() {
        for bad in [
            "",
            "1",
            "s",
            "1x",
            "1h-3m",
            "1 s",
            "-1s",
            "+1s",
            "-",
            "+",
            "1e3s",
            "inf",
            "NaN",
            "1..5s",
            "1.2.3s",
            "1s2",
            "s1",
            "1h 30m",
            "99999999999h",
            "9999999999h",
            "1000000000000000000000000000000s",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
        assert_eq!(
            parse_duration("277777777h"),
            Some(Duration::from_secs(277_777_777 * 3600)),
            "within the bound"
        );
    }

    #[test]
    fn addresses() {
        for good in [
            "10.0.0.1:1",
            "a:65535",
            "svc.ns.svc.cluster.local:50051",
            "[fd00::7]:50051",
            "[::1]:80",
        ] {
            assert!(check_address(good).is_ok(), "{good}");
        }
        for bad in [
            "10.0.0.1",
            "10.0.0.1:0",
            "h:65536",
            "fd00::7:50051",
            "[zz::1]:80",
            ":80",
            "-a:80",
            "a b:80",
            "[::1]:",
        ] {
            assert!(check_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_broken_rule_names_its_field() {
        let s = ConnectionPoolSpec {
            target: Target {
                service: Some(ServiceTarget {
                    name: "x".into(),
                    port: IntOrString::Int(0),
                }),
                addresses: Some(vec![Address("nope".into())]),
            },
            size: 0,
            ttl: "0s".into(),
            max_idle: Some(5),
            max_streams: 0,
            when_full: WhenFull::Wait,
            acquire_timeout: "soon".into(),
            listen_port: Some(70000),
            node_local_service: Some(NodeLocalService {
                name: "x".into(),
                port: Some(0),
            }),
            clients: Some(Clients {
                namespaces: vec![NamespaceName("Shop".into())],
            }),
            tuning: None,
        };
        let errs = s.settings().unwrap_err().0;
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.target",
                "spec.target.service.port",
                "spec.target.addresses[0]",
                "spec.size",
                "spec.maxStreams",
                "spec.maxIdle",
                "spec.ttl",
                "spec.acquireTimeout",
                "spec.listenPort",
                "spec.nodeLocalService.name",
                "spec.nodeLocalService.port",
                "spec.clients.namespaces[0]",
            ]
        );
    }

    #[test]
    fn client_namespaces_are_labels_listed_once() {
        let with = |namespaces: &[&str]| {
            let mut s = spec();
            s.clients = Some(Clients {
                namespaces: namespaces
                    .iter()
                    .map(|n| NamespaceName((*n).into()))
                    .collect(),
            });
            s.settings().map(|_| ()).map_err(|e| e.to_string())
        };
        assert_eq!(with(&["shop", "billing-2", "a"]), Ok(()));
        let err = with(&[]).unwrap_err();
        assert!(
            err.contains("spec.clients.namespaces: must list at least one"),
            "{err}"
        );
        let err = with(&["shop", "billing", "shop"]).unwrap_err();
        assert!(
            err.contains("spec.clients.namespaces[2]: \"shop\" is listed twice"),
            "{err}"
        );
        let long = "a".repeat(64);
        for bad in ["Shop", "-shop", "shop-", "sh_op", "", long.as_str()] {
            let err = with(&["ok", bad]).unwrap_err();
            assert!(
                err.contains("spec.clients.namespaces[1]") && err.contains("DNS-1123 label"),
                "{bad}: {err}"
            );
        }
        let many: Vec<String> = (0..65).map(|i| format!("ns{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let err = with(&many).unwrap_err();
        assert!(err.contains("lists 65 namespaces; at most 64"), "{err}");
    }

    #[test]
    fn named_ports() {
        let mut s = spec();
        s.target = Target {
            service: Some(ServiceTarget {
                name: "x".into(),
                port: IntOrString::String("grpc".into()),
            }),
            addresses: None,
        };
        assert!(s.settings().is_ok());
        s.target.service.as_mut().unwrap().port = IntOrString::String("GRPC_".into());
        assert_eq!(
            s.settings().unwrap_err().0[0].field,
            "spec.target.service.port"
        );
    }
}
