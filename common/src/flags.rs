//! Value parsers for `clap` flags the agent and the operator both take.
//! clap puts the flag's name in front of the message, so each message says
//! what the value is and what would be accepted.

use std::time::Duration;

use tidepool_crds::validate::parse_duration;

use crate::log::check_log_filter;

/// Parses a flag's Go-style duration (`500ms`, `30s`, `1m30s`), the syntax
/// ConnectionPool fields use.
pub fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s).ok_or_else(|| format!("{s:?} is not a duration such as 500ms, 30s or 1m30s"))
}

/// Checks a `--log` (`TIDEPOOL_LOG`) filter; the message names the
/// variable as well, since the chart sets it there.
pub fn log_filter(s: &str) -> Result<String, String> {
    check_log_filter(s)
        .map(|()| s.to_string())
        .map_err(|e| format!("TIDEPOOL_LOG {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_duration_names_the_value_and_the_accepted_form() {
        assert_eq!(duration("1m30s"), Ok(Duration::from_secs(90)));
        let err = duration("soon").unwrap_err();
        assert_eq!(
            err,
            "\"soon\" is not a duration such as 500ms, 30s or 1m30s"
        );
    }

    #[test]
    fn a_bad_log_filter_names_the_variable() {
        assert_eq!(log_filter("debug").as_deref(), Ok("debug"));
        let err = log_filter("verbose").unwrap_err();
        assert!(err.starts_with("TIDEPOOL_LOG \"verbose\""), "{err}");
    }
}
