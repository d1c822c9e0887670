//! Webhooks: one signed `POST` of a job's view to its `callback_url` when
//! the job ends (succeeded, failed or cancelled).
//!
//! Request: the job view as JSON (the body of `GET /v1/jobs/{id}` without
//! `webhook`), with
//!
//! - `X-Dig-Event: job.succeeded` (`job.failed`, `job.cancelled`);
//! - `X-Dig-Delivery: ID`, the same on every attempt (the job's id);
//! - `X-Dig-Signature: sha256=HEX`, the HMAC-SHA256 of the body's bytes
//!   under the tenant's webhook secret ([`WebhookSecrets`], the file of
//!   `api.webhook_secrets_file`); receivers recompute it and compare in
//!   constant time.
//!
//! A 2xx answer delivers it. Any other answer, a redirect included, or no
//! answer within the timeout, is a failed attempt; the next one follows
//! after a pause that doubles from `api.webhook_backoff_ms` (at most 10
//! minutes) until `api.webhook_max_attempts` attempts have failed, when the
//! webhook is given up (`"state": "failed"`). The state shows in
//! `GET /v1/jobs/{id}` as `"webhook": {"url", "state", "attempts", "last_error"}`.
//!
//! Where it runs: [`Deliverer::run`], inside every `digctl api` (and
//! `standalone`) process. Everything it needs is in the progress store
//! (Redis): the webhook entry is written with the job, becomes due when the
//! job reaches a final state, and a sender claims it for a lease
//! ([`ProgressStore::claim_webhooks`]) so that one API replica sends it,
//! whichever. The schedule survives restarts; a sender that dies during an
//! attempt leaves the webhook to be claimed again when its lease ends.
//!
//! Batches (`POST /v1/batches` with a `callback_url`) have a webhook too,
//! kept under the batch's id: the batch is watched in the progress store,
//! a deliverer built [`Deliverer::with_batches`] looks every
//! [`BATCH_CHECK_INTERVAL`] whether each watched batch has ended and then
//! makes its webhook due; the body is the batch's view without its per-job
//! list, the event `batch.succeeded` (`batch.failed`, `batch.cancelled`).
//!
//! Semantics: **at least once**. A receiver may see the same delivery twice
//! (a sender died after the receiver answered, or the answer was lost) and
//! must deduplicate by `X-Dig-Delivery`. Every attempt sends the same bytes:
//! the body is fixed in the store at the first attempt.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use dig_common::job::JobState;
use dig_common::layout::ObjectLayout;
use dig_common::progress::{now_ms, ProgressStore, WebhookAttempt, WebhookClaim};
use hmac::{Hmac, Mac};
use object_store::ObjectStore;
use sha2::Sha256;
use tokio::sync::watch;

use crate::tenants::{is_valid_tenant, TenantsError};

/// The shortest secret accepted: shorter ones are guessable.
pub const MIN_SECRET_LEN: usize = 16;

/// Tenant → webhook signing secret, from a file of `TENANT SECRET` lines.
#[derive(Clone, Default)]
pub struct WebhookSecrets {
    by_tenant: Arc<HashMap<String, String>>,
}

// Never prints a secret.
impl std::fmt::Debug for WebhookSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut tenants: Vec<&String> = self.by_tenant.keys().collect();
        tenants.sort();
        f.debug_struct("WebhookSecrets")
            .field("tenants", &tenants)
            .finish()
    }
}

impl WebhookSecrets {
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TenantsError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| TenantsError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// One `TENANT SECRET` per line (the secret: at least
    /// [`MIN_SECRET_LEN`] visible characters, no spaces); `#` comments and
    /// blank lines allowed; one secret per tenant.
    pub fn parse(text: &str) -> Result<Self, TenantsError> {
        let mut by_tenant = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let content = raw.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let err = |message: String| TenantsError::Line { line, message };
            let fields: Vec<&str> = content.split_whitespace().collect();
            let [tenant, secret] = fields[..] else {
                return Err(err(format!(
                    "expected 'TENANT SECRET', found {} fields",
                    fields.len()
                )));
            };
            if !is_valid_tenant(tenant) {
                return Err(err(format!("invalid tenant name '{tenant}'")));
            }
            if secret.len() < MIN_SECRET_LEN {
                return Err(err(format!(
                    "the secret of {tenant} is shorter than {MIN_SECRET_LEN} characters"
                )));
            }
            if by_tenant
                .insert(tenant.to_string(), secret.to_string())
                .is_some()
            {
                return Err(err(format!("a second secret for {tenant}")));
            }
        }
        Ok(WebhookSecrets {
            by_tenant: Arc::new(by_tenant),
        })
    }

    /// The tenant's secret.
    pub fn get(&self, tenant: &str) -> Option<&str> {
        self.by_tenant.get(tenant).map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.by_tenant.is_empty()
    }
}

/// `sha256=HEX`: the `X-Dig-Signature` of `body` under `secret`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// How webhooks are sent.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// Attempts before a webhook is given up (at least 1).
    pub max_attempts: u32,
    /// Pause after the first failed attempt; doubles after each further one.
    pub backoff: Duration,
    /// The longest pause.
    pub max_backoff: Duration,
    /// Time for one attempt: connect, send, answer.
    pub timeout: Duration,
    /// How often due webhooks are looked for.
    pub poll: Duration,
    /// Most webhooks claimed (and sent concurrently) per look.
    pub batch: usize,
    /// Whether webhooks may go to loopback, private and link-local
    /// addresses (`api.webhook_allow_private`; off: such URLs are refused
    /// and names resolving only to them fail).
    pub allow_private: bool,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        WebhookSettings {
            max_attempts: 12,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(600),
            timeout: Duration::from_secs(10),
            poll: Duration::from_millis(500),
            batch: 32,
            allow_private: false,
        }
    }
}

impl WebhookSettings {
    /// The pause after failed attempt `attempt` (from 1).
    pub fn pause_after(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(30);
        self.backoff
            .saturating_mul(1u32 << doublings)
            .min(self.max_backoff)
    }

    /// How long a claim holds a webhook: an attempt's timeout and then some,
    /// so that a live sender always reports before another may claim it.
    pub fn lease(&self) -> Duration {
        self.timeout + Duration::from_secs(30)
    }
}

fn state_word(state: JobState) -> &'static str {
    match state {
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

/// Sends due webhooks; see the module documentation.
pub struct Deliverer {
    progress: Arc<dyn ProgressStore>,
    secrets: WebhookSecrets,
    settings: WebhookSettings,
    client: reqwest::Client,
    /// Where batch records are, for batch webhooks ([`Deliverer::with_batches`]).
    batches: Option<(Arc<dyn ObjectStore>, ObjectLayout)>,
    /// When the watched batches were last looked at.
    batches_checked: std::sync::Mutex<Option<std::time::Instant>>,
}

/// How often a deliverer looks whether watched batches have ended.
pub const BATCH_CHECK_INTERVAL: Duration = Duration::from_secs(3);

impl Deliverer {
    pub fn new(
        progress: Arc<dyn ProgressStore>,
        secrets: WebhookSecrets,
        settings: WebhookSettings,
    ) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            // A redirect is a failed attempt: a POST must not wander off.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("dig-cluster-webhook/", env!("CARGO_PKG_VERSION")));
        let client = if settings.allow_private {
            client
        } else {
            client.dns_resolver(Arc::new(PublicOnly))
        }
        .build()?;
        Ok(Deliverer {
            progress,
            secrets,
            settings,
            client,
            batches: None,
            batches_checked: std::sync::Mutex::new(None),
        })
    }

    /// Also sends batch webhooks: looks every [`BATCH_CHECK_INTERVAL`]
    /// whether a watched batch (one submitted with a `callback_url`) has
    /// ended, then makes its webhook due; its body is the batch's view
    /// without the per-job list, its event `batch.succeeded` (`batch.failed`,
    /// `batch.cancelled`).
    pub fn with_batches(mut self, store: Arc<dyn ObjectStore>, layout: ObjectLayout) -> Self {
        self.batches = Some((store, layout));
        self
    }

    /// Makes the webhooks of watched batches that have ended due. Returns
    /// how many ended.
    pub async fn check_batches(&self) -> dig_common::Result<usize> {
        let Some((store, layout)) = &self.batches else {
            return Ok(0);
        };
        let mut ended = 0;
        for batch in self.progress.watched_batches().await? {
            match crate::batches::ended_body(store.as_ref(), layout, &self.progress, batch).await {
                Ok(Some(_)) => {
                    self.progress.batch_ended(batch).await?;
                    tracing::info!(%batch, "batch ended; its webhook is due");
                    ended += 1;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(%batch, error = %e, "cannot look at a watched batch"),
            }
        }
        Ok(ended)
    }

    /// Sends due webhooks every `poll` until `stop` turns true (or its
    /// sender is dropped); an attempt under way is finished first.
    pub async fn run(&self, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break,
                _ = tokio::time::sleep(self.settings.poll) => {}
            }
            let due = {
                let mut last = self.batches_checked.lock().expect("lock");
                let due = last.is_none_or(|t| t.elapsed() >= BATCH_CHECK_INTERVAL);
                if due {
                    *last = Some(std::time::Instant::now());
                }
                due
            };
            if due && self.batches.is_some() {
                if let Err(e) = self.check_batches().await {
                    tracing::warn!(error = %e, "cannot look at the watched batches");
                }
            }
            loop {
                match self.deliver_due().await {
                    // A full batch: more may be due.
                    Ok(n) if n >= self.settings.batch.max(1) && !*stop.borrow() => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot claim due webhooks; trying again");
                        break;
                    }
                }
            }
        }
        tracing::info!("webhook deliverer stopped");
    }

    /// One pass: claims the due webhooks (at most `batch`) and makes one
    /// attempt at each, concurrently. Returns how many were attempted.
    pub async fn deliver_due(&self) -> dig_common::Result<usize> {
        let now = now_ms();
        let lease_until = now + self.settings.lease().as_millis() as u64;
        let claims = self
            .progress
            .claim_webhooks(now, lease_until, self.settings.batch.max(1))
            .await?;
        let n = claims.len();
        futures::future::join_all(claims.into_iter().map(|c| self.attempt(c))).await;
        Ok(n)
    }

    async fn attempt(&self, claim: WebhookClaim) {
        let job = claim.job;
        let outcome = self.send(&claim).await;
        let error_text;
        let record = match &outcome {
            Ok(()) => WebhookAttempt::Delivered,
            Err(e) if claim.attempt >= self.settings.max_attempts.max(1) => {
                error_text = e.clone();
                WebhookAttempt::GaveUp { error: &error_text }
            }
            Err(e) => {
                error_text = e.clone();
                let pause = self.settings.pause_after(claim.attempt);
                WebhookAttempt::Retry {
                    error: &error_text,
                    at_ms: now_ms() + pause.as_millis() as u64,
                }
            }
        };
        match &record {
            WebhookAttempt::Delivered => {
                tracing::info!(%job, attempt = claim.attempt, url = %claim.url, "webhook delivered")
            }
            WebhookAttempt::Retry { error, at_ms } => tracing::warn!(
                %job, attempt = claim.attempt, url = %claim.url, %error,
                retry_in_ms = at_ms.saturating_sub(now_ms()), "webhook attempt failed"
            ),
            WebhookAttempt::GaveUp { error } => tracing::error!(
                %job, attempts = claim.attempt, url = %claim.url, %error, "webhook given up"
            ),
        }
        if let Err(e) = self.progress.record_webhook_attempt(job, record).await {
            // The claim's lease runs out and the webhook is due again.
            tracing::warn!(%job, error = %e, "cannot record a webhook attempt");
        }
    }

    /// One attempt; the failure's description for `last_error`.
    async fn send(&self, claim: &WebhookClaim) -> Result<(), String> {
        let job = claim.job;
        let progress = self
            .progress
            .get(job)
            .await
            .map_err(|e| format!("cannot read the job: {e}"))?;
        // A job's webhook, or else a batch's (same id space, same store).
        let (tenant, event, fresh) = match (progress, &self.batches) {
            (Some(p), _) => {
                let view = crate::job_view(job, &p);
                let json = serde_json::to_string(&view).map_err(|e| e.to_string())?;
                (p.tenant, format!("job.{}", state_word(p.state)), json)
            }
            (None, Some((store, layout))) => {
                match crate::batches::ended_body(store.as_ref(), layout, &self.progress, job).await
                {
                    Ok(Some((body, state, tenant))) => {
                        (tenant, format!("batch.{}", state_word(state)), body)
                    }
                    Ok(None) => return Err(format!("batch {job} has not ended")),
                    Err(e) => return Err(e),
                }
            }
            (None, None) => return Err(format!("job {job} no longer exists")),
        };
        // URLs were checked at submission; the policy may have changed since.
        check_callback_url(&claim.url, self.settings.allow_private)?;
        let secret = self
            .secrets
            .get(&tenant)
            .ok_or_else(|| format!("no webhook secret is configured for tenant {tenant}"))?;
        let body = match &claim.body {
            Some(body) => body.clone(),
            None => self
                .progress
                .fix_webhook_body(job, &fresh)
                .await
                .map_err(|e| format!("cannot store the body: {e}"))?,
        };
        let response = self
            .client
            .post(&claim.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("X-Dig-Event", event)
            .header("X-Dig-Delivery", &claim.delivery)
            .header("X-Dig-Signature", signature(secret, body.as_bytes()))
            .body(body)
            .send()
            .await
            .map_err(describe)?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {status}"))
        }
    }
}

/// A request error as its innermost cause, e.g. "Connection refused (os error 111)".
fn describe(e: reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let mut cause: &dyn std::error::Error = &e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    format!("{what}: {cause}")
}

/// Checks a `callback_url`: an absolute http(s) URL with a host, at most
/// 2048 characters; the message names what is wrong.
pub fn check_callback_url(url: &str, allow_private: bool) -> Result<(), String> {
    if url.len() > 2048 {
        return Err("callback_url: at most 2048 characters".into());
    }
    let parsed =
        reqwest::Url::parse(url).map_err(|e| format!("callback_url: not a URL ({e}): {url:?}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "callback_url: must be an http:// or https:// URL, got scheme '{}'",
            parsed.scheme()
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("callback_url: no host in {url:?}"));
    }
    if !allow_private {
        let local = match parsed.host() {
            Some(url::Host::Ipv4(ip)) => is_private(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => is_private(IpAddr::V6(ip)),
            Some(url::Host::Domain(d)) => {
                let d = d.trim_end_matches('.').to_ascii_lowercase();
                d == "localhost" || d.ends_with(".localhost")
            }
            None => false,
        };
        if local {
            return Err(format!(
                "callback_url: {} is a loopback, private or link-local address; webhooks \
                 go to public addresses only (operators may allow others with \
                 api.webhook_allow_private)",
                parsed.host_str().unwrap_or_default()
            ));
        }
    }
    Ok(())
}

/// Whether `ip` is not a public internet address: loopback, private
/// (RFC 1918, unique local), link-local (cloud metadata services live
/// there), shared (CGNAT), unspecified, broadcast or multicast. Webhooks
/// must not reach into the service's own network (SSRF).
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            a.is_loopback()
                || a.is_private()
                || a.is_link_local()
                || a.is_unspecified()
                || a.is_broadcast()
                || a.is_multicast()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
        }
        IpAddr::V6(a) => {
            let first = a.segments()[0];
            a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || a.to_ipv4_mapped()
                    .is_some_and(|v4| is_private(IpAddr::V4(v4)))
        }
    }
}

/// A resolver that drops non-public addresses ([`is_private`]), so that a
/// public name cannot point a webhook into the service's network; a name
/// with only such addresses fails to resolve.
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| !is_private(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(format!(
                    "{host} resolves to no public address (webhooks go to public addresses only; \
                     api.webhook_allow_private)"
                )
                .into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        let sig = signature("Jefe", b"what do ya want for nothing?");
        assert_eq!(
            sig,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn secrets_file_lines() {
        let s = WebhookSecrets::parse(
            "# c\nlab-a 0123456789abcdef  # note\n\nlab-b xxxxxxxxxxxxxxxxxxxx\n",
        )
        .unwrap();
        assert_eq!(s.get("lab-a"), Some("0123456789abcdef"));
        assert_eq!(s.get("lab-c"), None);
        assert!(!format!("{s:?}").contains("0123456789abcdef"));
        let e = WebhookSecrets::parse("lab-a short\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && e.contains("shorter than 16"), "{e}");
        let e = WebhookSecrets::parse("lab-a 0123456789abcdef\nlab-a 0123456789abcdef\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("second secret"), "{e}");
        let e = WebhookSecrets::parse("lab-a\n").unwrap_err().to_string();
        assert!(e.contains("TENANT SECRET"), "{e}");
    }

    #[test]
    fn callback_urls() {
        assert!(check_callback_url("https://lab.example.org/hooks/dig?x=1", false).is_ok());
        assert!(check_callback_url("http://127.0.0.1:9000/", true).is_ok());
        // Not to the service's own network unless allowed.
        for local in [
            "http://127.0.0.1:9000/",
            "http://10.1.2.3/",
            "http://192.168.0.7/",
            "http://172.20.0.1/",
            "http://169.254.169.254/latest/meta-data/",
            "http://100.64.0.1/",
            "http://0.0.0.0/",
            "http://[::1]/",
            "http://[fd00::1]/",
            "http://[fe80::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://localhost:8080/",
            "http://api.localhost/",
        ] {
            let e = check_callback_url(local, false).unwrap_err();
            assert!(e.contains("public addresses only"), "{local}: {e}");
            assert!(check_callback_url(local, true).is_ok(), "{local}");
        }
        for public in [
            "http://93.184.216.34/",
            "https://[2606:4700::1111]/",
            "http://172.32.0.1/",
        ] {
            assert!(check_callback_url(public, false).is_ok(), "{public}");
        }
        for bad in [
            "ftp://x.org/",
            "not a url",
            "/relative",
            "http://",
            "mailto:a@b.c",
        ] {
            assert!(check_callback_url(bad, true).is_err(), "{bad}");
        }
        let long = format!("https://x.org/{}", "a".repeat(2048));
        assert!(check_callback_url(&long, true)
            .unwrap_err()
            .contains("2048"));
    }

    #[test]
    fn pauses_double_up_to_the_cap() {
        let s = WebhookSettings::default();
        assert_eq!(s.pause_after(1), Duration::from_secs(1));
        assert_eq!(s.pause_after(2), Duration::from_secs(2));
        assert_eq!(s.pause_after(4), Duration::from_secs(8));
        assert_eq!(s.pause_after(20), Duration::from_secs(600));
        assert_eq!(s.pause_after(u32::MAX), Duration::from_secs(600));
    }
}
