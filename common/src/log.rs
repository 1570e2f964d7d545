//! Logging: the `--log-format` (`TIDEPOOL_LOG_FORMAT`) and `--log`
//! (`TIDEPOOL_LOG`) flags, and the `tracing` subscriber they set up.

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// A filter [`check_log_filter`] passed that `tracing` still refuses.
    #[error("TIDEPOOL_LOG {filter:?} is not a log filter")]
    Filter {
        /// The filter given.
        filter: String,
        /// What `tracing` said.
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
}

/// Installs the process's subscriber with the filter the configuration
/// checked (`--log`, `TIDEPOOL_LOG`); a filter `tracing` still cannot parse
/// fails the start with its value.
pub fn init_tracing(format: LogFormat, filter: &str) -> Result<(), LogError> {
    let env_filter = EnvFilter::try_new(filter).map_err(|source| LogError::Filter {
        filter: filter.to_string(),
        source,
    })?;
    let builder = tracing_subscriber::fmt().with_env_filter(env_filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

/// The levels a log filter may name.
const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Checks a log filter (`TIDEPOOL_LOG`, `--log`): comma-separated
/// directives, each a level (`debug`) or `target=level`
/// (`tidepool_agent=debug,h2=warn`). A bare word that is not a level is
/// refused: `tracing`'s own parser would read `verbose` as a target name and
/// silently log at its default level instead.
pub fn check_log_filter(s: &str) -> Result<(), String> {
    let accepted = format!(
        "must be a level ({}) or comma-separated target=level directives, such as info or tidepool_agent=debug,h2=warn",
        LOG_LEVELS.join(", ")
    );
    if s.trim().is_empty() {
        return Err(format!("{s:?} is empty: {accepted}"));
    }
    for directive in s.split(',').map(str::trim) {
        let level = match directive.rsplit_once('=') {
            Some((target, level)) if !target.is_empty() => level,
            _ => directive,
        };
        if !LOG_LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "{s:?}: {level:?} is not a log level; the filter {accepted}"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_filters_name_the_bad_level() {
        for good in [
            "info",
            "DEBUG",
            "off",
            "tidepool_agent=debug,h2=warn",
            "warn, tower=error",
        ] {
            assert_eq!(check_log_filter(good), Ok(()), "{good}");
        }
        for bad in [
            "verbose",
            "",
            "info,loud",
            "tidepool_agent=chatty",
            "=debug",
        ] {
            let err = check_log_filter(bad).unwrap_err();
            assert!(
                err.contains(&format!("{bad:?}")) && err.contains("trace, debug"),
                "{bad}: {err}"
            );
        }
    }
}
