//! The control stream's certificate authority, kept by the operator itself
//! (no cert-manager): a CA in a Secret only the operator reads, its public
//! half in a ConfigMap agents mount, and a short-lived serving certificate
//! per replica, issued in memory and never stored ([`crate::tls`]).
//!
//! # What the Secret holds
//!
//! | key | what |
//! | --- | --- |
//! | `ca.crt`, `ca.key` | the CA that signs serving certificates (PEM) |
//! | `next.crt`, `next.key` | during a key rollover, the CA that will sign next, already trusted |
//! | `previous.crt` | after a rollover, the CA that signed until then, still trusted |
//!
//! The ConfigMap's `ca.crt` is the bundle agents trust: every certificate of
//! the Secret, current first.
//!
//! # Lifecycle
//!
//! Every replica checks the Secret at start and then every
//! `check_interval`, and moves it on by [`plan`]:
//! - empty: a new CA (ECDSA P-256, ten years);
//! - less than [`RENEW_BEFORE`] left: the same key re-issued for another ten
//!   years (trust anchors are subject and key, so agents need no new
//!   bundle);
//! - the annotation `tidepool.dev/ca-rollover: requested` (set by a person):
//!   a new key is published as `next` and trusted beside the current one;
//!   after `overlap` (time for the ConfigMap to reach every agent) it
//!   becomes the signer and the old one stays trusted as `previous` for one
//!   serving-certificate lifetime, then is dropped.
//!
//! Writes carry the `resourceVersion` they read, so two replicas racing on
//! an empty Secret end with one CA: the loser's update is refused with 409
//! and it adopts what the winner wrote. A Secret holding something that is
//! not a CA is never overwritten: the operator refuses to start, naming the
//! Secret and the key.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ObjectMeta, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A CA's lifetime.
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// A CA with less than this left is re-issued from its key.
pub const RENEW_BEFORE: Duration = Duration::from_secs(365 * 24 * 3600);
/// The annotation a person sets (`requested`) to roll the CA's key over.
pub const ROLLOVER_ANNOTATION: &str = "tidepool.dev/ca-rollover";
/// When the current rollover phase began (Unix seconds), written by the
/// operator.
pub const PHASE_SINCE_ANNOTATION: &str = "tidepool.dev/ca-phase-since";
/// The key of the bundle in the ConfigMap and of the CA in the Secret.
pub const CA_CRT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const NEXT_CRT: &str = "next.crt";
const NEXT_KEY: &str = "next.key";
const PREVIOUS_CRT: &str = "previous.crt";
/// The CA certificate's common name.
const CA_NAME: &str = "tidepool control CA";

/// A CA problem, naming the object and key.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The Secret holds something that is not a CA.
    #[error(
        "Secret {namespace}/{secret} key {key:?} is not a usable CA ({reason}); fix or empty the Secret (the operator never mints a second CA over it)"
    )]
    Garbage {
        /// Its namespace.
        namespace: String,
        /// The Secret.
        secret: String,
        /// The key at fault.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// An API call failed.
    #[error("{verb} {kind} {namespace}/{name} failed: {source}")]
    Api {
        /// What was attempted.
        verb: &'static str,
        /// Secret or ConfigMap.
        kind: &'static str,
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The API error (boxed: it is large, and errors travel by value).
        #[source]
        source: Box<kube::Error>,
    },
    /// Generating or signing failed.
    #[error("generating the {what} failed: {source}")]
    Generate {
        /// What was generated.
        what: &'static str,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// rustls refused a key rcgen made.
    #[error("loading the serving key failed: {0}")]
    Key(#[source] rustls::Error),
    /// Writes kept conflicting.
    #[error("Secret {namespace}/{name} kept changing under the operator's writes; retrying later")]
    Contended {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn offset(unix: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(unix).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// Which half of a stored CA is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The certificate.
    Cert,
    /// The key.
    Key,
}

/// One CA: its certificate and key.
pub struct Authority {
    /// The certificate (PEM).
    pub cert_pem: String,
    key_pem: String,
    cert_der: CertificateDer<'static>,
    key: KeyPair,
    /// When the certificate expires (Unix seconds).
    pub not_after: i64,
    /// Its common name.
    name: String,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl PartialEq for Authority {
    fn eq(&self, other: &Self) -> bool {
        self.cert_pem == other.cert_pem && self.key_pem == other.key_pem
    }
}

/// A new CA's common name: [`CA_NAME`] and a random suffix, so two CAs (a
/// rollover's, or another install's) are told apart by name, in tools and
/// in verification ("unknown issuer" rather than "bad signature").
fn new_ca_name() -> String {
    format!("{CA_NAME} {:08x}", rand::random::<u32>())
}

fn ca_params(now: i64, name: &str) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "tidepool");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = offset(now - 3600);
    params.not_after = offset(now + secs(CA_LIFETIME));
    Ok(params)
}

impl Authority {
    /// A new CA with a new key.
    pub fn generate(now: i64) -> Result<Self, CaError> {
        let gen_err = |source| CaError::Generate { what: "CA", source };
        let key = KeyPair::generate().map_err(gen_err)?;
        let name = new_ca_name();
        let cert = ca_params(now, &name)
            .and_then(|p| p.self_signed(&key))
            .map_err(gen_err)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            key,
            not_after: now + secs(CA_LIFETIME),
            name,
        })
    }

    /// The same key with a fresh ten-year certificate.
    pub fn renewed(&self, now: i64) -> Result<Self, CaError> {
        let cert = ca_params(now, &self.name)
            .and_then(|p| p.self_signed(&self.key))
            .map_err(|source| CaError::Generate {
                what: "renewed CA",
                source,
            })?;
        Self::parse(&cert.pem(), &self.key_pem).map_err(|(_, reason)| CaError::Garbage {
            namespace: String::new(),
            secret: String::new(),
            key: CA_CRT,
            reason,
        })
    }

    /// Reads a stored CA; the error says what is wrong.
    pub fn parse(cert_pem: &str, key_pem: &str) -> Result<Self, (Part, String)> {
        let der = pem_certs(cert_pem)
            .map_err(|r| (Part::Cert, r))?
            .into_iter()
            .next()
            .ok_or((Part::Cert, "no CERTIFICATE block".to_string()))?;
        let (_, x509) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| (Part::Cert, format!("the certificate does not parse: {e}")))?;
        if !x509.is_ca() {
            return Err((
                Part::Cert,
                "the certificate is not a CA (basicConstraints CA:FALSE)".into(),
            ));
        }
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| (Part::Key, format!("the key does not parse: {e}")))?;
        if x509.public_key().subject_public_key.data.as_ref()
            != rcgen::PublicKeyData::der_bytes(&key)
        {
            return Err((Part::Key, "the key does not match the certificate".into()));
        }
        let not_after = x509.validity().not_after.timestamp();
        let name = x509
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or(CA_NAME)
            .to_string();
        Ok(Self {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            cert_der: der,
            key,
            not_after,
            name,
        })
    }

    /// Issues a serving certificate for `dns_names`, valid for `ttl` from
    /// `now` (an hour earlier too, for clock skew): the chain and its key.
    pub fn issue(
        &self,
        dns_names: &[String],
        ttl: Duration,
        now: i64,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let gen_err = |source| CaError::Generate {
            what: "serving certificate",
            source,
        };
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
        params.subject_alt_names = dns_names
            .iter()
            .map(|n| n.clone().try_into().map(SanType::DnsName).map_err(gen_err))
            .collect::<Result<_, _>>()?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            dns_names.first().cloned().unwrap_or_default(),
        );
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = offset(now - 3600);
        params.not_after = offset(now + secs(ttl));
        let issuer = Issuer::from_ca_cert_der(&self.cert_der, &self.key).map_err(gen_err)?;
        let cert = params.signed_by(&key, &issuer).map_err(gen_err)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((vec![cert.der().clone()], key))
    }
}

/// The certificates of a PEM text.
pub fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls_pki_types::pem::PemObject as _;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the PEM does not parse: {e}"))
}

/// What the Secret holds, read.
#[derive(Debug, PartialEq)]
pub struct Stored {
    /// The signer.
    pub current: Authority,
    /// The next signer, already trusted.
    pub next: Option<Authority>,
    /// The last signer, still trusted.
    pub previous: Option<String>,
    /// When the rollover phase began (Unix seconds).
    pub since: Option<i64>,
}

impl Stored {
    /// The bundle agents trust: current, next, previous.
    pub fn bundle(&self) -> String {
        let mut out = self.current.cert_pem.clone();
        for pem in self
            .next
            .as_ref()
            .map(|n| n.cert_pem.as_str())
            .into_iter()
            .chain(self.previous.as_deref())
        {
            if !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(pem);
        }
        out
    }
}

fn text(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .filter(|s| !s.trim().is_empty())
}

/// Reads the Secret: `None` when it holds no CA yet.
pub fn read(secret: &Secret) -> Result<Option<Stored>, (&'static str, String)> {
    let (Some(cert), key) = (text(secret, CA_CRT), text(secret, CA_KEY)) else {
        if text(secret, CA_KEY).is_some() {
            return Err((CA_CRT, "ca.key is set but ca.crt is empty".into()));
        }
        return Ok(None);
    };
    let key = key.ok_or((CA_KEY, "ca.crt is set but ca.key is empty".to_string()))?;
    let named = |crt, key| move |(part, r)| (if part == Part::Cert { crt } else { key }, r);
    let current = Authority::parse(&cert, &key).map_err(named(CA_CRT, CA_KEY))?;
    let next = match (text(secret, NEXT_CRT), text(secret, NEXT_KEY)) {
        (Some(c), Some(k)) => Some(Authority::parse(&c, &k).map_err(named(NEXT_CRT, NEXT_KEY))?),
        (None, None) => None,
        _ => {
            return Err((
                NEXT_CRT,
                "next.crt and next.key must be set together".into(),
            ));
        }
    };
    let previous = match text(secret, PREVIOUS_CRT) {
        Some(p) => {
            if pem_certs(&p).map_err(|r| (PREVIOUS_CRT, r))?.is_empty() {
                return Err((PREVIOUS_CRT, "no CERTIFICATE block".into()));
            }
            Some(p)
        }
        None => None,
    };
    let since = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(PHASE_SINCE_ANNOTATION))
        .and_then(|s| s.parse().ok());
    Ok(Some(Stored {
        current,
        next,
        previous,
        since,
    }))
}

/// The rollover timing.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long a new CA is trusted before it signs.
    pub overlap: Duration,
    /// How long the old CA stays trusted after (a serving certificate's
    /// lifetime: the last one it signed may still be served until then).
    pub retire_after: Duration,
}

/// A step of the CA's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A first CA.
    Created,
    /// The same key, a new certificate.
    Renewed,
    /// A next CA published beside the current one.
    NextPublished,
    /// The next CA signs; the old one stays trusted.
    Switched,
    /// The old CA is no longer trusted.
    Retired,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Created => "created the control CA",
            Self::Renewed => "renewed the control CA from its key",
            Self::NextPublished => "published the next control CA beside the current one",
            Self::Switched => "the next control CA now signs; the previous one stays trusted",
            Self::Retired => "retired the previous control CA",
        })
    }
}

/// What the Secret should hold next, and the step taken (`None` when it is
/// right as it is).
pub fn advance(
    stored: Option<Stored>,
    rollover_requested: bool,
    now: i64,
    timing: Timing,
) -> Result<(Stored, Option<Change>), CaError> {
    let Some(mut s) = stored else {
        let fresh = Stored {
            current: Authority::generate(now)?,
            next: None,
            previous: None,
            since: None,
        };
        return Ok((fresh, Some(Change::Created)));
    };
    let since = s.since.unwrap_or(0);
    if s.current.not_after - now < secs(RENEW_BEFORE) {
        s.current = s.current.renewed(now)?;
        return Ok((s, Some(Change::Renewed)));
    }
    if let Some(next) = s.next.take() {
        if now - since >= secs(timing.overlap) {
            s.previous = Some(std::mem::replace(&mut s.current, next).cert_pem);
            s.since = Some(now);
            return Ok((s, Some(Change::Switched)));
        }
        s.next = Some(next);
        return Ok((s, None));
    }
    if s.previous.is_some() && now - since >= secs(timing.retire_after) {
        s.previous = None;
        s.since = None;
        return Ok((s, Some(Change::Retired)));
    }
    if rollover_requested && s.previous.is_none() {
        s.next = Some(Authority::generate(now)?);
        s.since = Some(now);
        return Ok((s, Some(Change::NextPublished)));
    }
    Ok((s, None))
}

/// What the Secret should hold next and why, or `None` when it is right as
/// it is ([`advance`], for callers that only ask whether it moves).
pub fn plan(
    stored: Option<Stored>,
    rollover_requested: bool,
    now: i64,
    timing: Timing,
) -> Result<Option<(Stored, Change)>, CaError> {
    advance(stored, rollover_requested, now, timing).map(|(s, c)| c.map(|c| (s, c)))
}

/// Where the CA lives and how it moves.
#[derive(Debug, Clone)]
pub struct CaConfig {
    /// The namespace of both objects (the operator's).
    pub namespace: String,
    /// The Secret's name.
    pub secret: String,
    /// The ConfigMap's name.
    pub configmap: String,
    /// How often the Secret is checked.
    pub check_interval: Duration,
    /// Rollover timing.
    pub timing: Timing,
}

/// Keeps the CA: reads, creates, renews and rolls it, and publishes the
/// bundle.
pub struct Keeper {
    config: CaConfig,
    secrets: Api<Secret>,
    configmaps: Api<ConfigMap>,
}

impl std::fmt::Debug for Keeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keeper")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Keeper {
    /// A keeper of the objects `config` names.
    pub fn new(client: kube::Client, config: CaConfig) -> Self {
        Self {
            secrets: Api::namespaced(client.clone(), &config.namespace),
            configmaps: Api::namespaced(client, &config.namespace),
            config,
        }
    }

    fn api_err(
        &self,
        verb: &'static str,
        kind: &'static str,
        name: &str,
    ) -> impl Fn(kube::Error) -> CaError {
        let (namespace, name) = (self.config.namespace.clone(), name.to_string());
        move |source| CaError::Api {
            verb,
            kind,
            namespace: namespace.clone(),
            name: name.clone(),
            source: Box::new(source),
        }
    }

    /// Brings the Secret and the ConfigMap up to date once and returns the
    /// current signer.
    pub async fn sync(&self) -> Result<Arc<Authority>, CaError> {
        let name = &self.config.secret;
        for _ in 0..5 {
            let secret = match self
                .secrets
                .get_opt(name)
                .await
                .map_err(self.api_err("get", "Secret", name))?
            {
                Some(s) => s,
                None => {
                    // The chart creates it empty; a hand-run operator may
                    // create it (if RBAC lets it).
                    let fresh = Secret {
                        metadata: ObjectMeta {
                            name: Some(name.clone()),
                            ..ObjectMeta::default()
                        },
                        ..Secret::default()
                    };
                    match self.secrets.create(&PostParams::default(), &fresh).await {
                        Ok(s) => s,
                        Err(kube::Error::Api(e)) if e.code == 409 => continue,
                        Err(e) => return Err(self.api_err("create", "Secret", name)(e)),
                    }
                }
            };
            let stored = read(&secret).map_err(|(key, reason)| CaError::Garbage {
                namespace: self.config.namespace.clone(),
                secret: name.clone(),
                key,
                reason,
            })?;
            let requested = secret
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ROLLOVER_ANNOTATION))
                .is_some_and(|v| v == "requested");
            let (next, change) = advance(stored, requested, now_unix(), self.config.timing)?;
            let Some(change) = change else {
                // Unchanged: publish (idempotent) and serve it.
                self.publish(&next.bundle()).await?;
                return Ok(Arc::new(next.current));
            };
            let mut updated = secret.clone();
            write(&mut updated, &next, requested);
            match self
                .secrets
                .replace(name, &PostParams::default(), &updated)
                .await
            {
                Ok(_) => {
                    tracing::info!(secret = %name, not_after = next.current.not_after, "{change}");
                    self.publish(&next.bundle()).await?;
                    return Ok(Arc::new(next.current));
                }
                // Another replica wrote first: read what it wrote.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    tracing::debug!(secret = %name, "the CA Secret changed under this write; re-reading");
                }
                Err(e) => return Err(self.api_err("update", "Secret", name)(e)),
            }
        }
        Err(CaError::Contended {
            namespace: self.config.namespace.clone(),
            name: name.clone(),
        })
    }

    /// Makes the ConfigMap hold `bundle`.
    async fn publish(&self, bundle: &str) -> Result<(), CaError> {
        let name = &self.config.configmap;
        for _ in 0..5 {
            let existing = self.configmaps.get_opt(name).await.map_err(self.api_err(
                "get",
                "ConfigMap",
                name,
            ))?;
            let mut cm = existing.clone().unwrap_or_else(|| ConfigMap {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    ..ObjectMeta::default()
                },
                ..ConfigMap::default()
            });
            if cm
                .data
                .as_ref()
                .and_then(|d| d.get(CA_CRT))
                .map(String::as_str)
                == Some(bundle)
            {
                return Ok(());
            }
            cm.data
                .get_or_insert_with(BTreeMap::new)
                .insert(CA_CRT.into(), bundle.into());
            let result = if existing.is_some() {
                self.configmaps
                    .replace(name, &PostParams::default(), &cm)
                    .await
            } else {
                self.configmaps.create(&PostParams::default(), &cm).await
            };
            match result {
                Ok(_) => {
                    tracing::info!(configmap = %name, "published the control CA bundle");
                    return Ok(());
                }
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => {
                    let verb = if existing.is_some() {
                        "update"
                    } else {
                        "create"
                    };
                    return Err(self.api_err(verb, "ConfigMap", name)(e));
                }
            }
        }
        Err(CaError::Contended {
            namespace: self.config.namespace.clone(),
            name: name.clone(),
        })
    }

    /// Re-checks every `check_interval` until `stop`, sending each new
    /// signer. A failure is logged and the last good signer kept.
    pub async fn run(self, signer: watch::Sender<Arc<Authority>>, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.config.check_interval) => {}
            }
            match self.sync().await {
                Ok(current) => {
                    signer.send_if_modified(|s| {
                        if **s == *current {
                            false
                        } else {
                            *s = current;
                            true
                        }
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, "checking the control CA failed; the current one keeps signing")
                }
            }
        }
    }
}

/// Writes `stored` into the Secret's data and annotations.
fn write(secret: &mut Secret, stored: &Stored, clear_request: bool) {
    let mut data = BTreeMap::new();
    let mut put = |k: &str, v: &str| {
        data.insert(k.to_string(), ByteString(v.as_bytes().to_vec()));
    };
    put(CA_CRT, &stored.current.cert_pem);
    put(CA_KEY, &stored.current.key_pem);
    if let Some(n) = &stored.next {
        put(NEXT_CRT, &n.cert_pem);
        put(NEXT_KEY, &n.key_pem);
    }
    if let Some(p) = &stored.previous {
        put(PREVIOUS_CRT, p);
    }
    secret.data = Some(data);
    secret.string_data = None;
    let annotations = secret
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new);
    match stored.since {
        Some(t) => annotations.insert(PHASE_SINCE_ANNOTATION.into(), t.to_string()),
        None => annotations.remove(PHASE_SINCE_ANNOTATION),
    };
    if clear_request && stored.next.is_some() {
        annotations.remove(ROLLOVER_ANNOTATION);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timing = Timing {
        overlap: Duration::from_secs(600),
        retire_after: Duration::from_secs(86400),
    };

    fn secret_of(s: &Stored) -> Secret {
        let mut secret = Secret::default();
        write(&mut secret, s, true);
        secret
    }

    #[test]
    fn an_empty_secret_gets_a_ca_that_reads_back() {
        let s = plan(None, false, 1_000_000, T).unwrap().unwrap().0;
        let back = read(&secret_of(&s)).unwrap().unwrap();
        assert_eq!(back, s);
        assert_eq!(back.bundle(), s.current.cert_pem);
        // Nothing more to do.
        assert!(plan(Some(back), false, 1_000_100, T).unwrap().is_none());
    }

    #[test]
    fn garbage_names_the_key() {
        let mut secret = Secret {
            data: Some(BTreeMap::from([
                (CA_CRT.into(), ByteString(b"hello".to_vec())),
                (CA_KEY.into(), ByteString(b"world".to_vec())),
            ])),
            ..Secret::default()
        };
        let (key, reason) = read(&secret).unwrap_err();
        assert_eq!(key, CA_CRT);
        assert!(reason.contains("no CERTIFICATE block"), "{reason}");
        // A good certificate with a bad key names the key.
        let a = Authority::generate(0).unwrap();
        secret.data = Some(BTreeMap::from([
            (CA_CRT.into(), ByteString(a.cert_pem.clone().into_bytes())),
            (CA_KEY.into(), ByteString(b"world".to_vec())),
        ]));
        let (key, reason) = read(&secret).unwrap_err();
        assert_eq!(key, CA_KEY);
        assert!(reason.contains("key does not parse"), "{reason}");
        // A key without a certificate is not "empty": nothing is minted over it.
        let secret = Secret {
            data: Some(BTreeMap::from([(CA_KEY.into(), ByteString(b"k".to_vec()))])),
            ..Secret::default()
        };
        assert_eq!(read(&secret).unwrap_err().0, CA_CRT);
        // A certificate and a key that do not match.
        let a = Authority::generate(0).unwrap();
        let b = Authority::generate(0).unwrap();
        let secret = Secret {
            data: Some(BTreeMap::from([
                (CA_CRT.into(), ByteString(a.cert_pem.into_bytes())),
                (CA_KEY.into(), ByteString(b.key_pem.into_bytes())),
            ])),
            ..Secret::default()
        };
        let (key, reason) = read(&secret).unwrap_err();
        assert_eq!(key, CA_KEY);
        assert!(reason.contains("does not match"));
    }

    #[test]
    fn a_rollover_overlaps_then_switches_then_retires() {
        let start = 1_000_000;
        let s = plan(None, false, start, T).unwrap().unwrap().0;
        let old = s.current.cert_pem.clone();
        // Requested: a next CA, trusted beside the current one.
        let (s, c) = plan(Some(s), true, start + 10, T).unwrap().unwrap();
        assert_eq!(c, Change::NextPublished);
        let next = s.next.as_ref().unwrap().cert_pem.clone();
        assert_eq!(s.current.cert_pem, old);
        assert!(s.bundle().contains(&old) && s.bundle().contains(&next));
        // Within the overlap nothing moves (and a repeated request is moot).
        let s = read(&secret_of(&s)).unwrap().unwrap();
        assert!(
            plan(
                Some(read(&secret_of(&s)).unwrap().unwrap()),
                true,
                start + 500,
                T
            )
            .unwrap()
            .is_none()
        );
        // After it, the next signs and the old stays trusted.
        let (s, c) = plan(Some(s), false, start + 700, T).unwrap().unwrap();
        assert_eq!(c, Change::Switched);
        assert_eq!(s.current.cert_pem, next);
        assert_eq!(s.previous.as_deref(), Some(old.as_str()));
        assert!(s.next.is_none());
        assert!(s.bundle().starts_with(&next) && s.bundle().contains(&old));
        let s = read(&secret_of(&s)).unwrap().unwrap();
        assert!(
            plan(
                Some(read(&secret_of(&s)).unwrap().unwrap()),
                false,
                start + 700 + 3600,
                T
            )
            .unwrap()
            .is_none()
        );
        // After a serving certificate's lifetime, the old one goes.
        let (s, c) = plan(Some(s), false, start + 700 + 86400, T)
            .unwrap()
            .unwrap();
        assert_eq!(c, Change::Retired);
        assert!(s.previous.is_none());
        assert_eq!(s.bundle(), next);
    }

    #[test]
    fn a_ca_near_its_end_is_renewed_from_the_same_key() {
        let s = plan(None, false, 0, T).unwrap().unwrap().0;
        let later = s.current.not_after - secs(RENEW_BEFORE) + 1;
        let (r, c) = plan(
            Some(read(&secret_of(&s)).unwrap().unwrap()),
            false,
            later,
            T,
        )
        .unwrap()
        .unwrap();
        assert_eq!(c, Change::Renewed);
        assert_ne!(r.current.cert_pem, s.current.cert_pem);
        assert_eq!(r.current.key_pem, s.current.key_pem);
        assert_eq!(
            r.current.name, s.current.name,
            "a renewal keeps the subject"
        );
        assert!(r.current.not_after > s.current.not_after);
    }

    #[test]
    fn a_leaf_chains_to_the_ca_for_its_names() {
        use rustls::client::danger::ServerCertVerifier as _;
        let ca = Authority::generate(now_unix()).unwrap();
        let (chain, _key) = ca
            .issue(
                &["op.tidepool.svc".into()],
                Duration::from_secs(600),
                now_unix(),
            )
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der.clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let now = rustls_pki_types::UnixTime::now();
        let name = rustls_pki_types::ServerName::try_from("op.tidepool.svc").unwrap();
        verifier
            .verify_server_cert(&chain[0], &[], &name, &[], now)
            .unwrap();
        let other = rustls_pki_types::ServerName::try_from("evil.example").unwrap();
        assert!(
            verifier
                .verify_server_cert(&chain[0], &[], &other, &[], now)
                .is_err()
        );
    }
}
