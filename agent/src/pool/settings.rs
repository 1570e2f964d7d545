//! Pool settings: go-micro's four knobs plus what tidepool adds.

use std::time::Duration;

/// What [`Pool::acquire`](super::Pool::acquire) does when an address has
/// `size` pooled connections and every one of them is at max-streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum WhenFull {
    /// Dial an unpooled connection for this one stream, as go-micro does. The
    /// connection joins the pool on release if there is room, otherwise it is
    /// closed. Counted in `overflow` and `cx_overflow`.
    #[default]
    Overflow,
    /// Queue the caller (FIFO, bounded by [`MAX_WAITERS`]) until a stream frees
    /// up or `acquire_timeout` passes, then fail with
    /// [`Error::Full`](super::Error::Full).
    Wait,
}

/// Most callers that may queue on one address. In [`WhenFull::Wait`] mode
/// one more is refused at once with [`Error::Full`](super::Error::Full)
/// (Envoy's default `max_pending_requests` is the same number); in
/// [`WhenFull::Overflow`] mode, where callers queue only for a dial in
/// flight, one more dials an overflow connection instead.
pub const MAX_WAITERS: usize = 1024;

/// How connections to every address of one pool are kept.
///
/// The first four fields keep go-micro's meanings (`PoolSize`, `PoolTTL`,
/// `PoolMaxIdle`, `PoolMaxStreams`), but out-of-range values are refused by
/// [`Settings::validate`] instead of being clamped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Settings {
    /// Connections kept per address (go-micro `PoolSize`).
    pub size: usize,
    /// A connection's lifetime (go-micro `PoolTTL`). Each connection gets
    /// ±10% jitter; past it the connection takes no new stream and closes when
    /// its last stream ends.
    pub ttl: Duration,
    /// Connections with no stream kept per address (go-micro `PoolMaxIdle`).
    pub max_idle: usize,
    /// Streams per connection (go-micro `PoolMaxStreams`); the effective cap
    /// is the smaller of this and the server's SETTINGS_MAX_CONCURRENT_STREAMS.
    pub max_streams: u32,
    /// What to do when an address is full.
    pub when_full: WhenFull,
    /// How long [`WhenFull::Wait`] queues a caller before giving up.
    pub acquire_timeout: Duration,
}

impl Default for Settings {
    /// go-micro's defaults: 100 connections, 1 minute, 50 idle, 20 streams;
    /// overflow when full, and a 1 s acquire timeout.
    fn default() -> Self {
        Self {
            size: 100,
            ttl: Duration::from_secs(60),
            max_idle: 50,
            max_streams: 20,
            when_full: WhenFull::Overflow,
            acquire_timeout: Duration::from_secs(1),
        }
    }
}

/// A setting outside its range. The message names the setting (by its
/// ConnectionPool field name), the value and what would be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid pool setting {setting} = {value}: {rule}")]
pub struct SettingsError {
    /// The setting's name as the ConnectionPool resource spells it.
    pub setting: &'static str,
    /// The refused value.
    pub value: String,
    /// What would be accepted.
    pub rule: &'static str,
}

impl Settings {
    /// Refuses out-of-range settings; nothing is clamped silently.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if self.size == 0 {
            return Err(refuse("size", self.size, "must be at least 1"));
        }
        if self.max_streams == 0 {
            return Err(refuse("maxStreams", self.max_streams, "must be at least 1"));
        }
        if self.max_idle > self.size {
            return Err(SettingsError {
                setting: "maxIdle",
                value: self.max_idle.to_string(),
                rule: "must not exceed size",
            });
        }
        if self.ttl.is_zero() {
            return Err(refuse("ttl", "0s", "must be greater than zero"));
        }
        if self.when_full == WhenFull::Wait && self.acquire_timeout.is_zero() {
            return Err(refuse(
                "acquireTimeout",
                "0s",
                "must be greater than zero when whenFull is Wait",
            ));
        }
        Ok(())
    }

    /// Builder-style helpers, mostly for tests: `Settings::default().size(2)`.
    pub fn size(mut self, size: usize) -> Self {
        self.size = size;
        self
    }
    /// Sets `ttl`.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }
    /// Sets `max_idle`.
    pub fn max_idle(mut self, max_idle: usize) -> Self {
        self.max_idle = max_idle;
        self
    }
    /// Sets `max_streams`.
    pub fn max_streams(mut self, max_streams: u32) -> Self {
        self.max_streams = max_streams;
        self
    }
    /// Sets `when_full`.
    pub fn when_full(mut self, when_full: WhenFull) -> Self {
        self.when_full = when_full;
        self
    }
    /// Sets `acquire_timeout`.
    pub fn acquire_timeout(mut self, acquire_timeout: Duration) -> Self {
        self.acquire_timeout = acquire_timeout;
        self
    }
}

fn refuse(setting: &'static str, value: impl ToString, rule: &'static str) -> SettingsError {
    SettingsError {
        setting,
        value: value.to_string(),
        rule,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_go_micros_and_valid() {
        let s = Settings::default();
        assert_eq!(
            (s.size, s.ttl.as_secs(), s.max_idle, s.max_streams),
            (100, 60, 50, 20)
        );
        assert_eq!(s.when_full, WhenFull::Overflow);
        assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn out_of_range_settings_are_refused_by_name() {
        let cases = [
            (Settings::default().size(0).max_idle(0), "size"),
            (Settings::default().max_streams(0), "maxStreams"),
            (Settings::default().size(2).max_idle(3), "maxIdle"),
            (Settings::default().ttl(Duration::ZERO), "ttl"),
            (
                Settings::default()
                    .when_full(WhenFull::Wait)
                    .acquire_timeout(Duration::ZERO),
                "acquireTimeout",
            ),
        ];
        for (settings, name) in cases {
            let err = settings.validate().unwrap_err();
            assert_eq!(err.setting, name);
            assert!(err.to_string().contains(name), "{err}");
        }
        // Zero idle is in range, and a zero timeout is fine in Overflow mode.
        assert!(
            Settings::default()
                .max_idle(0)
                .acquire_timeout(Duration::ZERO)
                .validate()
                .is_ok()
        );
    }
}
