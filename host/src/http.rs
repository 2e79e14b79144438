//! HTTP: routes and API compatibility layers, and the one place where errors become statuses.
//!
//! - SageMaker multi-model container contract: `GET /ping`, `GET/POST /models`,
//!   `GET/DELETE /models/{name}`, `POST /models/{name}/invoke`, `POST /invocations` with
//!   `X-Amzn-SageMaker-Target-Model`.
//! - TorchServe inference API: `POST /predictions/{name}[/{version}]`.
//! - Tenant management: `POST /models/{name}/versions/{version}` (upload an archive),
//!   `DELETE /models/{name}/versions/{version}`, `PUT /models/{name}/{version}/set-default`.
//!
//! Every route but `/ping` authenticates its caller ([`Caller`]) and sees only that tenant's
//! models; another tenant's model is indistinguishable from a missing one (404).
//! - Prometheus: `GET /metrics`.
//!
//! This layer only translates: it never loads, evicts or runs anything itself.
use crate::archive::{self, ArchiveError};
use crate::inference::{InferenceError, Tessera, Timings};
use crate::registry::RegistryError;
use crate::residency::ResidencyError;
use crate::runtime::RuntimeError;
use crate::sandbox::{HandlerFailure, HandlerRequest, SandboxError};
use crate::store::{self, StoreError};
use crate::tenancy::{TenancyError, Tenant};
use crate::upload::{self, UploadError};
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

type App = Arc<Tessera>;

/// The router for all APIs on one port.
pub fn router(app: App) -> Router {
    Router::new()
        .route("/ping", get(ping))
        .route("/models", get(list_models).post(load_model))
        .route("/models/{name}", get(describe_model).delete(unload_model))
        .route("/models/{name}/invoke", post(predictions))
        .route(
            "/models/{name}/versions/{version}",
            post(upload_version).delete(delete_version),
        )
        .route("/models/{name}/{version}/set-default", put(set_default))
        .route("/invocations", post(invocations))
        .route("/predictions/{name}", post(predictions))
        .route("/predictions/{name}/{version}", post(predictions_version))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route".into()) })
        // We read bodies ourselves with the configured limit (and a JSON 413).
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::map_response(json_errors))
        .with_state(app)
}

/// The authenticated tenant of a request (every route but `/ping` takes one).
pub struct Caller(pub Arc<Tenant>);

impl FromRequestParts<App> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Caller, ApiError> {
        let header = parts
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        app.tenants.authenticate(header).map(Caller).map_err(|e| {
            let status = match e {
                TenancyError::NotAdmin => StatusCode::FORBIDDEN,
                _ => StatusCode::UNAUTHORIZED,
            };
            ApiError::new(status, e.to_string())
        })
    }
}

/// Marks a response whose body the model's handler wrote (left as it is, whatever its status).
#[derive(Clone, Copy)]
struct HandlerAnswer;

/// Every error the server itself answers is JSON: axum's own rejections (a malformed query
/// string or path, a method not allowed) come as plain text and are rewrapped here.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error())
        || is_json
        || resp.extensions().get::<HandlerAnswer>().is_some()
    {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10)
        .await
        .unwrap_or_default();
    let message = String::from_utf8_lossy(&text).trim().to_string();
    let message = if message.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        message
    };
    let mut out = ApiError::new(status, message).into_response();
    for (k, v) in parts
        .headers
        .iter()
        .filter(|(k, _)| *k != "content-type" && *k != "content-length")
    {
        out.headers_mut().insert(k.clone(), v.clone());
    }
    out
}

/// An error as the client sees it: `{"error": message, "code": status}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: String) -> ApiError {
        ApiError { status, message }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": self.message, "code": self.status.as_u16() });
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert("www-authenticate", HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

impl From<UploadError> for ApiError {
    fn from(e: UploadError) -> ApiError {
        let status = match &e {
            UploadError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            UploadError::Interrupted(_) => StatusCode::BAD_REQUEST,
            UploadError::Archive(ArchiveError::NoSpace { .. }) => StatusCode::INSUFFICIENT_STORAGE,
            UploadError::Archive(ArchiveError::Io { .. }) => StatusCode::INTERNAL_SERVER_ERROR,
            UploadError::Store(StoreError::Io(e)) if archive::is_out_of_space(e) => {
                StatusCode::INSUFFICIENT_STORAGE
            }
            UploadError::Archive(_) | UploadError::Handler(_) | UploadError::Model(..) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            UploadError::Quota(_) => StatusCode::FORBIDDEN,
            UploadError::Store(StoreError::VersionExists(..)) => StatusCode::CONFLICT,
            UploadError::Store(StoreError::BadName(_) | StoreError::BadVersion(_)) => {
                StatusCode::BAD_REQUEST
            }
            UploadError::Store(_) | UploadError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<InferenceError> for ApiError {
    fn from(e: InferenceError) -> ApiError {
        let message = e.to_string();
        let status = match &e {
            InferenceError::Registry(r) => registry_status(r),
            InferenceError::Residency(r) => match r.as_ref() {
                ResidencyError::Archive(ArchiveError::NoSpace { .. }) => {
                    StatusCode::INSUFFICIENT_STORAGE
                }
                ResidencyError::Archive(ArchiveError::Io { .. }) => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
                ResidencyError::Archive(_) | ResidencyError::Runtime(_) => {
                    StatusCode::UNPROCESSABLE_ENTITY
                }
                ResidencyError::Handler(SandboxError::InvalidComponent(_)) => {
                    StatusCode::UNPROCESSABLE_ENTITY
                }
                ResidencyError::Handler(s) => sandbox_status(s),
                ResidencyError::InsufficientMemory(_) => StatusCode::INSUFFICIENT_STORAGE,
                ResidencyError::Quarantined(_) => StatusCode::SERVICE_UNAVAILABLE,
                ResidencyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
            InferenceError::Sandbox(s) => sandbox_status(s),
            InferenceError::Runtime(RuntimeError::OutOfMemory { .. }) => {
                StatusCode::INSUFFICIENT_STORAGE
            }
            InferenceError::Runtime(_) => StatusCode::INTERNAL_SERVER_ERROR,
            InferenceError::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
            InferenceError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        };
        ApiError::new(status, message)
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> ApiError {
        ApiError::new(registry_status(&e), e.to_string())
    }
}

fn registry_status(e: &RegistryError) -> StatusCode {
    match e {
        RegistryError::NotFound(_) | RegistryError::Store(StoreError::NotFound(_)) => {
            StatusCode::NOT_FOUND
        }
        RegistryError::Exists(_) | RegistryError::Store(StoreError::VersionExists(..)) => {
            StatusCode::CONFLICT
        }
        RegistryError::Store(
            StoreError::BadName(_) | StoreError::BadUrl(_) | StoreError::BadVersion(_),
        ) => StatusCode::BAD_REQUEST,
        RegistryError::Store(StoreError::Io(_)) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn sandbox_status(e: &SandboxError) -> StatusCode {
    match e {
        SandboxError::Handler(f) => match f {
            HandlerFailure::BadRequest(_) => StatusCode::BAD_REQUEST,
            HandlerFailure::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            HandlerFailure::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            HandlerFailure::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            HandlerFailure::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        },
        SandboxError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        SandboxError::ServerMemoryBusy(_) => StatusCode::SERVICE_UNAVAILABLE,
        SandboxError::InvalidComponent(_) => StatusCode::UNPROCESSABLE_ENTITY,
        SandboxError::MemoryLimit(_)
        | SandboxError::Trap(_)
        | SandboxError::ResponseTooLarge(..)
        | SandboxError::BadTensor(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

async fn ping() -> Json<serde_json::Value> {
    Json(json!({ "status": "Healthy" }))
}

/// Prometheus metrics name every tenant's models: admins only when tenants are configured.
async fn metrics(
    State(app): State<App>,
    Caller(tenant): Caller,
) -> Result<impl IntoResponse, ApiError> {
    if !tenant.admin {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            TenancyError::NotAdmin.to_string(),
        ));
    }
    Ok((
        [("content-type", "text/plain; version=0.0.4")],
        app.metrics.render(),
    ))
}

#[derive(Deserialize)]
struct ListQuery {
    next_page_token: Option<String>,
    max_results: Option<usize>,
}

/// One model of `tenant` as `GET /models` shows it: the default version's state, plus every
/// version stored and resident.
async fn model_json(app: &Tessera, tenant: &str, name: &str) -> serde_json::Value {
    let store = app.registry.store();
    let default = app.registry.resolve(tenant, name, None).ok();
    let resident = app
        .residency
        .resident_with_prefix(&format!("{tenant}/{name}@"));
    let default_resident = default
        .as_ref()
        .and_then(|d| resident.iter().find(|m| m.version == d.version).cloned());
    let evictions = app.residency.evictions_of(tenant, name);
    let mut v = json!({
        "modelName": name,
        "modelUrl": default.as_ref().map(|d| d.url.clone()),
        "defaultVersion": default.as_ref().map(|d| d.version.clone()),
        "versions": store.versions(tenant, name),
        "residentVersions": resident.iter().map(|m| m.version.clone()).collect::<Vec<_>>(),
        "state": if default_resident.is_some() { "Loaded" } else { "Unloaded" },
        "evictions": evictions,
    });
    if let Some(m) = default_resident {
        let c = &m.unpacked.config;
        v["device"] = json!(crate::runtime::device_name(m.pipeline.device()));
        v["residentBytes"] = json!(m.weight);
        v["loadTimeMs"] = json!(m.load_time.as_millis() as u64);
        v["inFlight"] = json!(m.in_use());
        v["maxWorkers"] = json!(c.max_workers);
        v["batchSize"] = json!(c.batch_size);
        v["responseTimeout"] = json!(c.response_timeout);
    }
    v
}

/// SageMaker ListModels: the caller's models, paginated by name.
async fn list_models(
    State(app): State<App>,
    Caller(tenant): Caller,
    Query(q): Query<ListQuery>,
) -> Json<serde_json::Value> {
    let limit = q.max_results.unwrap_or(app.config.page_size).clamp(1, 1000);
    let (page, next) = app
        .registry
        .page(&tenant.name, q.next_page_token.as_deref(), limit);
    let mut models = Vec::with_capacity(page.len());
    for name in &page {
        models.push(model_json(&app, &tenant.name, name).await);
    }
    let mut body = json!({ "models": models });
    if let Some(n) = next {
        body["nextPageToken"] = json!(n);
    }
    Json(body)
}

#[derive(Deserialize)]
struct LoadRequest {
    model_name: String,
    url: String,
}

/// SageMaker LoadModel: register and load now; 409 if already there, 507 if it can't fit.
async fn load_model(
    State(app): State<App>,
    Caller(tenant): Caller,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_body(&app, body).await?;
    let req: LoadRequest = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("expected {{\"model_name\", \"url\"}}: {e}"),
        )
    })?;
    if app.tenants.multi_tenant() {
        // Tenants bring models by upload; urls would reach into the shared store.
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "loading by url is for single-tenant servers; upload the archive to /models/{name}/versions/{version}"
                .into(),
        ));
    }
    let reg = app
        .registry
        .register(&tenant.name, &req.model_name, &req.url)?;
    match app.residency.get(&reg, &tenant).await {
        Ok(_) => Ok((
            StatusCode::OK,
            Json(json!({ "status": format!("Model \"{}\" loaded", reg.name) })),
        )
            .into_response()),
        Err(e) => {
            app.registry.forget(&tenant.name, &reg.name);
            Err(InferenceError::Residency(e).into())
        }
    }
}

fn known(app: &Tessera, tenant: &Tenant, name: &str) -> Result<(), ApiError> {
    store::validate_name(name).map_err(RegistryError::from)?;
    if app.registry.knows(&tenant.name, name) {
        Ok(())
    } else {
        Err(RegistryError::NotFound(name.to_string()).into())
    }
}

async fn describe_model(
    State(app): State<App>,
    Caller(tenant): Caller,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    known(&app, &tenant, &name)?;
    Ok(Json(model_json(&app, &tenant.name, &name).await))
}

/// SageMaker UnloadModel: forget the registration and unload every resident version (uploaded
/// versions stay stored; a later request loads the default again).
async fn unload_model(
    State(app): State<App>,
    Caller(tenant): Caller,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    known(&app, &tenant, &name)?;
    app.registry.forget(&tenant.name, &name);
    let unloaded = app.residency.remove_model(&tenant.name, &name).await;
    Ok(Json(
        json!({ "status": format!("Model \"{name}\" unloaded"), "unloadedVersions": unloaded }),
    ))
}

#[derive(Deserialize)]
struct UploadQuery {
    #[serde(default)]
    default: bool,
}

/// Upload a model archive as a new version (body: the .tar.gz).
async fn upload_version(
    State(app): State<App>,
    caller: Result<Caller, ApiError>,
    Path((name, version)): Path<(String, String)>,
    Query(q): Query<UploadQuery>,
    body: Body,
) -> Result<Response, ApiError> {
    let tenant = match caller {
        Ok(Caller(t)) => t,
        Err(e) => {
            upload::drain(body, app.config.max_upload_mib << 20).await;
            return Err(e);
        }
    };
    let done = upload::accept(&app, &tenant, &name, &version, body, q.default).await?;
    let body = json!({ "modelName": name, "version": done.version, "default": done.is_default, "bytes": done.bytes });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// Delete one uploaded version (unloading it first).
async fn delete_version(
    State(app): State<App>,
    Caller(tenant): Caller,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    store::validate_name(&name).map_err(RegistryError::from)?;
    let store = app.registry.store();
    store
        .version_archive(&tenant.name, &name, &version)
        .map_err(|_| RegistryError::NotFound(name.clone()))?;
    let key = crate::registry::key(&tenant.name, &name, &version);
    if let Some(m) = app.residency.peek(&key).await {
        if m.in_use() > 0 {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("version '{version}' of '{name}' is serving requests"),
            ));
        }
    }
    app.residency.remove_key(&key).await;
    store
        .remove_version(&tenant.name, &name, &version)
        .map_err(RegistryError::from)?;
    Ok(Json(
        json!({ "status": format!("version \"{version}\" of \"{name}\" deleted") }),
    ))
}

/// TorchServe's set-default.
async fn set_default(
    State(app): State<App>,
    Caller(tenant): Caller,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    store::validate_name(&name).map_err(RegistryError::from)?;
    app.registry
        .store()
        .set_default(&tenant.name, &name, &version)
        .map_err(|e| match e {
            StoreError::NotFound(_) => {
                ApiError::from(RegistryError::NotFound(format!("{name} version {version}")))
            }
            other => RegistryError::from(other).into(),
        })?;
    Ok(Json(
        json!({ "status": format!("default version of \"{name}\" is now \"{version}\"") }),
    ))
}

/// TorchServe's `/predictions/{name}` and SageMaker's `/models/{name}/invoke`.
async fn predictions(
    State(app): State<App>,
    Caller(tenant): Caller,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    serve(app, tenant, name, None, headers, body).await
}

async fn predictions_version(
    State(app): State<App>,
    Caller(tenant): Caller,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    serve(app, tenant, name, Some(version), headers, body).await
}

async fn invocations(
    State(app): State<App>,
    Caller(tenant): Caller,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let target = headers
        .get("x-amzn-sagemaker-target-model")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.to_string());
    match target {
        Some(t) => match store::name_from_target(&t) {
            Ok(name) => serve(app, tenant, name, None, headers, body).await,
            Err(e) => ApiError::from(RegistryError::from(e)).into_response(),
        },
        None => ApiError::new(
            StatusCode::BAD_REQUEST,
            "this is a multi-model endpoint: name the model in the X-Amzn-SageMaker-Target-Model header".into(),
        )
        .into_response(),
    }
}

/// Reads the body up to the configured limit. Past the limit the rest is drained (up to a
/// bound, see [`upload::drain`]) before answering 413, so that clients still sending receive
/// the answer instead of a reset connection.
async fn read_body(app: &Tessera, body: Body) -> Result<Vec<u8>, ApiError> {
    use http_body_util::BodyExt;
    let limit = app.config.max_request_bytes();
    let mut body = body;
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("could not read request body: {e}"),
            )
        })?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                upload::drain(body, (limit as u64).saturating_mul(4).max(64 << 20)).await;
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "request body exceeds the limit of {} MiB",
                        app.config.max_request_mib
                    ),
                ));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf)
}

/// Runs one inference and turns the result into a response with timing headers.
async fn serve(
    app: App,
    tenant: Arc<Tenant>,
    name: String,
    version: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let request_id = app.request_id();
    let result = async {
        store::validate_name(&name).map_err(RegistryError::from)?;
        let body = read_body(&app, body).await?;
        let request = HandlerRequest {
            body,
            content_type: headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/octet-stream")
                .to_string(),
            headers: forwarded_headers(&headers),
        };
        app.invoke(&tenant, &name, version.as_deref(), request, &request_id)
            .await
            .map_err(ApiError::from)
    }
    .await;
    let elapsed = started.elapsed();
    let mut response = match result {
        Ok((r, timings)) => {
            let status =
                StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut resp = (status, r.body).into_response();
            resp.extensions_mut().insert(HandlerAnswer);
            if let Ok(ct) = HeaderValue::from_str(&r.content_type) {
                resp.headers_mut().insert("content-type", ct);
            }
            add_timings(resp.headers_mut(), &timings);
            if let Some(hit) = timings.stage_cache {
                let v = if hit { "hit" } else { "miss" };
                resp.headers_mut()
                    .insert("x-stage-cache", HeaderValue::from_static(v));
            }
            if let Ok(v) = HeaderValue::from_str(&timings.version) {
                resp.headers_mut().insert("x-model-version", v);
            }
            resp
        }
        Err(e) => {
            if e.status.is_server_error() {
                tracing::warn!(
                    model = name,
                    request_id,
                    status = e.status.as_u16(),
                    error = e.message,
                    "request failed"
                );
            } else {
                tracing::info!(
                    model = name,
                    request_id,
                    status = e.status.as_u16(),
                    error = e.message,
                    "request rejected"
                );
            }
            e.into_response()
        }
    };
    let code = response.status().as_u16().to_string();
    // Label only models that exist, so junk names cannot grow the metric set without bound.
    if app.registry.knows(&tenant.name, &name) {
        let label = format!("{}/{name}", tenant.name);
        app.metrics
            .requests
            .with_label_values(&[label.as_str(), code.as_str()])
            .inc();
        app.metrics
            .request_seconds
            .with_label_values(&[label.as_str()])
            .observe(elapsed.as_secs_f64());
    }
    tracing::debug!(
        model = name,
        request_id,
        status = code,
        ms = elapsed.as_millis() as u64,
        "request done"
    );
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}

/// Headers a handler may see: lower-case names, credentials and hop-by-hop headers removed.
fn forwarded_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    const HIDDEN: [&str; 4] = [
        "authorization",
        "cookie",
        "proxy-authorization",
        "x-amz-security-token",
    ];
    headers
        .iter()
        .filter(|(k, _)| !HIDDEN.contains(&k.as_str()))
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .take(64)
        .collect()
}

fn add_timings(h: &mut HeaderMap, t: &Timings) {
    let ms = |d: Duration| HeaderValue::from_str(&format!("{:.3}", d.as_secs_f64() * 1e3)).unwrap();
    if let Some(l) = t.load {
        h.insert("x-model-load-time", ms(l));
    }
    h.insert("x-queue-time", ms(t.queue));
    h.insert("x-preprocess-time", ms(t.preprocess));
    h.insert("x-inference-time", ms(t.inference));
    h.insert("x-postprocess-time", ms(t.postprocess));
}
