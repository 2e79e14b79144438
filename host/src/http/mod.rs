//! HTTP: routes of each API dialect, authentication, body limits, and the one place where an
//! [`ErrorKind`] becomes a status code and a JSON body.
//!
//! - SageMaker multi-model container contract: `GET /ping`, `GET/POST /models`,
//!   `GET/DELETE /models/{name}`, `POST /models/{name}/invoke`, `POST /invocations` with
//!   `X-Amzn-SageMaker-Target-Model`.
//! - TorchServe inference API: `POST /predictions/{name}[/{version}]`.
//! - Tenant management: `POST /models/{name}/versions/{version}` (upload an archive),
//!   `DELETE /models/{name}/versions/{version}`, `PUT /models/{name}/{version}/set-default`.
//! - Prometheus: `GET /metrics` (also alone, without a token, on `--metrics-address`).
//! - Health: `GET /ping` (SageMaker), `GET /v2/health/live`, `GET /v2/health/ready`.
//! - Open Inference Protocol v2 (`/v2`, `/v2/models/...`): see [`oip`].
//!
//! Every route but health authenticates its caller ([`Caller`] for management,
//! [`InferCaller`] for inference: the auth mode decides which need a token) and sees only that
//! tenant's models; another tenant's model is indistinguishable from a missing one (404).
//!
//! Every request gets an id (the client's `x-request-id` when it is a sane one, else ours),
//! returned in `x-request-id`, and one log line when it ends ([`request_context`]), with the
//! W3C `traceparent` trace id when the client sent one.
//!
//! This layer only parses, authenticates and calls the [`Server`]'s verbs: it never loads,
//! evicts or runs anything itself.
pub mod conn;
mod oip;
mod openapi;
pub mod torchserve;

use crate::error::{Error, ErrorKind};
use crate::sandbox::HandlerRequest;
use crate::serving::{self, Server, Timings};
use crate::store;
use crate::tenancy::{Scope, TenancyError, Tenant};
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Extension, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(super) type App = Arc<Server>;

/// The router for all APIs on one port.
pub fn router(app: App) -> Router {
    Router::new()
        .route("/ping", get(ping))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
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
        .merge(oip::routes())
        .route("/openapi.json", get(openapi::serve))
        .fallback(|| async { Error::new(ErrorKind::NotFound, "no such route") })
        // We read bodies ourselves with the configured limit (and a JSON 413).
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::map_response(json_errors))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            request_context,
        ))
        .with_state(app)
}

/// The router of `--metrics-address`: `GET /metrics` without a token, nothing else.
pub fn metrics_router(app: App) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(app): State<App>| async move { metrics_text(&app).await }),
        )
        .fallback(|| async { Error::new(ErrorKind::NotFound, "no such route") })
        .with_state(app)
}

/// The authenticated tenant of a management request.
pub struct Caller(pub Arc<Tenant>);

/// The tenant of an inference request (no token needed in the open auth modes).
pub struct InferCaller(pub Arc<Tenant>);

fn authorization(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
}

impl FromRequestParts<App> for Caller {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Caller, Error> {
        let who = app
            .tenants
            .authenticate_for(authorization(parts), Scope::Management)?;
        note_tenant(parts, &who);
        Ok(Caller(who))
    }
}

impl FromRequestParts<App> for InferCaller {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<InferCaller, Error> {
        let who = app
            .tenants
            .authenticate_for(authorization(parts), Scope::Inference)?;
        note_tenant(parts, &who);
        Ok(InferCaller(who))
    }
}

/// A request's id and trace, set by [`request_context`] before any route runs.
#[derive(Clone, Debug)]
pub struct RequestContext {
    pub id: String,
    /// The W3C trace id of the client's `traceparent`, when it sent a valid one.
    pub trace_id: Option<String>,
    /// Filled by the routes: what the request line logs.
    log: Arc<std::sync::Mutex<RequestLog>>,
}

/// What a route found out about a request, for its log line.
#[derive(Debug, Default)]
pub(super) struct RequestLog {
    tenant: Option<String>,
    model: Option<String>,
    version: Option<String>,
    timings: Option<Timings>,
    error: Option<String>,
}

impl RequestContext {
    pub(super) fn note(&self, f: impl FnOnce(&mut RequestLog)) {
        f(&mut self.log.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

fn note_tenant(parts: &Parts, tenant: &Tenant) {
    if let Some(ctx) = parts.extensions.get::<RequestContext>() {
        ctx.note(|l| l.tenant = Some(tenant.name.clone()));
    }
}

/// A client's `x-request-id` is kept when it is 1-128 characters of `[A-Za-z0-9._:/+=@-]`
/// (it ends up in logs and headers); otherwise the request gets one of ours.
fn client_request_id(headers: &HeaderMap) -> Option<String> {
    let v = headers.get("x-request-id")?.to_str().ok()?;
    let ok = (1..=128).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:/+=@-".contains(&b));
    ok.then(|| v.to_string())
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), if valid.
pub fn trace_id(traceparent: &str) -> Option<String> {
    let parts: Vec<&str> = traceparent.trim().split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let zero = |s: &str| s.bytes().all(|b| b == b'0');
    match parts.as_slice() {
        [version, trace, parent, flags, ..]
            if hex(version, 2)
                && *version != "ff"
                && (parts.len() == 4 || *version != "00")
                && hex(trace, 32)
                && hex(parent, 16)
                && hex(flags, 2)
                && !zero(trace)
                && !zero(parent) =>
        {
            Some(trace.to_string())
        }
        _ => None,
    }
}

/// Gives the request its id and trace, runs it, and logs one line when it ends (health and
/// metrics scrapes at debug level, everything else at info).
pub(super) async fn request_context(
    State(app): State<App>,
    mut req: Request,
    next: axum::middleware::Next,
) -> Response {
    let started = Instant::now();
    let id = client_request_id(req.headers()).unwrap_or_else(|| app.request_id());
    let trace_id = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(trace_id);
    let ctx = RequestContext {
        id: id.clone(),
        trace_id: trace_id.clone(),
        log: Default::default(),
    };
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    req.extensions_mut().insert(ctx.clone());
    let mut response = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    let status = response.status().as_u16();
    let ms = started.elapsed().as_secs_f64() * 1e3;
    let mut log = std::mem::take(&mut *ctx.log.lock().unwrap_or_else(|e| e.into_inner()));
    if let Some(ErrorMessage(m)) = response.extensions().get::<ErrorMessage>() {
        log.error.get_or_insert_with(|| m.clone());
    }
    let quiet = path == "/ping" || path.starts_with("/v2/health/") || path == "/metrics";
    let ms_of = |f: fn(&Timings) -> Duration| {
        log.timings
            .as_ref()
            .map(|t| (f(t).as_secs_f64() * 1e6).round() / 1e3)
    };
    macro_rules! line {
        ($level:ident) => {
            tracing::$level!(
                request_id = id,
                trace_id,
                tenant = log.tenant,
                model = log.model,
                version = log.version,
                method = %method,
                route = path,
                status,
                ms = (ms * 1e3).round() / 1e3,
                queue_ms = ms_of(|t| t.queue),
                pre_ms = ms_of(|t| t.preprocess),
                forward_ms = ms_of(|t| t.inference),
                post_ms = ms_of(|t| t.postprocess),
                load_ms = log.timings.as_ref().and_then(|t| t.load).map(|d| d.as_millis() as u64),
                batch = log.timings.as_ref().map(|t| t.batch).filter(|b| *b > 0),
                error = log.error,
                "request"
            )
        };
    }
    if quiet {
        line!(debug);
    } else if status >= 500 {
        line!(warn);
    } else {
        line!(info);
    }
    response
}

/// Marks a response whose body the model's handler wrote (left as it is, whatever its status).
#[derive(Clone, Copy)]
struct HandlerAnswer;

/// Every error the server itself answers is JSON: axum's own rejections (a malformed query
/// string or path, a method not allowed) come as plain text and are rewrapped here.
pub(super) async fn json_errors(resp: Response) -> Response {
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
    let mut out = error_response(status, message);
    for (k, v) in parts
        .headers
        .iter()
        .filter(|(k, _)| *k != "content-type" && *k != "content-length")
    {
        out.headers_mut().insert(k.clone(), v.clone());
    }
    out
}

/// The status of each kind of error: the only such table.
fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
        ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorKind::Forbidden => StatusCode::FORBIDDEN,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ErrorKind::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorKind::Overloaded => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::InsufficientStorage => StatusCode::INSUFFICIENT_STORAGE,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// An error as the client sees it: `{"error": message, "code": status}`.
fn error_response(status: StatusCode, message: String) -> Response {
    let body = json!({ "error": message, "code": status.as_u16() });
    let mut resp = (status, Json(body)).into_response();
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut()
            .insert("www-authenticate", HeaderValue::from_static("Bearer"));
    }
    resp
}

/// An error's message, kept on its response for the request's log line.
#[derive(Clone)]
struct ErrorMessage(String);

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let mut resp = error_response(status_of(self.kind), self.message.clone());
        resp.extensions_mut().insert(ErrorMessage(self.message));
        resp
    }
}

/// SageMaker's health check: 200 once ready (preloads warm), 503 before and while draining.
#[utoipa::path(get, path = "/ping", tag = "health", responses((status = 200, description = "Ready"), (status = 503, description = "Starting or draining")))]
async fn ping(State(app): State<App>) -> Response {
    if app.is_ready() {
        Json(json!({ "status": "Healthy" })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "Unhealthy", "error": "starting or draining" })),
        )
            .into_response()
    }
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/v2/health/live", tag = "health", responses((status = 200, description = "The process answers")))]
async fn live() -> Json<serde_json::Value> {
    Json(json!({ "live": true }))
}

/// Readiness: `--preload` models warm and not draining (503 otherwise).
#[utoipa::path(get, path = "/v2/health/ready", tag = "health", responses((status = 200, description = "Ready"), (status = 503, description = "Starting or draining")))]
async fn ready(State(app): State<App>) -> Response {
    let ready = app.is_ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({ "ready": ready }))).into_response()
}

async fn metrics_text(app: &Server) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        app.render_metrics().await,
    )
        .into_response()
}

/// Prometheus metrics name every tenant's models: admins only when tenants are configured.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "Prometheus text format", content_type = "text/plain"), (status = 401, description = "Missing or invalid token"), (status = 403, description = "Not an admin")))]
async fn metrics(State(app): State<App>, Caller(tenant): Caller) -> Result<Response, Error> {
    if !tenant.admin {
        return Err(TenancyError::NotAdmin.into());
    }
    Ok(metrics_text(&app).await)
}

#[derive(Deserialize)]
struct ListQuery {
    next_page_token: Option<String>,
    max_results: Option<usize>,
}

/// SageMaker ListModels: the caller's models, paginated by name.
#[utoipa::path(get, path = "/models", tag = "management", params(("next_page_token" = Option<String>, Query, description = "Last model name of the previous page"), ("max_results" = Option<usize>, Query, description = "Page size (1..=1000)")), responses((status = 200, description = "A page of models", body = Object), (status = 401, description = "Missing or invalid token")))]
async fn list_models(
    State(app): State<App>,
    Caller(tenant): Caller,
    Query(q): Query<ListQuery>,
) -> Json<serving::ModelList> {
    let limit = q.max_results.unwrap_or(app.config.page_size).clamp(1, 1000);
    Json(app.list(&tenant, q.next_page_token.as_deref(), limit))
}

#[derive(Deserialize, utoipa::ToSchema)]
struct LoadRequest {
    model_name: String,
    url: String,
}

/// SageMaker LoadModel: register and load now; 409 if already there, 507 if it can't fit.
#[utoipa::path(post, path = "/models", tag = "management", request_body(content = LoadRequest, content_type = "application/json"), responses((status = 200, description = "Loaded and warm"), (status = 400, description = "Malformed request"), (status = 401, description = "Missing or invalid token"), (status = 404, description = "No such model"), (status = 409, description = "Already loaded"), (status = 422, description = "Archive refused"), (status = 507, description = "Does not fit")))]
async fn load_model(
    State(app): State<App>,
    Caller(tenant): Caller,
    body: Body,
) -> Result<Json<serde_json::Value>, Error> {
    let bytes = read_body(&app, body).await?;
    let req: LoadRequest = serde_json::from_slice(&bytes).map_err(|e| {
        Error::new(
            ErrorKind::BadRequest,
            format!("expected {{\"model_name\", \"url\"}}: {e}"),
        )
    })?;
    app.load_from_url(&tenant, &req.model_name, &req.url)
        .await?;
    Ok(Json(
        json!({ "status": format!("Model \"{}\" loaded", req.model_name) }),
    ))
}

#[utoipa::path(get, path = "/models/{name}", tag = "management", params(("name" = String, Path, description = "Model name")), responses((status = 200, description = "The model", body = Object), (status = 400, description = "Malformed request"), (status = 401, description = "Missing or invalid token"), (status = 404, description = "No such model")))]
async fn describe_model(
    State(app): State<App>,
    Caller(tenant): Caller,
    Path(name): Path<String>,
) -> Result<Json<serving::ModelInfo>, Error> {
    Ok(Json(app.describe(&tenant, &name)?))
}

/// SageMaker UnloadModel: forget the registration and unload every resident version (uploaded
/// versions stay stored; a later request loads the default again).
#[utoipa::path(delete, path = "/models/{name}", tag = "management", params(("name" = String, Path, description = "Model name")), responses((status = 200, description = "Unloaded"), (status = 400, description = "Malformed request"), (status = 401, description = "Missing or invalid token"), (status = 404, description = "No such model")))]
async fn unload_model(
    State(app): State<App>,
    Caller(tenant): Caller,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, Error> {
    let unloaded = app.unload(&tenant, &name).await?;
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
#[utoipa::path(post, path = "/models/{name}/versions/{version}", tag = "management", params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "Model version"), ("default" = Option<bool>, Query, description = "Make it the default version")), request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The model archive (.tar.gz)"), responses((status = 201, description = "Stored"), (status = 400, description = "Malformed request"), (status = 401, description = "Missing or invalid token"), (status = 404, description = "No such model"), (status = 403, description = "Quota exceeded"), (status = 409, description = "Version exists"), (status = 413, description = "Archive over the limit"), (status = 422, description = "Archive refused"), (status = 507, description = "Disk full")))]
async fn upload_version(
    State(app): State<App>,
    caller: Result<Caller, Error>,
    Path((name, version)): Path<(String, String)>,
    Query(q): Query<UploadQuery>,
    body: Body,
) -> Result<Response, Error> {
    // SageMaker's contract brings models by LoadModel only, and its model root is the
    // platform's: no uploads there (its auth mode is open).
    let caller = if app.config.sagemaker {
        Err(Error::new(
            ErrorKind::Forbidden,
            "uploads are off in SageMaker mode: SageMaker loads models with POST /models",
        ))
    } else {
        caller
    };
    let tenant = match caller {
        Ok(Caller(t)) => t,
        Err(e) => {
            serving::drain(body, app.config.max_upload_mib << 20).await;
            return Err(e);
        }
    };
    let done = app
        .upload(&tenant, &name, &version, body, q.default)
        .await?;
    let body = json!({ "modelName": name, "version": done.version, "default": done.is_default, "bytes": done.bytes });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// Delete one uploaded version (unloading it first).
#[utoipa::path(delete, path = "/models/{name}/versions/{version}", tag = "management", params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "Model version")), responses((status = 200, description = "Deleted"), (status = 400, description = "Malformed request"), (status = 401, description = "Missing or invalid token"), (status = 404, description = "No such model"), (status = 409, description = "Serving requests")))]
async fn delete_version(
    State(app): State<App>,
    Caller(tenant): Caller,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, Error> {
    app.delete_version(&tenant, &name, &version).await?;
    Ok(Json(
        json!({ "status": format!("version \"{version}\" of \"{name}\" deleted") }),
    ))
}

/// TorchServe's set-default.
#[utoipa::path(put, path = "/models/{name}/{version}/set-default", tag = "management", params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "Model version")), responses((status = 200, description = "Default set"), (status = 400, description = "Malformed request"), (status = 401, description = "Missing or invalid token"), (status = 404, description = "No such model")))]
async fn set_default(
    State(app): State<App>,
    Caller(tenant): Caller,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, Error> {
    app.set_default(&tenant, &name, &version)?;
    Ok(Json(
        json!({ "status": format!("default version of \"{name}\" is now \"{version}\"") }),
    ))
}

/// TorchServe's `/predictions/{name}` and SageMaker's `/models/{name}/invoke`.
#[utoipa::path(post, path = "/predictions/{name}", tag = "inference", params(("name" = String, Path, description = "Model name")), request_body(content = Object, description = "Whatever the model's handler takes (JSON for the bundled ones)"), responses((status = 200, description = "The handler's response (any content type)"), (status = 400, description = "Malformed request"), (status = 401, description = "Missing or invalid token"), (status = 404, description = "No such model"), (status = 413, description = "Body over the limit"), (status = 415, description = "Content type the handler does not take"), (status = 422, description = "Refused by the handler or model"), (status = 429, description = "The model's queue is full"), (status = 503, description = "Temporarily unavailable"), (status = 504, description = "Past the model's responseTimeout"), (status = 507, description = "Does not fit the device")))]
async fn predictions(
    State(app): State<App>,
    InferCaller(tenant): InferCaller,
    Extension(ctx): Extension<RequestContext>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    serve(app, tenant, &ctx, name, None, headers, body).await
}

#[utoipa::path(post, path = "/predictions/{name}/{version}", tag = "inference", params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "Model version")), request_body(content = Object, description = "Whatever the model's handler takes"), responses((status = 200, description = "The handler's response (any content type)"), (status = 400, description = "Malformed request"), (status = 401, description = "Missing or invalid token"), (status = 404, description = "No such model"), (status = 413, description = "Body over the limit"), (status = 415, description = "Content type the handler does not take"), (status = 422, description = "Refused by the handler or model"), (status = 429, description = "The model's queue is full"), (status = 503, description = "Temporarily unavailable"), (status = 504, description = "Past the model's responseTimeout"), (status = 507, description = "Does not fit the device")))]
async fn predictions_version(
    State(app): State<App>,
    InferCaller(tenant): InferCaller,
    Extension(ctx): Extension<RequestContext>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    serve(app, tenant, &ctx, name, Some(version), headers, body).await
}

/// SageMaker's `/invocations`: the model is named by `X-Amzn-SageMaker-Target-Model`.
#[utoipa::path(post, path = "/invocations", tag = "inference", params(("X-Amzn-SageMaker-Target-Model" = String, Header, description = "The model (SageMaker)")), request_body(content = Object, description = "Whatever the model's handler takes"), responses((status = 200, description = "The handler's response (any content type)"), (status = 400, description = "Malformed request"), (status = 401, description = "Missing or invalid token"), (status = 404, description = "No such model"), (status = 413, description = "Body over the limit"), (status = 415, description = "Content type the handler does not take"), (status = 422, description = "Refused by the handler or model"), (status = 429, description = "The model's queue is full"), (status = 503, description = "Temporarily unavailable"), (status = 504, description = "Past the model's responseTimeout"), (status = 507, description = "Does not fit the device")))]
async fn invocations(
    State(app): State<App>,
    InferCaller(tenant): InferCaller,
    Extension(ctx): Extension<RequestContext>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let target = headers
        .get("x-amzn-sagemaker-target-model")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.to_string());
    match target {
        Some(t) => match store::name_from_target(&t) {
            Ok(name) => serve(app, tenant, &ctx, name, None, headers, body).await,
            Err(e) => Error::from(e).into_response(),
        },
        None => Error::new(
            ErrorKind::BadRequest,
            "this is a multi-model endpoint: name the model in the X-Amzn-SageMaker-Target-Model header",
        )
        .into_response(),
    }
}

/// Reads the body up to the configured limit. Past the limit the rest is drained (up to a
/// bound, see [`serving::drain`]) before answering 413, so that clients still sending receive
/// the answer instead of a reset connection.
pub(super) async fn read_body(app: &Server, body: Body) -> Result<Vec<u8>, Error> {
    use http_body_util::BodyExt;
    let limit = app.config.max_request_bytes();
    let mut body = body;
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            Error::new(
                ErrorKind::BadRequest,
                format!("could not read request body: {e}"),
            )
        })?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                serving::drain(body, (limit as u64).saturating_mul(4).max(64 << 20)).await;
                return Err(Error::new(
                    ErrorKind::PayloadTooLarge,
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
    ctx: &RequestContext,
    name: String,
    version: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let request_id = &ctx.id;
    ctx.note(|l| l.model = Some(name.clone()));
    let result = async {
        store::validate_name(&name)?;
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
        app.invoke(&tenant, &name, version.as_deref(), request, request_id)
            .await
    }
    .await;
    let elapsed = started.elapsed();
    let mut served_version = String::new();
    let response = match result {
        Ok((r, timings)) => {
            served_version = timings.version.clone();
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
            ctx.note(|l| {
                l.version = Some(timings.version.clone());
                l.timings = Some(timings);
            });
            resp
        }
        Err(e) => e.into_response(),
    };
    let status = response.status().as_u16();
    app.record_request(&tenant.name, &name, &served_version, status, elapsed);
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

pub(super) fn add_timings(h: &mut HeaderMap, t: &Timings) {
    let ms = |d: Duration| HeaderValue::from_str(&format!("{:.3}", d.as_secs_f64() * 1e3)).unwrap();
    if let Some(l) = t.load {
        h.insert("x-model-load-time", ms(l));
    }
    if let Some(tier) = t.tier {
        h.insert("x-model-tier", HeaderValue::from_static(tier));
    }
    h.insert("x-queue-time", ms(t.queue));
    h.insert("x-preprocess-time", ms(t.preprocess));
    h.insert("x-inference-time", ms(t.inference));
    h.insert("x-postprocess-time", ms(t.postprocess));
    if t.batch > 0 {
        h.insert("x-batch-size", HeaderValue::from(t.batch));
    }
}
