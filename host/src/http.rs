//! HTTP: routes and API compatibility layers, and the one place where errors become statuses.
//!
//! - SageMaker multi-model container contract: `GET /ping`, `GET/POST /models`,
//!   `GET/DELETE /models/{name}`, `POST /models/{name}/invoke`, `POST /invocations` with
//!   `X-Amzn-SageMaker-Target-Model`.
//! - TorchServe inference API: `POST /predictions/{name}`.
//! - Prometheus: `GET /metrics`.
//!
//! This layer only translates: it never loads, evicts or runs anything itself.
use crate::inference::{InferenceError, Tessera, Timings};
use crate::registry::RegistryError;
use crate::residency::ResidencyError;
use crate::runtime::RuntimeError;
use crate::sandbox::{HandlerFailure, HandlerRequest, SandboxError};
use crate::store::{self, StoreError};
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
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
        .route("/models/{name}/invoke", post(invoke_model))
        .route("/invocations", post(invocations))
        .route("/predictions/{name}", post(predictions))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route".into()) })
        // We read bodies ourselves with the configured limit (and a JSON 413).
        .layer(DefaultBodyLimit::disable())
        .with_state(app)
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
        (self.status, Json(body)).into_response()
    }
}

impl From<InferenceError> for ApiError {
    fn from(e: InferenceError) -> ApiError {
        let message = e.to_string();
        let status = match &e {
            InferenceError::Registry(r) => registry_status(r),
            InferenceError::Residency(r) => match r.as_ref() {
                ResidencyError::Archive(_) | ResidencyError::Runtime(_) => {
                    StatusCode::UNPROCESSABLE_ENTITY
                }
                ResidencyError::Handler(SandboxError::InvalidComponent(_)) => {
                    StatusCode::UNPROCESSABLE_ENTITY
                }
                ResidencyError::Handler(s) => sandbox_status(s),
                ResidencyError::InsufficientMemory(_) => StatusCode::INSUFFICIENT_STORAGE,
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
        RegistryError::Exists(_) => StatusCode::CONFLICT,
        RegistryError::Store(StoreError::BadName(_) | StoreError::BadUrl(_)) => {
            StatusCode::BAD_REQUEST
        }
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

async fn metrics(State(app): State<App>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
}

#[derive(Deserialize)]
struct ListQuery {
    next_page_token: Option<String>,
    max_results: Option<usize>,
}

async fn model_json(app: &Tessera, name: &str, url: &str) -> serde_json::Value {
    let resident = app.residency.peek(name).await;
    let evictions: u64 = ["size", "explicit"]
        .iter()
        .map(|c| app.metrics.evictions.with_label_values(&[name, c]).get())
        .sum();
    let mut v = json!({
        "modelName": name,
        "modelUrl": url,
        "state": if resident.is_some() { "Loaded" } else { "Unloaded" },
        "evictions": evictions,
    });
    if let Some(m) = resident {
        let c = &m.unpacked.config;
        v["device"] = json!(crate::runtime::device_name(m.torch.device));
        v["residentBytes"] = json!(m.weight);
        v["loadTimeMs"] = json!(m.load_time.as_millis() as u64);
        v["inFlight"] = json!(m.in_use());
        v["maxWorkers"] = json!(c.max_workers);
        v["batchSize"] = json!(c.batch_size);
        v["responseTimeout"] = json!(c.response_timeout);
    }
    v
}

/// SageMaker ListModels: registered models, paginated by name.
async fn list_models(
    State(app): State<App>,
    Query(q): Query<ListQuery>,
) -> Json<serde_json::Value> {
    let limit = q.max_results.unwrap_or(app.config.page_size).clamp(1, 1000);
    let (page, next) = app.registry.page(q.next_page_token.as_deref(), limit);
    let mut models = Vec::with_capacity(page.len());
    for r in &page {
        models.push(model_json(&app, &r.name, &r.url).await);
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
async fn load_model(State(app): State<App>, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(&app, body).await?;
    let req: LoadRequest = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("expected {{\"model_name\", \"url\"}}: {e}"),
        )
    })?;
    let reg = app.registry.register(&req.model_name, &req.url)?;
    match app.residency.get(&reg).await {
        Ok(_) => Ok((
            StatusCode::OK,
            Json(json!({ "status": format!("Model \"{}\" loaded", reg.name) })),
        )
            .into_response()),
        Err(e) => {
            app.registry.remove(&reg.name);
            Err(InferenceError::Residency(e).into())
        }
    }
}

async fn describe_model(
    State(app): State<App>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    store::validate_name(&name).map_err(RegistryError::from)?;
    let reg = app
        .registry
        .get(&name)
        .ok_or_else(|| RegistryError::NotFound(name.clone()))?;
    Ok(Json(model_json(&app, &reg.name, &reg.url).await))
}

async fn unload_model(
    State(app): State<App>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    store::validate_name(&name).map_err(RegistryError::from)?;
    let reg = app
        .registry
        .remove(&name)
        .ok_or_else(|| RegistryError::NotFound(name.clone()))?;
    app.residency.remove(&reg.name).await;
    Ok(Json(
        json!({ "status": format!("Model \"{}\" unloaded", reg.name) }),
    ))
}

async fn invoke_model(
    State(app): State<App>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    serve(app, name, headers, body).await
}

async fn predictions(
    State(app): State<App>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    serve(app, name, headers, body).await
}

async fn invocations(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    let target = headers
        .get("x-amzn-sagemaker-target-model")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.to_string());
    match target {
        Some(t) => match store::name_from_target(&t) {
            Ok(name) => serve(app, name, headers, body).await,
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
/// bound) before answering 413, so that clients still sending receive the answer instead of a
/// reset connection.
async fn read_body(app: &Tessera, body: Body) -> Result<Vec<u8>, ApiError> {
    use http_body_util::BodyExt;
    let limit = app.config.max_request_bytes();
    let drain_cap = limit.saturating_mul(4).max(64 << 20);
    let mut body = body;
    let mut buf = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("could not read request body: {e}"),
            )
        })?;
        if let Ok(data) = frame.into_data() {
            total = total.saturating_add(data.len());
            if total <= limit {
                buf.extend_from_slice(&data);
            } else if total > drain_cap {
                break;
            }
        }
    }
    if total > limit {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body exceeds the limit of {} MiB",
                app.config.max_request_mib
            ),
        ));
    }
    Ok(buf)
}

/// Runs one inference and turns the result into a response with timing headers.
async fn serve(app: App, name: String, headers: HeaderMap, body: Body) -> Response {
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
        app.invoke(&name, request, &request_id)
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
            if let Ok(ct) = HeaderValue::from_str(&r.content_type) {
                resp.headers_mut().insert("content-type", ct);
            }
            add_timings(resp.headers_mut(), &timings);
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
    if store::validate_name(&name).is_ok() {
        app.metrics
            .requests
            .with_label_values(&[name.as_str(), code.as_str()])
            .inc();
        app.metrics
            .request_seconds
            .with_label_values(&[name.as_str()])
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
