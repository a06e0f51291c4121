//! A thin etcd v3 client over tonic and the committed API code ([`super::proto`]): the
//! handful of calls the lease store makes (range, put, delete, transactions, compaction,
//! leases, watches), token authentication and TLS, nothing else.
//!
//! What it does that plain generated clients do not:
//! * one load-balanced channel over every endpoint, connected lazily, with HTTP/2 keep-alive;
//! * responses up to [`MAX_RESPONSE_BYTES`] (tonic's default is 4 MiB, too small for a large
//!   subnets prefix; Go's clientv3 allows 2 GiB);
//! * `hasleader: true` on every request when asked (a member cut off from the leader refuses
//!   instead of serving stale data), as etcd's own clients do;
//! * with a user name, a token from `Auth/Authenticate` on every request, renewed and the
//!   request retried once when etcd says the token is invalid or expired.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::channel::mpsc;
use futures::SinkExt;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::channel::Change;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};
use tonic::{Code, Status, Streaming};

use super::proto::etcdserverpb::auth_client::AuthClient;
use super::proto::etcdserverpb::kv_client::KvClient;
use super::proto::etcdserverpb::lease_client::LeaseClient;
use super::proto::etcdserverpb::watch_client::WatchClient;
use super::proto::etcdserverpb::{
    watch_request, AuthenticateRequest, CompactionRequest, CompactionResponse, DeleteRangeRequest,
    DeleteRangeResponse, LeaseGrantRequest, LeaseGrantResponse, LeaseRevokeRequest,
    LeaseRevokeResponse, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, TxnRequest, TxnResponse, WatchCreateRequest, WatchRequest,
    WatchResponse,
};

/// Largest response accepted, in bytes (issue: a subnets prefix beyond tonic's default 4 MiB
/// made listing fail forever).
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// The message etcd sends with an invalid or expired token (it also uses
/// `Unauthenticated` for it).
const INVALID_TOKEN: &str = "etcdserver: invalid auth token";

/// Why an etcd call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// etcd (or the transport under the call) answered with a gRPC error.
    #[error("etcd answered {code:?}: {message}", code = .0.code(), message = .0.message())]
    Status(Status),
    /// An endpoint or the TLS settings cannot be used.
    #[error("endpoint {endpoint}: {reason}")]
    Endpoint {
        /// The endpoint as given.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// etcd's token is not a valid header value.
    #[error("etcd returned an authentication token that is not a valid header value")]
    BadToken,
}

impl From<Status> for ClientError {
    fn from(status: Status) -> ClientError {
        ClientError::Status(status)
    }
}

impl ClientError {
    /// The gRPC status, if etcd answered one.
    pub fn status(&self) -> Option<&Status> {
        match self {
            ClientError::Status(s) => Some(s),
            _ => None,
        }
    }
}

/// How to reach etcd.
#[derive(Clone, Default)]
pub struct ConnectOptions {
    /// Limit for establishing a connection.
    pub connect_timeout: Option<Duration>,
    /// HTTP/2 keep-alive: ping interval and how long to wait for the answer.
    pub keep_alive: Option<(Duration, Duration)>,
    /// Send `hasleader: true`.
    pub require_leader: bool,
    /// TLS for `https://` endpoints (and for endpoints without a scheme).
    pub tls: Option<ClientTlsConfig>,
    /// User name and password for token authentication.
    pub credentials: Option<(String, String)>,
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("connect_timeout", &self.connect_timeout)
            .field("keep_alive", &self.keep_alive)
            .field("require_leader", &self.require_leader)
            .field("tls", &self.tls.is_some())
            .field("user", &self.credentials.as_ref().map(|(user, _)| user))
            .finish()
    }
}

impl ConnectOptions {
    /// TLS settings: an optional client certificate and key (PEM), an optional CA bundle
    /// (PEM); the system's roots when no CA bundle is given.
    pub fn tls(identity: Option<(Vec<u8>, Vec<u8>)>, ca: Option<Vec<u8>>) -> ClientTlsConfig {
        let mut tls = ClientTlsConfig::new();
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        match ca {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(ca)),
            None => tls.with_native_roots(),
        }
    }
}

/// Adds `hasleader` and the current token to every request.
#[derive(Clone)]
struct Metadata {
    require_leader: bool,
    token: Arc<RwLock<Option<AsciiMetadataValue>>>,
}

impl tonic::service::Interceptor for Metadata {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        let token = self.token.read().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(token) = token {
            request.metadata_mut().insert("token", token);
        }
        if self.require_leader {
            request
                .metadata_mut()
                .insert("hasleader", AsciiMetadataValue::from_static("true"));
        }
        Ok(request)
    }
}

type Service = InterceptedService<Channel, Metadata>;

/// A connection to an etcd cluster; cheap to clone (clones share the channel and token).
#[derive(Clone)]
pub struct Client {
    kv: KvClient<Service>,
    lease: LeaseClient<Service>,
    watch: WatchClient<Service>,
    auth: AuthClient<Channel>,
    credentials: Option<Arc<(String, String)>>,
    token: Arc<RwLock<Option<AsciiMetadataValue>>>,
    /// Serializes token renewals.
    renewing: Arc<tokio::sync::Mutex<()>>,
    /// Keeps the balancer's endpoint list open.
    _endpoints: Arc<tokio::sync::mpsc::Sender<Change<Uri, Endpoint>>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("auth", &self.credentials.is_some())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for `endpoints` (`http://host:port`, `https://host:port` or `host:port`,
    /// which means https when TLS is configured). Connects lazily, except that with
    /// credentials it authenticates now.
    pub async fn connect(
        endpoints: &[impl AsRef<str>],
        options: ConnectOptions,
    ) -> Result<Client, ClientError> {
        let mut list = Vec::new();
        for endpoint in endpoints {
            list.push(endpoint_for(endpoint.as_ref(), &options)?);
        }
        if list.is_empty() {
            return Err(ClientError::Endpoint {
                endpoint: String::new(),
                reason: "no endpoints".to_owned(),
            });
        }
        let (channel, tx) = Channel::balance_channel(list.len().max(1));
        for endpoint in list {
            let uri = endpoint.uri().clone();
            tx.send(Change::Insert(uri.clone(), endpoint))
                .await
                .map_err(|_| ClientError::Endpoint {
                    endpoint: uri.to_string(),
                    reason: "the channel's balancer is gone".to_owned(),
                })?;
        }
        let token = Arc::new(RwLock::new(None));
        let metadata = Metadata {
            require_leader: options.require_leader,
            token: token.clone(),
        };
        let service = InterceptedService::new(channel.clone(), metadata);
        let client = Client {
            kv: KvClient::new(service.clone()).max_decoding_message_size(MAX_RESPONSE_BYTES),
            lease: LeaseClient::new(service.clone()).max_decoding_message_size(MAX_RESPONSE_BYTES),
            watch: WatchClient::new(service).max_decoding_message_size(MAX_RESPONSE_BYTES),
            auth: AuthClient::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES),
            credentials: options.credentials.map(Arc::new),
            token,
            renewing: Arc::new(tokio::sync::Mutex::new(())),
            _endpoints: Arc::new(tx),
        };
        if client.credentials.is_some() {
            client.renew_token(None).await?;
        }
        Ok(client)
    }

    /// Gets a new token, unless another call already replaced `stale`.
    async fn renew_token(&self, stale: Option<AsciiMetadataValue>) -> Result<(), ClientError> {
        let Some(credentials) = self.credentials.as_deref() else {
            return Ok(());
        };
        let _guard = self.renewing.lock().await;
        if *self.token.read().unwrap_or_else(|p| p.into_inner()) != stale {
            return Ok(());
        }
        let request = AuthenticateRequest {
            name: credentials.0.clone(),
            password: credentials.1.clone(),
        };
        let response = self.auth.clone().authenticate(request).await?.into_inner();
        let token =
            AsciiMetadataValue::try_from(response.token).map_err(|_| ClientError::BadToken)?;
        *self.token.write().unwrap_or_else(|p| p.into_inner()) = Some(token);
        Ok(())
    }

    /// Runs `call`; with credentials, renews the token and runs it again once if etcd says
    /// the token is invalid or expired.
    async fn call<Req, T, F, Fut>(&self, request: Req, call: F) -> Result<T, ClientError>
    where
        Req: Clone,
        F: Fn(Req) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        if self.credentials.is_none() {
            return Ok(call(request).await?.into_inner());
        }
        let sent_with = self.token.read().unwrap_or_else(|p| p.into_inner()).clone();
        match call(request.clone()).await {
            Err(status) if invalid_token(&status) => {
                self.renew_token(sent_with).await?;
                Ok(call(request).await?.into_inner())
            }
            result => Ok(result?.into_inner()),
        }
    }

    /// `KV/Range`.
    pub async fn range(&self, request: RangeRequest) -> Result<RangeResponse, ClientError> {
        self.call(request, |r| {
            let mut kv = self.kv.clone();
            async move { kv.range(r).await }
        })
        .await
    }

    /// One key (an empty `kvs` when it does not exist).
    pub async fn get(&self, key: impl Into<Vec<u8>>) -> Result<RangeResponse, ClientError> {
        self.range(RangeRequest {
            key: key.into(),
            ..RangeRequest::default()
        })
        .await
    }

    /// Every key starting with `prefix`.
    pub async fn get_prefix(
        &self,
        prefix: impl Into<Vec<u8>>,
    ) -> Result<RangeResponse, ClientError> {
        let key = prefix.into();
        self.range(RangeRequest {
            range_end: prefix_end(&key),
            key,
            ..RangeRequest::default()
        })
        .await
    }

    /// `KV/Put`: writes `key`, attached to etcd lease `lease` (0: none).
    pub async fn put(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        lease: i64,
    ) -> Result<PutResponse, ClientError> {
        let request = PutRequest {
            key: key.into(),
            value: value.into(),
            lease,
            ..PutRequest::default()
        };
        self.call(request, |r| {
            let mut kv = self.kv.clone();
            async move { kv.put(r).await }
        })
        .await
    }

    /// `KV/DeleteRange` of one key.
    pub async fn delete(
        &self,
        key: impl Into<Vec<u8>>,
    ) -> Result<DeleteRangeResponse, ClientError> {
        let request = DeleteRangeRequest {
            key: key.into(),
            ..DeleteRangeRequest::default()
        };
        self.call(request, |r| {
            let mut kv = self.kv.clone();
            async move { kv.delete_range(r).await }
        })
        .await
    }

    /// `KV/Txn`.
    pub async fn txn(&self, request: TxnRequest) -> Result<TxnResponse, ClientError> {
        self.call(request, |r| {
            let mut kv = self.kv.clone();
            async move { kv.txn(r).await }
        })
        .await
    }

    /// `KV/Compact`: drops the history before `revision`; `physical` waits until it is gone.
    pub async fn compact(
        &self,
        revision: i64,
        physical: bool,
    ) -> Result<CompactionResponse, ClientError> {
        let request = CompactionRequest { revision, physical };
        self.call(request, |r| {
            let mut kv = self.kv.clone();
            async move { kv.compact(r).await }
        })
        .await
    }

    /// `Lease/LeaseGrant`: a lease of `ttl` seconds with an ID etcd chooses.
    pub async fn lease_grant(&self, ttl: i64) -> Result<LeaseGrantResponse, ClientError> {
        let request = LeaseGrantRequest { ttl, id: 0 };
        self.call(request, |r| {
            let mut lease = self.lease.clone();
            async move { lease.lease_grant(r).await }
        })
        .await
    }

    /// `Lease/LeaseRevoke`.
    pub async fn lease_revoke(&self, id: i64) -> Result<LeaseRevokeResponse, ClientError> {
        self.call(LeaseRevokeRequest { id }, |r| {
            let mut lease = self.lease.clone();
            async move { lease.lease_revoke(r).await }
        })
        .await
    }

    /// `Lease/LeaseTimeToLive` (`ttl` is -1 when the lease is gone).
    pub async fn lease_time_to_live(
        &self,
        id: i64,
    ) -> Result<LeaseTimeToLiveResponse, ClientError> {
        let request = LeaseTimeToLiveRequest { id, keys: false };
        self.call(request, |r| {
            let mut lease = self.lease.clone();
            async move { lease.lease_time_to_live(r).await }
        })
        .await
    }

    /// `Watch/Watch` with one create request; the stream yields its responses.
    ///
    /// A watch refused for its token is refused in the first response (canceled, "permission
    /// denied" or a token error), not with a gRPC error, so unary calls' renewal never sees
    /// it: with credentials, such a refusal renews the token and opens the watch once more.
    /// (etcd 3.4, the tests' server, accepts watches with an expired token.)
    pub async fn watch(&self, create: WatchCreateRequest) -> Result<WatchStream, ClientError> {
        let sent_with = self.token.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut stream = self.open_watch(create.clone()).await?;
        if self.credentials.is_none() {
            return Ok(stream);
        }
        match stream.responses.message().await? {
            Some(first) if first.canceled && auth_refusal(&first.cancel_reason) => {
                self.renew_token(sent_with).await?;
                self.open_watch(create).await
            }
            first => {
                stream.pending = first;
                Ok(stream)
            }
        }
    }

    /// Opens a watch stream and sends `create`.
    async fn open_watch(&self, create: WatchCreateRequest) -> Result<WatchStream, ClientError> {
        let open = |create: WatchCreateRequest| {
            let mut watch = self.watch.clone();
            async move {
                // The request side stays open for as long as the stream lives (closing it
                // would tell etcd the client is done).
                let (mut tx, rx) = mpsc::channel::<WatchRequest>(1);
                let request = WatchRequest {
                    request_union: Some(watch_request::RequestUnion::CreateRequest(create)),
                };
                if tx.send(request).await.is_err() {
                    return Err(Status::cancelled("watch request not queued"));
                }
                let response = watch.watch(rx).await?;
                let (metadata, stream, extensions) = response.into_parts();
                Ok(tonic::Response::from_parts(
                    metadata,
                    WatchStream {
                        _requests: tx,
                        responses: stream,
                        pending: None,
                    },
                    extensions,
                ))
            }
        };
        self.call(create, open).await
    }
}

/// The responses of one watch.
#[derive(Debug)]
pub struct WatchStream {
    _requests: mpsc::Sender<WatchRequest>,
    responses: Streaming<WatchResponse>,
    /// A response already read (the first one, when checking for an auth refusal).
    pending: Option<WatchResponse>,
}

impl WatchStream {
    /// The next response; `None` when etcd closed the stream. Cancel-safe.
    pub async fn message(&mut self) -> Result<Option<WatchResponse>, ClientError> {
        if let Some(response) = self.pending.take() {
            return Ok(Some(response));
        }
        Ok(self.responses.message().await?)
    }
}

/// Whether etcd refused a request for its token.
fn invalid_token(status: &Status) -> bool {
    match status.code() {
        Code::Unauthenticated => true,
        Code::Unknown => status.message() == INVALID_TOKEN,
        _ => false,
    }
}

/// Whether a watch was canceled for its token, or for a permission its token may have lost
/// ("permission denied", or a reason naming the auth token).
fn auth_refusal(reason: &str) -> bool {
    reason.contains("permission denied") || reason.contains("auth token")
}

/// The range end covering every key that starts with `prefix` (etcd's `GetPrefixRangeEnd`):
/// the prefix with its last byte below 0xff incremented and what follows dropped; `\0` (the
/// whole key space) when there is no such byte.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    match prefix.iter().rposition(|&b| b < 0xff) {
        Some(i) => {
            let mut end = prefix[..=i].to_vec();
            end[i] += 1;
            end
        }
        None => vec![0],
    }
}

/// A tonic endpoint for one etcd URL, with the connection options.
fn endpoint_for(url: &str, options: &ConnectOptions) -> Result<Endpoint, ClientError> {
    let err = |reason: String| ClientError::Endpoint {
        endpoint: url.to_owned(),
        reason,
    };
    let full = if url.starts_with("http://") || url.starts_with("https://") {
        url.to_owned()
    } else if options.tls.is_some() {
        format!("https://{url}")
    } else {
        format!("http://{url}")
    };
    let mut endpoint = Endpoint::from_shared(full).map_err(|e| err(e.to_string()))?;
    let tls = match &options.tls {
        _ if url.starts_with("http://") => None,
        Some(tls) => Some(tls.clone()),
        // https:// without TLS settings: verify the server against the system's roots.
        None if url.starts_with("https://") => Some(ConnectOptions::tls(None, None)),
        None => None,
    };
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).map_err(|e| err(e.to_string()))?;
    }
    if let Some((interval, timeout)) = options.keep_alive {
        endpoint = endpoint
            .keep_alive_while_idle(true)
            .http2_keep_alive_interval(interval)
            .keep_alive_timeout(timeout);
    }
    if let Some(timeout) = options.connect_timeout {
        endpoint = endpoint.connect_timeout(timeout);
    }
    Ok(endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_etcds() {
        assert_eq!(prefix_end(b"/a/subnets/"), b"/a/subnets0".to_vec());
        assert_eq!(prefix_end(b"ab\xff"), b"ac".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[test]
    fn invalid_token_is_recognised() {
        assert!(invalid_token(&Status::unauthenticated(
            "etcdserver: invalid auth token"
        )));
        assert!(invalid_token(&Status::unknown(INVALID_TOKEN)));
        assert!(!invalid_token(&Status::unknown("something else")));
        assert!(!invalid_token(&Status::permission_denied(
            "etcdserver: permission denied"
        )));
    }

    #[test]
    fn watch_refusals_for_the_token_are_recognised() {
        assert!(auth_refusal("etcdserver: permission denied"));
        assert!(auth_refusal("etcdserver: invalid auth token"));
        assert!(!auth_refusal("mvcc: required revision has been compacted"));
        assert!(!auth_refusal(""));
    }

    #[tokio::test]
    async fn endpoints_get_a_scheme() {
        let plain = ConnectOptions::default();
        let e = endpoint_for("127.0.0.1:2379", &plain).expect("valid");
        assert_eq!(e.uri().scheme_str(), Some("http"));
        let tls = ConnectOptions {
            tls: Some(ClientTlsConfig::new()),
            ..ConnectOptions::default()
        };
        let e = endpoint_for("127.0.0.1:2379", &tls).expect("valid");
        assert_eq!(e.uri().scheme_str(), Some("https"));
        let e = endpoint_for("https://[::1]:2379", &tls).expect("valid");
        assert_eq!(e.uri().scheme_str(), Some("https"));
        assert!(endpoint_for("http://bad host", &plain).is_err());
    }
}
