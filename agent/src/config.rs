//! The agent's configuration: the command line (every flag also settable by
//! a `TIDEPOOL_*` environment variable), parsed once into a typed [`Config`],
//! and [`PoolConfig`], one ConnectionPool as the agent runs it — whichever
//! source it came from (a standalone file or the operator's snapshots).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args as ClapArgs, Parser};
use tidepool_common::flags::{duration, log_filter};
pub use tidepool_common::log::LogFormat;
use tidepool_crds::{ConnectionPoolSpec, PoolKey};

use crate::pool::ObserveWindow;
use crate::pool::h2::H2Connector;

/// One ConnectionPool as the agent runs it.
///
/// The operator builds these from the resources and their resolved
/// endpoints; standalone mode builds them from manifests whose target lists
/// static addresses. [`Runtime::apply`](crate::runtime::Runtime::apply)
/// validates the spec again, so a bad value is refused by the agent too.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    /// The resource's namespace.
    pub namespace: String,
    /// The resource's name.
    pub name: String,
    /// The resource's `metadata.uid`, echoed in reports.
    pub uid: String,
    /// The resource's `metadata.generation`, echoed in reports.
    pub generation: i64,
    /// The resource's spec.
    pub spec: ConnectionPoolSpec,
    /// Resolved backend addresses (`host:port`), the only ones the agent
    /// dials for this pool. For static targets these are the spec's
    /// addresses; for a Service, its ready endpoints.
    pub addresses: Vec<String>,
}

impl PoolConfig {
    /// `namespace/name`: the pool's key in the runtime, its metric label and
    /// the name errors use.
    pub fn key(&self) -> String {
        PoolKey::new(&self.namespace, &self.name).to_string()
    }
}

/// The command line of `tidepool-agent`.
#[derive(Debug, Parser)]
#[command(
    name = "tidepool-agent",
    version,
    about = "tidepool's node agent: a gRPC proxy over connection pools"
)]
pub struct Args {
    /// Where the pools come from.
    #[command(flatten)]
    pub mode: ModeArgs,

    /// Address of the shared h2c gRPC listener; streams are routed by
    /// `:authority`. Pools with a `listenPort` get a dedicated listener on
    /// the same IP.
    #[arg(long, env = "TIDEPOOL_LISTEN", default_value = "0.0.0.0:15000")]
    pub listen: SocketAddr,

    /// Address of the admin server (`/metrics`, `/healthz`, `/readyz`,
    /// `/pools`).
    #[arg(long, env = "TIDEPOOL_ADMIN_LISTEN", default_value = "0.0.0.0:15021")]
    pub admin_listen: SocketAddr,

    /// On SIGTERM, how long the agent stays reachable before it stops
    /// accepting: `/readyz` fails at once, new connections are still served.
    /// Gives endpoint lists time to forget the agent, so no client dials a
    /// closed port (the chart sets it with the node-local Service).
    #[arg(long, env = "TIDEPOOL_DRAIN_DELAY", default_value = "0s", value_parser = duration)]
    pub drain_delay: Duration,

    /// On SIGTERM, how long open streams may run before the agent exits
    /// anyway (a Go-style duration such as `30s`).
    #[arg(long, env = "TIDEPOOL_DRAIN_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub drain_timeout: Duration,

    /// Most concurrent streams a client may open on one connection to the
    /// agent (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
    #[arg(long, env = "TIDEPOOL_MAX_CONCURRENT_STREAMS", default_value_t = 1024)]
    pub max_concurrent_streams: u32,

    /// Limit for TCP connect and HTTP/2 handshake to a backend.
    #[arg(long, env = "TIDEPOOL_CONNECT_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub connect_timeout: Duration,

    /// Time between keepalive PINGs on backend connections; `0s` turns
    /// keepalive off.
    #[arg(long, env = "TIDEPOOL_KEEPALIVE_INTERVAL", default_value = "10s", value_parser = duration)]
    pub keepalive_interval: Duration,

    /// How long a keepalive PING may go unanswered before the backend
    /// connection counts as dead.
    #[arg(long, env = "TIDEPOOL_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = duration)]
    pub keepalive_timeout: Duration,

    /// How long each pool observes its addresses (peaks of streams and
    /// connections, waits, dials, closes) for the operator's tuning
    /// advice: ten buckets of a tenth each, reported once a bucket is
    /// complete. Between 10s and 24h.
    #[arg(long, env = "TIDEPOOL_OBSERVE_WINDOW", default_value = "10m", value_parser = observe_window)]
    pub observe_window: ObserveWindow,

    /// How often standalone mode checks its file for changes.
    #[arg(long, env = "TIDEPOOL_RELOAD_INTERVAL", default_value = "1s", value_parser = duration)]
    pub reload_interval: Duration,

    /// With `--operator`: the node this agent runs on (the downward API's
    /// `spec.nodeName`).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// With `--operator`: this agent's pod name, for the operator's logs.
    #[arg(long, env = "POD_NAME", default_value = "")]
    pub pod_name: String,

    /// With an `https://` operator: the projected ServiceAccount token
    /// (audience `control.tidepool.dev`) sent to the operator; read at
    /// every dial.
    #[arg(long, env = "TIDEPOOL_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// With an `https://` operator: the operator's CA bundle (PEM), read at
    /// every dial.
    #[arg(long, env = "TIDEPOOL_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,

    /// The name the operator's certificate must carry (`<svc>.<ns>.svc`);
    /// the operator URL's host when unset.
    #[arg(long, env = "TIDEPOOL_OPERATOR_SERVER_NAME")]
    pub operator_server_name: Option<String>,

    /// Allow an `http://` operator URL: plain text, no token sent. For
    /// in-process tests and benchmarks against `--insecure-control`
    /// operators only.
    #[arg(long, env = "TIDEPOOL_INSECURE_CONTROL", default_value_t = false, action = clap::ArgAction::Set)]
    pub insecure_control: bool,

    /// Threads that run the proxy; 0 for one per CPU. With 1 (the
    /// default) the agent runs on tokio's current-thread scheduler: no
    /// cross-thread wake-ups, which on a 2-core node cost the work-stealing
    /// scheduler 20–40% more CPU per RPC at the same or lower throughput
    /// (the peer benchmark in `docs/benchmarks.md`). Raise it on nodes
    /// where the agent's own process saturates one core.
    #[arg(long, env = "TIDEPOOL_WORKER_THREADS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(0..=1024))]
    pub worker_threads: u16,

    /// Log format.
    #[arg(long, env = "TIDEPOOL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// What to log: a level (`trace`, `debug`, `info`, `warn`, `error`,
    /// `off`) or `target=level` directives (`tidepool_agent=debug,h2=warn`).
    /// A value that is not one is refused at start.
    #[arg(long = "log", env = "TIDEPOOL_LOG", default_value = "info", value_parser = log_filter)]
    pub log_filter: String,
}

/// The flags that choose where pools come from; exactly one is required.
/// Another source (the operator) is one more field here and one more
/// [`Mode`] variant.
#[derive(Debug, ClapArgs)]
#[group(required = true, multiple = false)]
pub struct ModeArgs {
    /// Run without Kubernetes: read ConnectionPool manifests (with static
    /// `spec.target.addresses`) from this YAML file and reload it when it
    /// changes.
    #[arg(long, env = "TIDEPOOL_STANDALONE", value_name = "FILE")]
    pub standalone: Option<PathBuf>,

    /// Run under Kubernetes: take pools from the operator's control service
    /// at this URL (such as `http://tidepool-operator.tidepool-system:15010`).
    #[arg(long, env = "TIDEPOOL_OPERATOR", value_name = "URL")]
    pub operator: Option<String>,
}

/// Where the agent's pools come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// Pools from the operator's control stream.
    Operator {
        /// The operator's control URL.
        url: String,
        /// TLS and the token (`None`: `--insecure-control`).
        security: Option<ClientSecurity>,
        /// The node this agent runs on.
        node: String,
        /// This agent's pod name.
        pod: String,
    },
    /// ConnectionPool manifests in a file, reloaded on change.
    Standalone {
        /// The manifest file.
        file: PathBuf,
        /// How often the file is checked for changes.
        reload_interval: Duration,
    },
}

/// How the proxy serves its listeners.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// SETTINGS_MAX_CONCURRENT_STREAMS offered to clients.
    pub max_concurrent_streams: u32,
    /// Limit for reading a client's HTTP/2 preface before the connection is
    /// dropped.
    pub preface_timeout: Duration,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 1024,
            preface_timeout: Duration::from_secs(10),
        }
    }
}

/// The agent's configuration, checked and typed.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where pools come from.
    pub mode: Mode,
    /// The shared proxy listener.
    pub listen: SocketAddr,
    /// The admin listener.
    pub admin_listen: SocketAddr,
    /// How long SIGTERM keeps accepting before the drain.
    pub drain_delay: Duration,
    /// How long SIGTERM waits for open streams.
    pub drain_timeout: Duration,
    /// Listener settings.
    pub proxy: ProxyOptions,
    /// How backend connections are made.
    pub connector: H2Connector,
    /// The window pools observe their addresses over.
    pub observe_window: ObserveWindow,
    /// Runtime worker threads; `None` for one per CPU.
    pub worker_threads: Option<usize>,
    /// Log format.
    pub log_format: LogFormat,
    /// The log filter, checked ([`tidepool_common::log::check_log_filter`]).
    pub log_filter: String,
}

/// How the control client proves who it is and checks who it talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSecurity {
    /// The projected ServiceAccount token, read at every dial.
    pub token_file: PathBuf,
    /// The operator's CA bundle (PEM), read at every dial.
    pub ca_file: PathBuf,
    /// The name the operator's certificate must carry, whatever address is
    /// dialed (`<svc>.<ns>.svc`).
    pub server_name: String,
}

/// A configuration clap could not check by itself.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No source of pools was given.
    #[error(
        "no source of pools: pass --standalone FILE (TIDEPOOL_STANDALONE) or --operator URL (TIDEPOOL_OPERATOR)"
    )]
    NoMode,
    /// `--operator` without a node name.
    #[error(
        "--operator needs the node's name: pass --node-name or set NODE_NAME (the downward API's spec.nodeName)"
    )]
    NoNodeName,
    /// A plain-text operator URL without `--insecure-control`.
    #[error(
        "--operator {0:?} is plain text: use https:// (with --token-file and --ca-file), or pass --insecure-control for a test operator started with it"
    )]
    Plaintext(String),
    /// An operator URL that is neither `https://` nor `http://`.
    #[error(
        "--operator {0:?}: expected an https:// URL such as https://tidepool-operator.tidepool.svc:15010"
    )]
    BadScheme(String),
    /// TLS without one of its files.
    #[error("--operator {url:?} is TLS and needs {flag}")]
    Missing {
        /// The URL.
        url: String,
        /// The missing flag and variable.
        flag: &'static str,
    },
    /// `--max-concurrent-streams` was zero.
    #[error("--max-concurrent-streams (TIDEPOOL_MAX_CONCURRENT_STREAMS) = 0: must be at least 1")]
    ZeroStreams,
}

impl Config {
    /// Checks parsed flags and builds the configuration.
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let mode = match (args.mode.standalone, args.mode.operator) {
            (_, Some(url)) => Mode::Operator {
                node: args
                    .node_name
                    .filter(|n| !n.is_empty())
                    .ok_or(ConfigError::NoNodeName)?,
                security: client_security(
                    &url,
                    args.token_file,
                    args.ca_file,
                    args.operator_server_name,
                    args.insecure_control,
                )?,
                url,
                pod: args.pod_name,
            },
            (Some(file), None) => Mode::Standalone {
                file,
                reload_interval: args.reload_interval,
            },
            (None, None) => return Err(ConfigError::NoMode),
        };
        if args.max_concurrent_streams == 0 {
            return Err(ConfigError::ZeroStreams);
        }
        Ok(Self {
            mode,
            listen: args.listen,
            admin_listen: args.admin_listen,
            drain_delay: args.drain_delay,
            drain_timeout: args.drain_timeout,
            proxy: ProxyOptions {
                max_concurrent_streams: args.max_concurrent_streams,
                ..ProxyOptions::default()
            },
            connector: H2Connector {
                connect_timeout: args.connect_timeout,
                keepalive_interval: args.keepalive_interval,
                keepalive_timeout: args.keepalive_timeout,
            },
            observe_window: args.observe_window,
            worker_threads: (args.worker_threads > 0).then(|| usize::from(args.worker_threads)),
            log_format: args.log_format,
            log_filter: args.log_filter,
        })
    }
}

/// Parses `--observe-window` (`TIDEPOOL_OBSERVE_WINDOW`): a duration
/// between [`ObserveWindow::MIN`] and [`ObserveWindow::MAX`].
fn observe_window(s: &str) -> Result<ObserveWindow, String> {
    ObserveWindow::new(duration(s)?).map_err(|_| {
        format!("TIDEPOOL_OBSERVE_WINDOW {s:?} is out of range: it must be between 10s and 24h")
    })
}

/// The control client's TLS settings for `url`.
fn client_security(
    url: &str,
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    server_name: Option<String>,
    insecure: bool,
) -> Result<Option<ClientSecurity>, ConfigError> {
    if url.starts_with("http://") {
        return if insecure {
            Ok(None)
        } else {
            Err(ConfigError::Plaintext(url.into()))
        };
    }
    let Some(rest) = url.strip_prefix("https://") else {
        return Err(ConfigError::BadScheme(url.into()));
    };
    let missing = |flag| ConfigError::Missing {
        url: url.into(),
        flag,
    };
    let token_file = token_file.ok_or_else(|| missing("--token-file (TIDEPOOL_TOKEN_FILE)"))?;
    let ca_file = ca_file.ok_or_else(|| missing("--ca-file (TIDEPOOL_CA_FILE)"))?;
    let host = rest
        .split(['/', '?'])
        .next()
        .unwrap_or_default()
        .rsplit_once(':')
        .map_or(rest, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let server_name = server_name
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| host.to_string());
    if server_name.is_empty() {
        return Err(missing(
            "--operator-server-name (TIDEPOOL_OPERATOR_SERVER_NAME)",
        ));
    }
    Ok(Some(ClientSecurity {
        token_file,
        ca_file,
        server_name,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standalone_mode_with_defaults() {
        let args = Args::try_parse_from(["tidepool-agent", "--standalone", "pools.yaml"]).unwrap();
        let config = Config::from_args(args).unwrap();
        assert_eq!(
            config.mode,
            Mode::Standalone {
                file: "pools.yaml".into(),
                reload_interval: Duration::from_secs(1)
            }
        );
        assert_eq!(config.listen.port(), 15000);
        assert_eq!(config.drain_timeout, Duration::from_secs(30));
    }

    #[test]
    fn a_bad_duration_names_the_flag_and_the_value() {
        let err = Args::try_parse_from([
            "tidepool-agent",
            "--standalone",
            "p.yaml",
            "--drain-timeout",
            "soon",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("--drain-timeout") && err.contains("soon"),
            "{err}"
        );
    }

    #[test]
    fn the_observe_window_is_a_duration_from_ten_seconds_to_a_day() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["tidepool-agent", "--standalone", "p.yaml"];
            argv.extend_from_slice(extra);
            Args::try_parse_from(argv)
        };
        let config = Config::from_args(parse(&[]).unwrap()).unwrap();
        assert_eq!(config.observe_window.length(), Duration::from_secs(600));
        let args = parse(&["--observe-window", "20s"]).unwrap();
        assert_eq!(args.observe_window.length(), Duration::from_secs(20));
        assert_eq!(
            parse(&["--observe-window", "24h"])
                .unwrap()
                .observe_window
                .length(),
            Duration::from_secs(86_400)
        );
        for bad in ["9s", "25h", "0s", "soon"] {
            let err = parse(&["--observe-window", bad]).unwrap_err().to_string();
            assert!(
                err.contains("--observe-window") && err.contains(bad),
                "{bad}: {err}"
            );
            if bad != "soon" {
                assert!(err.contains("between 10s and 24h"), "{err}");
            }
        }
    }

    #[test]
    fn the_operator_url_must_be_tls_with_its_files() {
        let parse = |argv: &[&str]| {
            let mut all = vec!["tidepool-agent", "--node-name", "n1"];
            all.extend_from_slice(argv);
            Config::from_args(Args::try_parse_from(all).unwrap())
        };
        let err = parse(&["--operator", "http://op:15010"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("plain text") && err.contains("--insecure-control"),
            "{err}"
        );
        assert!(matches!(
            parse(&[
                "--operator",
                "http://op:15010",
                "--insecure-control",
                "true"
            ])
            .unwrap()
            .mode,
            Mode::Operator { security: None, .. }
        ));
        let err = parse(&["--operator", "grpc://op"]).unwrap_err().to_string();
        assert!(err.contains("https://"), "{err}");
        let err = parse(&["--operator", "https://op.ns.svc:15010"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--token-file"), "{err}");
        let err = parse(&[
            "--operator",
            "https://op.ns.svc:15010",
            "--token-file",
            "/t",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("--ca-file"), "{err}");
        // The server name is the URL's host unless given.
        for (url, name) in [
            ("https://op.ns.svc:15010", None),
            ("https://127.0.0.1:15010", Some("op.ns.svc")),
        ] {
            let mut argv = vec!["--operator", url, "--token-file", "/t", "--ca-file", "/c"];
            if let Some(n) = name {
                argv.extend(["--operator-server-name", n]);
            }
            let Mode::Operator {
                security: Some(s), ..
            } = parse(&argv).unwrap().mode
            else {
                panic!("TLS expected for {url}")
            };
            assert_eq!(s.server_name, "op.ns.svc", "{url}");
        }
    }

    #[test]
    fn a_source_of_pools_is_required() {
        assert!(Args::try_parse_from(["tidepool-agent"]).is_err());
    }

    #[test]
    fn a_bad_log_level_is_refused_naming_it() {
        let err = Args::try_parse_from([
            "tidepool-agent",
            "--standalone",
            "p.yaml",
            "--log",
            "verbose",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("--log") && err.contains("TIDEPOOL_LOG") && err.contains("\"verbose\""),
            "{err}"
        );
        let ok = Args::try_parse_from([
            "tidepool-agent",
            "--standalone",
            "p.yaml",
            "--log",
            "tidepool_agent=debug,warn",
        ])
        .unwrap();
        assert_eq!(ok.log_filter, "tidepool_agent=debug,warn");
    }
}
