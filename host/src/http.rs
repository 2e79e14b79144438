//! HTTP: routes of each API dialect, authentication, body limits, and the one place where an
//! [`ErrorKind`] becomes a status code and a JSON body.
//!
//! - SageMaker multi-model container contract: `GET /ping`, `GET/POST /models`,
//!   `GET/DELETE /models/{name}`, `POST /models/{name}/invoke`, `POST /invocations` with
//!   `X-Amzn-SageMaker-Target-Model`.
//! - TorchServe inference API: `POST /predictions/{name}[/{version}]`.
//! - Tenant management: `POST /models/{name}/versions/{version}` (upload an archive),
//!   `DELETE /models/{name}/versions/{version}`, `PUT /models/{name}/{version}/set-default`.
//! - Prometheus: `GET /metrics`.
//!
//! Every route but `/ping` authenticates its caller ([`Caller`]) and sees only that tenant's
//! models; another tenant's model is indistinguishable from a missing one (404).
//!
//! This layer only parses, authenticates and calls the [`Server`]'s verbs: it never loads,
//! evicts or runs anything itself.
use crate::error::{Error, ErrorKind};
use crate::sandbox::HandlerRequest;
use crate::serving::{self, Server, Timings};
use crate::store;
use crate::tenancy::{TenancyError, Tenant};
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

type App = Arc<Server>;

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
        .fallback(|| async { Error::new(ErrorKind::NotFound, "no such route") })
        // We read bodies ourselves with the configured limit (and a JSON 413).
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::map_response(json_errors))
        .with_state(app)
}

/// The authenticated tenant of a request (every route but `/ping` takes one).
pub struct Caller(pub Arc<Tenant>);

impl FromRequestParts<App> for Caller {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Caller, Error> {
        let header = parts
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        Ok(Caller(app.tenants.authenticate(header)?))
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

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        error_response(status_of(self.kind), self.message)
    }
}

async fn ping() -> Json<serde_json::Value> {
    Json(json!({ "status": "Healthy" }))
}

/// Prometheus metrics name every tenant's models: admins only when tenants are configured.
async fn metrics(State(app): State<App>, Caller(tenant): Caller) -> Result<Response, Error> {
    if !tenant.admin {
        return Err(TenancyError::NotAdmin.into());
    }
    Ok((
        [("content-type", "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response())
}

#[derive(Deserialize)]
struct ListQuery {
    next_page_token: Option<String>,
    max_results: Option<usize>,
}

/// SageMaker ListModels: the caller's models, paginated by name.
async fn list_models(
    State(app): State<App>,
    Caller(tenant): Caller,
    Query(q): Query<ListQuery>,
) -> Json<serving::ModelList> {
    let limit = q.max_results.unwrap_or(app.config.page_size).clamp(1, 1000);
    Json(app.list(&tenant, q.next_page_token.as_deref(), limit))
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

async fn describe_model(
    State(app): State<App>,
    Caller(tenant): Caller,
    Path(name): Path<String>,
) -> Result<Json<serving::ModelInfo>, Error> {
    Ok(Json(app.describe(&tenant, &name)?))
}

/// SageMaker UnloadModel: forget the registration and unload every resident version (uploaded
/// versions stay stored; a later request loads the default again).
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
async fn upload_version(
    State(app): State<App>,
    caller: Result<Caller, Error>,
    Path((name, version)): Path<(String, String)>,
    Query(q): Query<UploadQuery>,
    body: Body,
) -> Result<Response, Error> {
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

/// SageMaker's `/invocations`: the model is named by `X-Amzn-SageMaker-Target-Model`.
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
async fn read_body(app: &Server, body: Body) -> Result<Vec<u8>, Error> {
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
    name: String,
    version: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let request_id = app.request_id();
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
        app.invoke(&tenant, &name, version.as_deref(), request, &request_id)
            .await
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
            let status = status_of(e.kind);
            if status.is_server_error() {
                tracing::warn!(
                    model = name,
                    request_id,
                    status = status.as_u16(),
                    error = e.message,
                    "request failed"
                );
            } else {
                tracing::info!(
                    model = name,
                    request_id,
                    status = status.as_u16(),
                    error = e.message,
                    "request rejected"
                );
            }
            e.into_response()
        }
    };
    let status = response.status().as_u16();
    app.record_request(&tenant.name, &name, status, elapsed);
    tracing::debug!(
        model = name,
        request_id,
        status,
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
    if t.batch > 0 {
        h.insert("x-batch-size", HeaderValue::from(t.batch));
    }
}
