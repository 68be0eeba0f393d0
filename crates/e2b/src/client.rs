//! The control-plane client: sandboxes and template builds over the E2B REST API.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, RequestBuilder, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use super::config::{
    ClientConfig, DEFAULT_DOMAIN, DEFAULT_SANDBOX_URL, RequestObserver, sandbox_base_url,
};
use super::envd::ENVD_PORT;
use super::envd_client::{EnvdClient, SandboxAccess};
use super::error::{Error, api_error};
use super::models::{
    BuildStatus, ConnectRequest, FileUploadLink, NewSandbox, Sandbox, SandboxDetail, SandboxState,
    Template, TemplateAlias, TemplateBuildInfo, TemplateBuildRequest, TemplateBuildRequested,
    TemplateBuildStart, TimeoutRequest,
};
use super::retry::{Verdict, classify_response, next_delay};
use super::secret::Secret;
use super::template::CopyLayer;

const API_KEY_HEADER: &str = "x-api-key";
const NEXT_TOKEN_HEADER: &str = "x-next-token";
const SHOULD_RETRY_HEADER: &str = "should-retry";
const RETRY_AFTER_HEADER: &str = "retry-after";
/// A control-plane error body larger than this is cut; only its message matters.
const MAX_ERROR_BODY: usize = 64 << 10;

/// Percent-encodes everything but RFC 3986's unreserved characters, so an ID or a name such
/// as `team/name:tag` stays a single path segment.
pub fn encode_path_segment(value: &str) -> String {
    percent_encode(value, |byte| {
        byte.is_ascii_alphanumeric() || b"-._~".contains(&byte)
    })
}

/// The `metadata` filter of a sandbox list, encoded like the SDK: each key and value is
/// percent-encoded (`/` kept), then the pairs are form-encoded into one query string, which
/// the HTTP layer encodes once more as the parameter's value.
pub fn metadata_query(metadata: &BTreeMap<String, String>) -> String {
    let quote = |text: &str| {
        percent_encode(text, |byte| {
            byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte)
        })
    };
    let form = |text: &str| {
        percent_encode(text, |byte| {
            byte.is_ascii_alphanumeric() || b"-._~".contains(&byte)
        })
    };
    metadata
        .iter()
        .map(|(key, value)| format!("{}={}", form(&quote(key)), form(&quote(value))))
        .collect::<Vec<_>>()
        .join("&")
}

fn percent_encode(value: &str, keep: impl Fn(u8) -> bool) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if keep(byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// What to create. The lifetime is mandatory because the service's default when it is left
/// out is only 15 seconds.
#[derive(Clone, Debug, PartialEq)]
pub struct SandboxSpec {
    /// Template ID or name.
    pub template: String,
    pub timeout: Duration,
    pub metadata: BTreeMap<String, String>,
    pub env_vars: BTreeMap<String, String>,
    /// Whether envd requires the access token the service then issues.
    pub secure: bool,
    pub allow_internet_access: Option<bool>,
    /// Addresses reachable whatever else is denied (E2B's `network.allowOut`).
    pub allow_out: Vec<String>,
    pub auto_pause: Option<bool>,
}

impl SandboxSpec {
    pub fn new(template: impl Into<String>, timeout: Duration) -> Self {
        SandboxSpec {
            template: template.into(),
            timeout,
            metadata: BTreeMap::new(),
            env_vars: BTreeMap::new(),
            secure: true,
            allow_internet_access: None,
            allow_out: Vec::new(),
            auto_pause: None,
        }
    }

    fn to_wire(&self) -> NewSandbox {
        let non_empty = |map: &BTreeMap<String, String>| (!map.is_empty()).then(|| map.clone());
        NewSandbox {
            template_id: self.template.clone(),
            timeout: Some(timeout_secs(self.timeout)),
            secure: Some(self.secure),
            auto_pause: self.auto_pause,
            auto_resume: None,
            auto_pause_memory: None,
            allow_internet_access: self.allow_internet_access,
            metadata: non_empty(&self.metadata),
            env_vars: non_empty(&self.env_vars),
            network: (!self.allow_out.is_empty()).then(|| crate::models::SandboxNetwork {
                allow_out: self.allow_out.clone(),
                deny_out: Vec::new(),
            }),
        }
    }
}

/// Whole seconds, rounded up so a sub-second wish never becomes "no timeout".
fn timeout_secs(timeout: Duration) -> i64 {
    let secs = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

/// Filters of a sandbox list.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ListQuery {
    /// Only sandboxes carrying all these pairs.
    pub metadata: BTreeMap<String, String>,
    /// Empty means running and paused.
    pub states: Vec<SandboxState>,
    /// Page size, 1..=100.
    pub limit: Option<u32>,
}

/// One page of a sandbox list; `next_token` is `None` on the last page.
#[derive(Clone, Debug, PartialEq)]
pub struct SandboxPage {
    pub sandboxes: Vec<SandboxDetail>,
    pub next_token: Option<String>,
}

/// What `GET /templates/aliases/{name}` says about a name.
#[derive(Clone, Debug, PartialEq)]
pub enum AliasLookup {
    Missing,
    Owned(TemplateAlias),
    /// Taken by another team.
    Foreign,
}

/// Talks to the control plane; cheap to clone.
#[derive(Clone)]
pub struct E2bClient {
    config: std::sync::Arc<ClientConfig>,
    /// Marked sensitive so HTTP-level debug output masks it too.
    api_key: HeaderValue,
    http: reqwest::Client,
    /// envd downloads go over HTTP/1.1 only: the E2B proxy pads streams with empty DATA
    /// frames that make hyper's HTTP/2 tear down the whole connection after about a hundred.
    http1: reqwest::Client,
}

impl fmt::Debug for E2bClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("E2bClient")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl E2bClient {
    pub fn new(config: ClientConfig) -> Result<Self, Error> {
        if config.api_key.expose().is_empty() {
            return Err(Error::InvalidArgument("the API key is empty".into()));
        }
        let mut api_key = HeaderValue::from_str(config.api_key.expose()).map_err(|_| {
            Error::InvalidArgument("the API key is not a valid header value".into())
        })?;
        api_key.set_sensitive(true);
        let user_agent = concat!("sandcastle/", env!("CARGO_PKG_VERSION"));
        let http = reqwest::Client::builder()
            .user_agent(user_agent)
            .connect_timeout(config.connect_timeout)
            .build()
            .map_err(Error::Transport)?;
        let http1 = reqwest::Client::builder()
            .user_agent(user_agent)
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.stream_idle_timeout)
            .http1_only()
            .build()
            .map_err(Error::Transport)?;
        Ok(E2bClient {
            config: std::sync::Arc::new(config),
            api_key,
            http,
            http1,
        })
    }

    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// An envd client for a sandbox this client created, connected to or looked up.
    pub fn envd(&self, sandbox: impl Into<SandboxAccess>) -> EnvdClient {
        EnvdClient::new(
            &self.config,
            self.http.clone(),
            self.http1.clone(),
            sandbox.into(),
        )
    }

    /// The envd base URL of a sandbox.
    pub fn sandbox_url(&self, sandbox_id: &str, domain: Option<&str>) -> String {
        sandbox_base_url(
            &self.config.sandbox_url,
            ENVD_PORT,
            sandbox_id,
            domain.unwrap_or(&self.config.domain),
        )
    }

    // -------------------------------------------------------------------------------------
    // Sandboxes.

    /// `POST /sandboxes`, the route of the published spec and of self-hosted deployments.
    /// The SDK's newer `POST /v2/sandboxes` exists only in its generated client, so relying
    /// on it would lock out servers that follow the spec.
    pub async fn create_sandbox(&self, spec: &SandboxSpec) -> Result<Sandbox, Error> {
        let body = spec.to_wire();
        let response = self
            .send(Method::POST, "/sandboxes", Some(&body), &[])
            .await?;
        read_json(response).await
    }

    pub async fn get_sandbox(&self, sandbox_id: &str) -> Result<SandboxDetail, Error> {
        let path = format!("/sandboxes/{}", encode_path_segment(sandbox_id));
        let response = self.send(Method::GET, &path, None::<&()>, &[]).await?;
        read_json(response).await
    }

    /// One page of `GET /v2/sandboxes`; pass the previous page's `next_token` to continue.
    pub async fn list_sandboxes_page(
        &self,
        query: &ListQuery,
        next_token: Option<&str>,
    ) -> Result<SandboxPage, Error> {
        let mut params = Vec::new();
        if !query.metadata.is_empty() {
            params.push(("metadata", metadata_query(&query.metadata)));
        }
        if !query.states.is_empty() {
            let states: Vec<&str> = query.states.iter().map(|state| state.as_str()).collect();
            params.push(("state", states.join(",")));
        }
        if let Some(limit) = query.limit {
            params.push(("limit", limit.to_string()));
        }
        if let Some(token) = next_token {
            params.push(("nextToken", token.to_owned()));
        }
        let response = self
            .send(Method::GET, "/v2/sandboxes", None::<&()>, &params)
            .await?;
        let next_token = response
            .headers()
            .get(NEXT_TOKEN_HEADER)
            .and_then(|value| value.to_str().ok())
            .filter(|value| !value.is_empty())
            .map(str::to_owned);
        let sandboxes = read_json(response).await?;
        Ok(SandboxPage {
            sandboxes,
            next_token,
        })
    }

    /// Every page of `GET /v2/sandboxes`.
    pub async fn list_sandboxes(&self, query: &ListQuery) -> Result<Vec<SandboxDetail>, Error> {
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self.list_sandboxes_page(query, token.as_deref()).await?;
            all.extend(page.sandboxes);
            match page.next_token {
                Some(next) if Some(&next) != token.as_ref() => token = Some(next),
                Some(_) => {
                    return Err(Error::Protocol(
                        "the sandbox list returned the same page token twice".into(),
                    ));
                }
                None => return Ok(all),
            }
        }
    }

    /// Kills a sandbox (or deletes a paused one). `false` when it did not exist.
    pub async fn kill_sandbox(&self, sandbox_id: &str) -> Result<bool, Error> {
        let path = format!("/sandboxes/{}", encode_path_segment(sandbox_id));
        found(self.send(Method::DELETE, &path, None::<&()>, &[]).await)
    }

    /// Sets the sandbox to end `timeout` from now; this may shorten its life.
    pub async fn set_timeout(&self, sandbox_id: &str, timeout: Duration) -> Result<(), Error> {
        let path = format!("/sandboxes/{}/timeout", encode_path_segment(sandbox_id));
        let body = TimeoutRequest {
            timeout: timeout_secs(timeout),
        };
        self.send(Method::POST, &path, Some(&body), &[]).await?;
        Ok(())
    }

    /// Pauses a sandbox with its memory kept. `false` when it was already paused.
    pub async fn pause_sandbox(&self, sandbox_id: &str) -> Result<bool, Error> {
        let path = format!("/sandboxes/{}/pause", encode_path_segment(sandbox_id));
        match self
            .send(Method::POST, &path, Some(&serde_json::json!({})), &[])
            .await
        {
            Ok(_) => Ok(true),
            Err(Error::Conflict { .. }) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Returns a running sandbox (resuming a paused one) with a fresh access token; the
    /// lifetime is only ever extended to `timeout` from now.
    pub async fn connect_sandbox(
        &self,
        sandbox_id: &str,
        timeout: Duration,
    ) -> Result<Sandbox, Error> {
        let path = format!("/sandboxes/{}/connect", encode_path_segment(sandbox_id));
        let body = ConnectRequest {
            timeout: Some(timeout_secs(timeout)),
        };
        let response = self.send(Method::POST, &path, Some(&body), &[]).await?;
        read_json(response).await
    }

    // -------------------------------------------------------------------------------------
    // Templates.

    /// `POST /v3/templates`: both IDs are known from this answer on, before anything is
    /// uploaded or built.
    pub async fn request_build(
        &self,
        request: &TemplateBuildRequest,
    ) -> Result<TemplateBuildRequested, Error> {
        let response = self
            .send(Method::POST, "/v3/templates", Some(request), &[])
            .await?;
        read_json(response).await
    }

    /// Whether the service already holds a COPY layer, and where to upload it if not.
    pub async fn file_upload_link(
        &self,
        template_id: &str,
        files_hash: &str,
    ) -> Result<FileUploadLink, Error> {
        let path = format!(
            "/templates/{}/files/{}",
            encode_path_segment(template_id),
            encode_path_segment(files_hash)
        );
        let response = self.send(Method::GET, &path, None::<&()>, &[]).await?;
        read_json(response).await
    }

    /// PUTs an archive to a presigned URL. Object stores refuse chunked uploads, hence the
    /// explicit length; the API key stays off this request because the URL is the grant.
    pub async fn upload_archive(&self, link: &FileUploadLink, archive: Bytes) -> Result<(), Error> {
        let url = link
            .url
            .as_deref()
            .ok_or_else(|| Error::Protocol("the upload link has no URL".into()))?;
        let mut headers = HeaderMap::new();
        for (name, value) in link.headers.iter().flatten() {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| Error::Protocol(format!("bad upload header name {name:?}")))?;
            let value = HeaderValue::from_str(value)
                .map_err(|_| Error::Protocol(format!("bad value for upload header {name}")))?;
            headers.insert(name, value);
        }
        headers.insert(CONTENT_LENGTH, HeaderValue::from(archive.len()));
        headers
            .entry(CONTENT_TYPE)
            .or_insert(HeaderValue::from_static("application/gzip"));
        let build = || {
            self.http
                .put(url)
                .timeout(self.config.upload_timeout)
                .headers(headers.clone())
                .body(archive.clone())
        };
        let response = self.execute(build, "PUT upload").await?;
        check(response, &[]).await.map(drop)
    }

    /// Uploads a COPY layer unless the service already has it; `true` when it uploaded.
    pub async fn upload_layer(&self, template_id: &str, layer: &CopyLayer) -> Result<bool, Error> {
        let link = self
            .file_upload_link(template_id, &layer.files_hash())
            .await?;
        if link.present {
            return Ok(false);
        }
        self.upload_archive(&link, layer.tar_gz()?).await?;
        Ok(true)
    }

    /// `POST /v2/templates/{id}/builds/{buildID}`: starts the requested build.
    pub async fn start_build(
        &self,
        template_id: &str,
        build_id: &str,
        start: &TemplateBuildStart,
    ) -> Result<(), Error> {
        let path = format!(
            "/v2/templates/{}/builds/{}",
            encode_path_segment(template_id),
            encode_path_segment(build_id)
        );
        self.send(Method::POST, &path, Some(start), &[]).await?;
        Ok(())
    }

    /// The build's state and the log entries from `logs_offset` on.
    pub async fn build_status(
        &self,
        template_id: &str,
        build_id: &str,
        logs_offset: usize,
    ) -> Result<TemplateBuildInfo, Error> {
        let path = format!(
            "/templates/{}/builds/{}/status",
            encode_path_segment(template_id),
            encode_path_segment(build_id)
        );
        let params = [("logsOffset", logs_offset.to_string())];
        let response = self.send(Method::GET, &path, None::<&()>, &params).await?;
        read_json(response).await
    }

    /// Polls a build until it is `ready` or `error` and its logs are drained; the answer
    /// carries every log entry. Gives up with [`Error::Timeout`] after `timeout`.
    pub async fn wait_for_build(
        &self,
        template_id: &str,
        build_id: &str,
        poll_interval: Duration,
        timeout: Duration,
    ) -> Result<TemplateBuildInfo, Error> {
        let deadline = Instant::now() + timeout;
        let mut logs = Vec::new();
        loop {
            let mut info = self.build_status(template_id, build_id, logs.len()).await?;
            let drained = info.log_entries.is_empty();
            logs.append(&mut info.log_entries);
            let finished = matches!(info.status, BuildStatus::Ready | BuildStatus::Error);
            if finished && drained {
                info.log_entries = logs;
                return Ok(info);
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout(format!(
                    "build {build_id} of template {template_id} still {:?} after {timeout:?}",
                    info.status
                )));
            }
            // A finished build may still have log pages pending; fetch them without pausing.
            if !finished {
                tokio::time::sleep(poll_interval).await;
            }
        }
    }

    /// Deletes a template by ID or name. `false` when it did not exist; sandboxes still
    /// using it give [`Error::TemplateInUse`].
    pub async fn delete_template(&self, template: &str) -> Result<bool, Error> {
        let path = format!("/templates/{}", encode_path_segment(template));
        found(self.send(Method::DELETE, &path, None::<&()>, &[]).await)
    }

    pub async fn lookup_alias(&self, name: &str) -> Result<AliasLookup, Error> {
        let path = format!("/templates/aliases/{}", encode_path_segment(name));
        match self.send(Method::GET, &path, None::<&()>, &[]).await {
            Ok(response) => Ok(AliasLookup::Owned(read_json(response).await?)),
            Err(Error::NotFound { .. }) => Ok(AliasLookup::Missing),
            Err(Error::Forbidden { .. }) => Ok(AliasLookup::Foreign),
            Err(error) => Err(error),
        }
    }

    pub async fn get_template(&self, template_id: &str) -> Result<Template, Error> {
        let path = format!("/templates/{}", encode_path_segment(template_id));
        let response = self.send(Method::GET, &path, None::<&()>, &[]).await?;
        read_json(response).await
    }

    // -------------------------------------------------------------------------------------
    // Transport.

    /// One API call with the retry policy; non-2xx answers become errors.
    async fn send<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        query: &[(&str, String)],
    ) -> Result<Response, Error> {
        let url = format!("{}{path}", self.config.api_url.trim_end_matches('/'));
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|error| Error::InvalidArgument(format!("request body: {error}")))?
            .map(Bytes::from);
        let build = || {
            let mut request = self
                .http
                .request(method.clone(), &url)
                .timeout(self.config.request_timeout)
                .header(API_KEY_HEADER, self.api_key.clone())
                .header(http::header::ACCEPT, "application/json");
            if !query.is_empty() {
                request = request.query(query);
            }
            if let Some(body) = &body {
                request = request
                    .header(CONTENT_TYPE, "application/json")
                    .body(body.clone());
            }
            request
        };
        let response = self.execute(build, &format!("{method} {path}")).await?;
        check(response, &[&self.config.api_key]).await
    }

    /// Sends until the retry policy says stop; the last outcome is returned as is.
    async fn execute(
        &self,
        build: impl Fn() -> RequestBuilder,
        what: &str,
    ) -> Result<Response, Error> {
        let policy = &self.config.retry;
        let mut steps = policy.backoff();
        let started = Instant::now();
        loop {
            let outcome = build().send().await;
            if let Some(observer) = &self.config.observer {
                observer.observe(
                    outcome
                        .as_ref()
                        .ok()
                        .map(|response| response.status().as_u16()),
                );
            }
            let verdict = match &outcome {
                Ok(response) => classify_response(
                    response.status().as_u16(),
                    header_str(response, SHOULD_RETRY_HEADER),
                    header_str(response, RETRY_AFTER_HEADER),
                ),
                // The request never left, so repeating it cannot duplicate anything.
                Err(error) if error.is_connect() => Verdict::Retry { retry_after: None },
                Err(_) => Verdict::Final,
            };
            let fraction: f64 = rand::random();
            let Some(delay) =
                next_delay(verdict, steps.next(), fraction, started.elapsed(), policy)
            else {
                return outcome.map_err(|mut error| {
                    // Presigned upload URLs carry their grant in the query string.
                    if let Some(url) = error.url_mut() {
                        url.set_query(None);
                    }
                    Error::Transport(error)
                });
            };
            match &outcome {
                Ok(response) => {
                    tracing::debug!(
                        request = what,
                        status = response.status().as_u16(),
                        ?delay,
                        "retrying"
                    )
                }
                Err(error) => tracing::debug!(request = what, %error, ?delay, "retrying"),
            }
            drop(outcome);
            tokio::time::sleep(delay).await;
        }
    }
}

fn header_str<'a>(response: &'a Response, name: &str) -> Option<&'a str> {
    response
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
}

/// Passes 2xx answers through and turns the rest into errors.
async fn check(response: Response, secrets: &[&Secret]) -> Result<Response, Error> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let retry_after =
        header_str(&response, RETRY_AFTER_HEADER).and_then(super::retry::parse_retry_after);
    let body = read_capped(response, MAX_ERROR_BODY).await;
    Err(api_error(status.as_u16(), retry_after, &body, secrets))
}

/// The start of a body, for error messages; a body that fails midway gives what arrived.
async fn read_capped(mut response: Response, limit: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    body.truncate(limit);
    body
}

async fn read_json<T: DeserializeOwned>(response: Response) -> Result<T, Error> {
    let status = response.status();
    let body = response.bytes().await.map_err(Error::Transport)?;
    serde_json::from_slice(&body)
        .map_err(|error| Error::Protocol(format!("unexpected {status} answer body: {error}")))
}

/// Maps "gone already" to `false` for deletes.
fn found(outcome: Result<Response, Error>) -> Result<bool, Error> {
    match outcome {
        Ok(_) => Ok(true),
        Err(Error::NotFound { .. }) => Ok(false),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_url_fills_the_pattern() {
        assert_eq!(
            sandbox_base_url(DEFAULT_SANDBOX_URL, 49983, "i1abc", "e2b.app"),
            "https://49983-i1abc.e2b.app"
        );
        assert_eq!(
            sandbox_base_url("http://127.0.0.1:8081/", 49983, "i1abc", "e2b.app"),
            "http://127.0.0.1:8081"
        );
        assert_eq!(
            sandbox_base_url("http://{sandboxId}.sandboxes.svc:{port}", 49983, "x", "d"),
            "http://x.sandboxes.svc:49983"
        );
    }

    #[test]
    fn client_uses_the_sandbox_domain_over_the_configured_one() {
        let client = E2bClient::new(ClientConfig::new("key")).unwrap();
        assert_eq!(
            client.sandbox_url("abc", Some("eu.example.com")),
            "https://49983-abc.eu.example.com"
        );
        assert_eq!(client.sandbox_url("abc", None), "https://49983-abc.e2b.app");
        assert_eq!(client.config().api_url, "https://api.e2b.app");
    }

    #[test]
    fn path_segments_keep_slashes_and_colons_inside() {
        assert_eq!(encode_path_segment("abc123"), "abc123");
        assert_eq!(
            encode_path_segment("team/my-name:v1.2"),
            "team%2Fmy-name%3Av1.2"
        );
        assert_eq!(encode_path_segment("a b%"), "a%20b%25");
        assert_eq!(encode_path_segment("é"), "%C3%A9");
    }

    /// Expected values from Python: `urlencode({quote(k): quote(v) for k, v in m.items()})`.
    #[test]
    fn metadata_query_is_encoded_like_the_sdk() {
        let map = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        assert_eq!(
            metadata_query(&map(&[("user", "abc"), ("app", "prod")])),
            "app=prod&user=abc"
        );
        assert_eq!(
            metadata_query(&map(&[("a b", "x/y&z=1")])),
            "a%2520b=x%2Fy%2526z%253D1"
        );
    }

    #[test]
    fn create_always_sends_a_timeout() {
        let mut spec = SandboxSpec::new("base", Duration::from_millis(1500));
        spec.metadata.insert("owner".into(), "ns/name".into());
        let wire = serde_json::to_value(spec.to_wire()).unwrap();
        assert_eq!(
            wire,
            serde_json::json!({
                "templateID": "base",
                "timeout": 2,
                "secure": true,
                "metadata": {"owner": "ns/name"}
            })
        );
        assert_eq!(timeout_secs(Duration::ZERO), 1);
        assert_eq!(timeout_secs(Duration::from_secs(300)), 300);
    }

    #[test]
    fn debug_output_hides_the_api_key() {
        let config = ClientConfig::new("e2b_topsecret");
        let client = E2bClient::new(config.clone()).unwrap();
        for text in [format!("{config:?}"), format!("{client:?}")] {
            assert!(!text.contains("topsecret"), "{text}");
            assert!(text.contains("<redacted>"), "{text}");
        }
        assert!(E2bClient::new(ClientConfig::new("")).is_err());
    }
}
