//! Who may open a control stream: the agent's projected ServiceAccount
//! token, checked by a `TokenReview`.
//!
//! An agent sends `authorization: Bearer <token>`, a token the kubelet
//! projects into its pod with tidepool's audience. The operator accepts it
//! only when the API server says all of:
//! - the token is authenticated, for the control audience (the review asks
//!   for that audience, and the answer must list it);
//! - it is the agent ServiceAccount's (`system:serviceaccount:<ns>:<name>`):
//!   any pod author can request a token with any audience, so the audience
//!   alone proves nothing;
//! - it is bound to a pod on exactly one node
//!   (`authentication.kubernetes.io/node-name`), and that node is the one
//!   the Hello claims (checked by [`Identity::check_node`]).
//!
//! The node comes from the token, never from the agent's word. A refusal is
//! a [`Refusal`], each with its gRPC code and a metric label; a refusal's
//! message never contains the token.
//!
//! Reviews are bounded ([`Authenticator`] holds a semaphore) and successes
//! are cached by the token's SHA-256 until the token expires (or for the
//! cache TTL, if sooner, which bounds how long a revoked token still
//! works), so a storm of
//! reconnecting agents (after a leader failover) costs one review per agent
//! at most, and a second connection with the same token none.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};
use tokio::sync::Semaphore;
use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::metrics::AuthRefusal;

/// The user-info key the API server sets to the node of a pod-bound token.
pub const NODE_NAME_CLAIM: &str = "authentication.kubernetes.io/node-name";
/// The user-info key naming the bound pod.
pub const POD_NAME_CLAIM: &str = "authentication.kubernetes.io/pod-name";
/// The user-info key identifying the token (`JTI=…`), logged to tell
/// tokens apart without logging them.
pub const CREDENTIAL_ID_CLAIM: &str = "authentication.kubernetes.io/credential-id";

/// The longest `authorization` value accepted. Projected tokens are about
/// 1 KiB; a larger one is refused before any review is spent on it.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// How many cached reviews are kept at most. Each agent has one or two
/// live tokens; past this, expired ones are dropped, then all.
const CACHE_LIMIT: usize = 8192;

/// A review the API server could not give.
#[derive(Debug, thiserror::Error)]
#[error("the TokenReview failed: {0}")]
pub struct ReviewError(pub String);

/// A boxed future of a review.
pub type ReviewFuture<'a> =
    Pin<Box<dyn Future<Output = Result<TokenReviewStatus, ReviewError>> + Send + 'a>>;

/// Asks the API server about a token. The operator's is [`KubeReviewer`];
/// unit tests give canned answers.
pub trait TokenReviewer: Send + Sync + 'static {
    /// Reviews `token` for `audience`.
    fn review<'a>(&'a self, token: &'a str, audience: &'a str) -> ReviewFuture<'a>;
}

/// Reviews through the API server (`create tokenreviews`).
#[derive(Clone)]
pub struct KubeReviewer {
    api: Api<TokenReview>,
    timeout: Duration,
}

impl KubeReviewer {
    /// A reviewer on `client`, each call bounded by `timeout`.
    pub fn new(client: kube::Client, timeout: Duration) -> Self {
        Self {
            api: Api::all(client),
            timeout,
        }
    }
}

impl TokenReviewer for KubeReviewer {
    fn review<'a>(&'a self, token: &'a str, audience: &'a str) -> ReviewFuture<'a> {
        Box::pin(async move {
            let review = TokenReview {
                spec: TokenReviewSpec {
                    audiences: Some(vec![audience.to_string()]),
                    token: Some(token.to_string()),
                },
                ..TokenReview::default()
            };
            let created = tokio::time::timeout(
                self.timeout,
                self.api.create(&PostParams::default(), &review),
            )
            .await
            .map_err(|_| {
                ReviewError(format!(
                    "no answer from the API server within {:?}",
                    self.timeout
                ))
            })?
            .map_err(|e| ReviewError(e.to_string()))?;
            created
                .status
                .ok_or_else(|| ReviewError("the API server returned no status".into()))
        })
    }
}

/// Why a control stream was refused before its Hello was read, or at it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No `authorization` header.
    #[error(
        "no authorization header: the agent must send its projected ServiceAccount token (TIDEPOOL_TOKEN_FILE) as `authorization: Bearer <token>`"
    )]
    NoToken,
    /// More than one `authorization` header.
    #[error("{0} authorization headers: send exactly one")]
    ManyTokens(usize),
    /// A header that is not `Bearer <token>`, empty, or too long.
    #[error(
        "the authorization header {0}; expected `Bearer <token>` of at most {MAX_TOKEN_BYTES} bytes"
    )]
    Malformed(&'static str),
    /// The API server did not authenticate the token (bad, expired,
    /// revoked, or for another audience).
    #[error("the token was not accepted by the API server: {0}")]
    Unauthenticated(String),
    /// Authenticated, but the review does not list the control audience.
    #[error("the token is not for the audience {0:?}; the agent's projected token must request it")]
    WrongAudience(String),
    /// Authenticated, as someone other than the agent ServiceAccount.
    #[error("the token belongs to {user:?}, not the agent ServiceAccount {expected:?}")]
    NotAgent {
        /// Who the token is.
        user: String,
        /// Who it should be.
        expected: String,
    },
    /// The token is bound to no pod on a node (or to more than one node).
    #[error(
        "the token names no single node (claim {NODE_NAME_CLAIM}); use the kubelet-projected token of the agent pod, not an unbound one"
    )]
    NoNode,
    /// The Hello claims another node than the token's.
    #[error("the Hello claims node {claimed:?}, but the token is bound to a pod on node {token:?}")]
    NodeMismatch {
        /// The node in the Hello.
        claimed: String,
        /// The node in the token.
        token: String,
    },
    /// The review itself failed; the agent retries.
    #[error("the token could not be reviewed ({0}); retry")]
    ReviewFailed(String),
}

impl Refusal {
    /// The gRPC status the agent gets.
    pub fn status(&self) -> Status {
        let message = self.to_string();
        match self {
            Self::NoToken
            | Self::ManyTokens(_)
            | Self::Malformed(_)
            | Self::Unauthenticated(_)
            | Self::WrongAudience(_) => Status::unauthenticated(message),
            Self::NotAgent { .. } | Self::NoNode | Self::NodeMismatch { .. } => {
                Status::permission_denied(message)
            }
            Self::ReviewFailed(_) => Status::unavailable(message),
        }
    }

    /// The metric label (`reason`) of this refusal.
    pub fn reason(&self) -> AuthRefusal {
        match self {
            Self::NoToken => AuthRefusal::NoToken,
            Self::ManyTokens(_) | Self::Malformed(_) => AuthRefusal::Malformed,
            Self::Unauthenticated(_) => AuthRefusal::Unauthenticated,
            Self::WrongAudience(_) => AuthRefusal::WrongAudience,
            Self::NotAgent { .. } => AuthRefusal::WrongServiceAccount,
            Self::NoNode => AuthRefusal::NoNodeClaim,
            Self::NodeMismatch { .. } => AuthRefusal::NodeMismatch,
            Self::ReviewFailed(_) => AuthRefusal::ReviewFailed,
        }
    }
}

/// Who a reviewed token is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The node of the pod the token is bound to.
    pub node: String,
    /// That pod.
    pub pod: String,
    /// The token's id (`JTI=…`), when the API server gives one.
    pub credential: String,
    /// When the token expires (the JWT's `exp`), if it says.
    pub expires: Option<SystemTime>,
}

impl Identity {
    /// Checks the node a Hello claims against the token's.
    pub fn check_node(&self, claimed: &str) -> Result<(), Refusal> {
        if claimed == self.node {
            Ok(())
        } else {
            Err(Refusal::NodeMismatch {
                claimed: claimed.into(),
                token: self.node.clone(),
            })
        }
    }

    /// How long from `now` a session on this token may last.
    pub fn remaining(&self, now: SystemTime) -> Option<Duration> {
        self.expires
            .map(|e| e.duration_since(now).unwrap_or(Duration::ZERO))
    }
}

/// What the authenticator accepts.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// The audience agents' tokens are for.
    pub audience: String,
    /// The agent ServiceAccount's user name
    /// (`system:serviceaccount:<namespace>:<name>`).
    pub agent_user: String,
    /// Most reviews in flight at once.
    pub max_concurrent_reviews: usize,
    /// How long an accepted token is taken on trust without a new review
    /// (never past its expiry): bounds how long a revoked token (its pod
    /// deleted) still opens streams.
    pub cache_ttl: Duration,
}

/// Authenticates control streams: parses the header, reviews the token
/// (bounded, cached) and checks the answer.
pub struct Authenticator {
    config: AuthConfig,
    reviewer: Arc<dyn TokenReviewer>,
    reviews: Semaphore,
    /// Accepted tokens by SHA-256: their identity, and until when it is
    /// trusted (the token's expiry, or the cache TTL if sooner).
    cache: Mutex<HashMap<[u8; 32], (Identity, SystemTime)>>,
    /// Reviews in flight by token: a second stream with the same token
    /// waits for the first one's answer instead of asking again.
    inflight: Mutex<HashMap<[u8; 32], Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// How an authentication went, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Answered from the cache.
    Cached,
    /// A TokenReview was made.
    Reviewed,
}

impl Authenticator {
    /// An authenticator asking `reviewer`.
    pub fn new(config: AuthConfig, reviewer: Arc<dyn TokenReviewer>) -> Self {
        let permits = config.max_concurrent_reviews.max(1);
        Self {
            config,
            reviewer,
            reviews: Semaphore::new(permits),
            cache: Mutex::default(),
            inflight: Mutex::default(),
        }
    }

    /// What it accepts.
    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    /// Authenticates the stream whose request headers are `metadata`.
    pub async fn authenticate(
        &self,
        metadata: &MetadataMap,
    ) -> Result<(Identity, Lookup), Refusal> {
        let token = bearer(metadata)?;
        let key = digest(token);
        let now = SystemTime::now();
        if let Some(identity) = self.cached(&key, now) {
            return Ok((identity, Lookup::Cached));
        }
        let turn = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(inflight.entry(key).or_default())
        };
        let result = {
            let _turn = turn.lock().await;
            self.review(token, &key).await
        };
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if Arc::strong_count(&turn) <= 2 {
            inflight.remove(&key);
        }
        result
    }

    /// Reviews a token whose turn it is (no other review of it runs).
    async fn review(&self, token: &str, key: &[u8; 32]) -> Result<(Identity, Lookup), Refusal> {
        let status = {
            // The semaphore is never closed.
            let _permit = self
                .reviews
                .acquire()
                .await
                .map_err(|_| Refusal::ReviewFailed("the operator is stopping".into()))?;
            // Another stream with the same token may have been reviewed
            // while this one waited.
            if let Some(identity) = self.cached(key, SystemTime::now()) {
                return Ok((identity, Lookup::Cached));
            }
            self.reviewer
                .review(token, &self.config.audience)
                .await
                .map_err(|e| Refusal::ReviewFailed(e.0))?
        };
        let identity = self.judge(&status, jwt_expiry(token))?;
        self.remember(
            *key,
            identity.clone(),
            SystemTime::now() + self.config.cache_ttl,
        );
        Ok((identity, Lookup::Reviewed))
    }

    /// Checks a review's answer.
    pub fn judge(
        &self,
        status: &TokenReviewStatus,
        expires: Option<SystemTime>,
    ) -> Result<Identity, Refusal> {
        if status.authenticated != Some(true) {
            return Err(Refusal::Unauthenticated(
                status
                    .error
                    .clone()
                    .filter(|e| !e.is_empty())
                    .unwrap_or_else(|| "not authenticated".into()),
            ));
        }
        let audience = &self.config.audience;
        if !status
            .audiences
            .as_ref()
            .is_some_and(|a| a.iter().any(|x| x == audience))
        {
            return Err(Refusal::WrongAudience(audience.clone()));
        }
        let user = status.user.as_ref();
        let name = user.and_then(|u| u.username.clone()).unwrap_or_default();
        if name != self.config.agent_user {
            return Err(Refusal::NotAgent {
                user: name,
                expected: self.config.agent_user.clone(),
            });
        }
        let extra = user.and_then(|u| u.extra.as_ref());
        let claim = |key: &str| -> Option<String> {
            match extra.and_then(|e| e.get(key)).map(Vec::as_slice) {
                Some([one]) if !one.is_empty() => Some(one.clone()),
                _ => None,
            }
        };
        let node = claim(NODE_NAME_CLAIM).ok_or(Refusal::NoNode)?;
        let pod = claim(POD_NAME_CLAIM).ok_or(Refusal::NoNode)?;
        Ok(Identity {
            node,
            pod,
            credential: claim(CREDENTIAL_ID_CLAIM).unwrap_or_default(),
            expires,
        })
    }

    fn cached(&self, key: &[u8; 32], now: SystemTime) -> Option<Identity> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(key)
            .filter(|(_, until)| *until > now)
            .map(|(i, _)| i.clone())
    }

    /// Caches an accepted token until it expires or `until`, whichever is
    /// first (one with no expiry is not cached: every stream on it is
    /// reviewed).
    fn remember(&self, key: [u8; 32], identity: Identity, until: SystemTime) {
        let Some(expires) = identity.expires else {
            return;
        };
        let until = until.min(expires);
        let now = SystemTime::now();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_LIMIT {
            cache.retain(|_, (_, u)| *u > now);
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
        }
        cache.insert(key, (identity, until));
    }

    /// Tokens cached now.
    pub fn cached_tokens(&self) -> usize {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// The bearer token of a request, checked for shape.
pub fn bearer(metadata: &MetadataMap) -> Result<&str, Refusal> {
    let mut values = metadata.get_all("authorization").iter();
    let value = values.next().ok_or(Refusal::NoToken)?;
    let extra = values.count();
    if extra > 0 {
        return Err(Refusal::ManyTokens(extra + 1));
    }
    if value.len() > MAX_TOKEN_BYTES + "Bearer ".len() {
        return Err(Refusal::Malformed("is too long"));
    }
    let value = value
        .to_str()
        .map_err(|_| Refusal::Malformed("is not ASCII"))?;
    let token = value
        .strip_prefix("Bearer ")
        .ok_or(Refusal::Malformed("does not start with `Bearer `"))?
        .trim();
    if token.is_empty() {
        return Err(Refusal::Malformed("has an empty token"));
    }
    Ok(token)
}

fn digest(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(d.as_ref());
    key
}

/// The `exp` of a JWT, read from its payload without checking the
/// signature: it is used only after the API server accepted the token, to
/// end the session when the token does.
pub fn jwt_expiry(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    #[derive(serde::Deserialize)]
    struct Claims {
        exp: Option<u64>,
    }
    let claims: Claims = serde_json::from_slice(&bytes).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(claims.exp?))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use k8s_openapi::api::authentication::v1::UserInfo;
    use tonic::metadata::MetadataValue;

    use super::*;

    const AUD: &str = "control.tidepool.dev";
    const AGENT: &str = "system:serviceaccount:tidepool:tp-tidepool-agent";

    fn status(user: &str, audiences: &[&str], extra: &[(&str, &str)]) -> TokenReviewStatus {
        let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (k, v) in extra {
            map.entry((*k).into()).or_default().push((*v).into());
        }
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(audiences.iter().map(|a| (*a).into()).collect()),
            error: None,
            user: Some(UserInfo {
                username: Some(user.into()),
                extra: Some(map),
                ..UserInfo::default()
            }),
        }
    }

    fn good() -> TokenReviewStatus {
        status(
            AGENT,
            &[AUD],
            &[
                (NODE_NAME_CLAIM, "n1"),
                (POD_NAME_CLAIM, "agent-x"),
                (CREDENTIAL_ID_CLAIM, "JTI=abc"),
            ],
        )
    }

    /// Answers every review with one canned status, counting the calls.
    struct Canned {
        answer: Result<TokenReviewStatus, String>,
        calls: AtomicUsize,
        delay: Duration,
    }

    impl TokenReviewer for Canned {
        fn review<'a>(&'a self, _token: &'a str, audience: &'a str) -> ReviewFuture<'a> {
            assert_eq!(audience, AUD, "the review asks for the control audience");
            self.calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                tokio::time::sleep(self.delay).await;
                self.answer.clone().map_err(ReviewError)
            })
        }
    }

    fn auth(answer: Result<TokenReviewStatus, String>) -> (Authenticator, Arc<Canned>) {
        let canned = Arc::new(Canned {
            answer,
            calls: AtomicUsize::new(0),
            delay: Duration::from_millis(5),
        });
        let a = Authenticator::new(
            AuthConfig {
                audience: AUD.into(),
                agent_user: AGENT.into(),
                max_concurrent_reviews: 4,
                cache_ttl: Duration::from_secs(600),
            },
            canned.clone(),
        );
        (a, canned)
    }

    /// A JWT-shaped token (unsigned: only the API server checks the
    /// signature) expiring at `exp`.
    fn token(exp: u64, salt: &str) -> String {
        let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!(
            "{}.{}.sig",
            b(r#"{"alg":"RS256"}"#),
            b(&format!(r#"{{"exp":{exp},"sub":"{salt}"}}"#))
        )
    }

    fn in_an_hour() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600
    }

    fn headers(values: &[&str]) -> MetadataMap {
        let mut m = MetadataMap::new();
        for v in values {
            m.append("authorization", MetadataValue::try_from(*v).unwrap());
        }
        m
    }

    #[tokio::test]
    async fn a_good_token_yields_the_node_and_pod() {
        let (a, _) = auth(Ok(good()));
        let t = token(in_an_hour(), "a");
        let (id, how) = a
            .authenticate(&headers(&[&format!("Bearer {t}")]))
            .await
            .unwrap();
        assert_eq!((id.node.as_str(), id.pod.as_str()), ("n1", "agent-x"));
        assert_eq!(id.credential, "JTI=abc");
        assert_eq!(how, Lookup::Reviewed);
        assert!(id.check_node("n1").is_ok());
        let left = id.remaining(SystemTime::now()).unwrap();
        assert!(left > Duration::from_secs(3500) && left <= Duration::from_secs(3600));
    }

    #[tokio::test]
    async fn each_failed_check_has_its_code() {
        use tonic::Code;
        let cases: Vec<(TokenReviewStatus, Code, &str)> = vec![
            (
                TokenReviewStatus {
                    authenticated: Some(false),
                    error: Some("token has expired".into()),
                    ..TokenReviewStatus::default()
                },
                Code::Unauthenticated,
                "token has expired",
            ),
            (
                // A failed review carries no `authenticated` at all.
                TokenReviewStatus {
                    error: Some("invalid bearer token".into()),
                    ..TokenReviewStatus::default()
                },
                Code::Unauthenticated,
                "invalid bearer token",
            ),
            (
                status(
                    AGENT,
                    &["other"],
                    &[(NODE_NAME_CLAIM, "n1"), (POD_NAME_CLAIM, "p")],
                ),
                Code::Unauthenticated,
                "audience",
            ),
            (
                status(
                    "system:serviceaccount:shop:workload",
                    &[AUD],
                    &[(NODE_NAME_CLAIM, "n1"), (POD_NAME_CLAIM, "p")],
                ),
                Code::PermissionDenied,
                "system:serviceaccount:shop:workload",
            ),
            (
                status(AGENT, &[AUD], &[]),
                Code::PermissionDenied,
                NODE_NAME_CLAIM,
            ),
            (
                status(
                    AGENT,
                    &[AUD],
                    &[
                        (NODE_NAME_CLAIM, "n1"),
                        (NODE_NAME_CLAIM, "n2"),
                        (POD_NAME_CLAIM, "p"),
                    ],
                ),
                Code::PermissionDenied,
                "single node",
            ),
        ];
        for (answer, code, needle) in cases {
            let (a, _) = auth(Ok(answer.clone()));
            let t = token(in_an_hour(), "x");
            let refusal = a
                .authenticate(&headers(&[&format!("Bearer {t}")]))
                .await
                .unwrap_err();
            let s = refusal.status();
            assert_eq!(s.code(), code, "{answer:?}: {s:?}");
            assert!(s.message().contains(needle), "{s:?} should name {needle}");
            assert!(
                !s.message().contains(&t),
                "a refusal never echoes the token"
            );
        }
    }

    #[tokio::test]
    async fn a_failed_review_is_unavailable() {
        let (a, _) = auth(Err("connection refused".into()));
        let t = token(in_an_hour(), "x");
        let r = a
            .authenticate(&headers(&[&format!("Bearer {t}")]))
            .await
            .unwrap_err();
        assert_eq!(r.status().code(), tonic::Code::Unavailable);
        assert_eq!(r.reason().as_str(), "review_failed");
    }

    #[tokio::test]
    async fn bad_headers_are_refused_before_any_review() {
        let (a, canned) = auth(Ok(good()));
        let long = format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES + 1));
        for (h, reason) in [
            (vec![], "no_token"),
            (vec!["Basic dXNlcjpwdw=="], "malformed"),
            (vec!["Bearer "], "malformed"),
            (vec!["Bearer    "], "malformed"),
            (vec!["bearer abc"], "malformed"),
            (vec![long.as_str()], "malformed"),
            (vec!["Bearer a", "Bearer b"], "malformed"),
        ] {
            let r = a.authenticate(&headers(&h)).await.unwrap_err();
            assert_eq!(r.reason().as_str(), reason, "{h:?}");
            assert_eq!(r.status().code(), tonic::Code::Unauthenticated, "{h:?}");
        }
        assert_eq!(canned.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn the_node_of_the_hello_must_be_the_tokens() {
        let (a, _) = auth(Ok(good()));
        let t = token(in_an_hour(), "a");
        let (id, _) = a
            .authenticate(&headers(&[&format!("Bearer {t}")]))
            .await
            .unwrap();
        let r = id.check_node("n2").unwrap_err();
        assert_eq!(r.status().code(), tonic::Code::PermissionDenied);
        assert!(r.to_string().contains("\"n2\"") && r.to_string().contains("\"n1\""));
    }

    #[tokio::test]
    async fn a_storm_of_one_token_costs_one_review_and_expired_entries_are_not_used() {
        let (a, canned) = auth(Ok(good()));
        let a = Arc::new(a);
        let t = token(in_an_hour(), "storm");
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (a, h) = (a.clone(), format!("Bearer {t}"));
            tasks.push(tokio::spawn(async move {
                a.authenticate(&headers(&[&h])).await.map(|(i, _)| i.node)
            }));
        }
        for task in tasks {
            assert_eq!(task.await.unwrap().unwrap(), "n1");
        }
        assert_eq!(canned.calls.load(Ordering::SeqCst), 1);
        // A token that has expired is reviewed again, not served from the
        // cache (and the API server refuses it then).
        let past = token(1, "old");
        let _ = a.authenticate(&headers(&[&format!("Bearer {past}")])).await;
        let _ = a.authenticate(&headers(&[&format!("Bearer {past}")])).await;
        assert_eq!(canned.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn refusals_are_not_cached() {
        let (a, canned) = auth(Ok(status(AGENT, &[AUD], &[])));
        let t = token(in_an_hour(), "x");
        for _ in 0..3 {
            assert!(
                a.authenticate(&headers(&[&format!("Bearer {t}")]))
                    .await
                    .is_err()
            );
        }
        assert_eq!(canned.calls.load(Ordering::SeqCst), 3);
        assert_eq!(a.cached_tokens(), 0);
    }

    #[test]
    fn expiry_comes_from_the_payload_and_garbage_has_none() {
        assert_eq!(
            jwt_expiry(&token(1_900_000_000, "x")),
            Some(UNIX_EPOCH + Duration::from_secs(1_900_000_000))
        );
        for bad in ["", "abc", "a.b.c", "a.!!!.c", "a.e30.c"] {
            assert_eq!(jwt_expiry(bad), None, "{bad}");
        }
    }
}
