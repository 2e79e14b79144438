//! Open Inference Protocol v2 over REST (KServe, Triton, `tritonclient`): server and model
//! metadata, readiness, and inference with JSON tensors or Triton's binary tensor extension.
//!
//! Inputs arrive as tensors already, so an OIP request goes straight to the model: its handler
//! is not called. A model takes OIP requests only when its `model-config.yaml` declares its
//! tensors (`tessera.oip`: names, datatypes, shapes in its `forward`'s order); inputs are
//! checked against that and put in that order, outputs named by it. Models without it answer
//! 400 and are called through their handlers (`/predictions/{name}`).
use super::{read_body, App, InferCaller, RequestContext};
use crate::error::{Error, ErrorKind};
use crate::oip::{self, OipError};
use axum::body::Body;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use std::time::Instant;

/// The OIP routes (merged into the main router).
pub fn routes() -> Router<App> {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/models/{name}", get(model_metadata))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(model_metadata_version),
        )
        .route("/v2/models/{name}/ready", get(model_ready))
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(model_ready_version),
        )
        .route("/v2/models/{name}/infer", post(infer))
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(infer_version),
        )
}

/// An OIP inference request, for the API description (decoded by [`oip::parse_infer`]).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub(super) struct InferRequestDoc {
    id: Option<String>,
    inputs: Vec<InputDoc>,
    outputs: Option<Vec<OutputDoc>>,
    #[schema(value_type = Option<Object>)]
    parameters: Option<()>,
}

/// One input tensor: `data` flat or nested, row-major.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub(super) struct InputDoc {
    name: String,
    /// FP32, FP64, FP16, BF16, INT64, INT32, INT16, INT8, UINT8 or BOOL.
    datatype: String,
    shape: Vec<i64>,
    #[schema(value_type = Vec<f64>)]
    data: (),
}

/// One requested output.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub(super) struct OutputDoc {
    name: String,
    #[schema(value_type = Option<Object>)]
    parameters: Option<()>,
}

impl From<OipError> for Error {
    fn from(e: OipError) -> Error {
        let kind = match e {
            OipError::TooLarge { .. } => ErrorKind::PayloadTooLarge,
            _ => ErrorKind::BadRequest,
        };
        Error::new(kind, e.to_string())
    }
}

#[utoipa::path(get, path = "/v2", tag = "open inference protocol", responses((status = 200, description = "Server metadata", body = Object)))]
async fn server_metadata() -> Json<serde_json::Value> {
    Json(json!({
        "name": "tessera",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data"],
    }))
}

fn tensor_specs(list: &[crate::archive::TensorSpec]) -> serde_json::Value {
    list.iter()
        .map(|t| json!({ "name": t.name, "datatype": t.datatype, "shape": t.shape }))
        .collect()
}

/// Model metadata (loads the model if it is not resident: its spec is in its archive).
async fn metadata(
    app: App,
    tenant: &crate::tenancy::Tenant,
    name: String,
    version: Option<String>,
) -> Result<Json<serde_json::Value>, Error> {
    let model = app.ensure_loaded(tenant, &name, version.as_deref()).await?;
    let spec = crate::serving::oip_spec(&model)?;
    let versions = app.registry.store().versions(&tenant.name, &name);
    let versions = if versions.is_empty() {
        vec![model.key.version.clone()]
    } else {
        versions
    };
    Ok(Json(json!({
        "name": name,
        "versions": versions,
        "platform": "pytorch_torchscript",
        "inputs": tensor_specs(&spec.inputs),
        "outputs": tensor_specs(&spec.outputs),
    })))
}

#[utoipa::path(get, path = "/v2/models/{name}", tag = "open inference protocol", params(("name" = String, Path, description = "Model name")), responses((status = 200, description = "Model metadata", body = Object), (status = 400, description = "Malformed request, or a model without tessera.oip"), (status = 401, description = "Missing or invalid token"), (status = 404, description = "No such model")))]
async fn model_metadata(
    State(app): State<App>,
    InferCaller(tenant): InferCaller,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, Error> {
    metadata(app, &tenant, name, None).await
}

#[utoipa::path(get, path = "/v2/models/{name}/versions/{version}", tag = "open inference protocol", params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "Model version")), responses((status = 200, description = "Model metadata", body = Object), (status = 400, description = "Malformed request, or a model without tessera.oip"), (status = 401, description = "Missing or invalid token"), (status = 404, description = "No such model")))]
async fn model_metadata_version(
    State(app): State<App>,
    InferCaller(tenant): InferCaller,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, Error> {
    metadata(app, &tenant, name, Some(version)).await
}

/// 200 when the model (version) is resident and takes OIP requests, 400 when it exists but is
/// not (yet) loaded, 404 when there is no such model.
async fn ready(
    app: App,
    tenant: &crate::tenancy::Tenant,
    name: String,
    version: Option<String>,
) -> Result<Response, Error> {
    let reg = app
        .registry
        .resolve(&tenant.name, &name, version.as_deref())?;
    let resident = match app.residency.peek(&reg.key).await {
        Some(m) => !app.residency.is_quarantined(&reg.key) && m.config().tessera.oip.is_some(),
        None => false,
    };
    let status = if resident {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    Ok((status, Json(json!({ "name": name, "ready": resident }))).into_response())
}

#[utoipa::path(get, path = "/v2/models/{name}/ready", tag = "open inference protocol", params(("name" = String, Path, description = "Model name")), responses((status = 200, description = "Resident and ready"), (status = 400, description = "Malformed request, or a model without tessera.oip"), (status = 401, description = "Missing or invalid token"), (status = 404, description = "No such model")))]
async fn model_ready(
    State(app): State<App>,
    InferCaller(tenant): InferCaller,
    Path(name): Path<String>,
) -> Result<Response, Error> {
    ready(app, &tenant, name, None).await
}

#[utoipa::path(get, path = "/v2/models/{name}/versions/{version}/ready", tag = "open inference protocol", params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "Model version")), responses((status = 200, description = "Resident and ready"), (status = 400, description = "Malformed request, or a model without tessera.oip"), (status = 401, description = "Missing or invalid token"), (status = 404, description = "No such model")))]
async fn model_ready_version(
    State(app): State<App>,
    InferCaller(tenant): InferCaller,
    Path((name, version)): Path<(String, String)>,
) -> Result<Response, Error> {
    ready(app, &tenant, name, Some(version)).await
}

#[utoipa::path(post, path = "/v2/models/{name}/infer", tag = "open inference protocol", params(("name" = String, Path, description = "Model name"), ("Inference-Header-Content-Length" = Option<usize>, Header, description = "Binary tensor extension: bytes of JSON before the binary data")), request_body(content = InferRequestDoc, content_type = "application/json"), responses((status = 200, description = "Outputs", body = Object), (status = 400, description = "Malformed request, or a model without tessera.oip"), (status = 401, description = "Missing or invalid token"), (status = 404, description = "No such model"), (status = 413, description = "A tensor over the limit"), (status = 429, description = "Queue full"), (status = 504, description = "Timed out"), (status = 507, description = "Does not fit")))]
async fn infer(
    State(app): State<App>,
    InferCaller(tenant): InferCaller,
    Extension(ctx): Extension<RequestContext>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    run(app, tenant, &ctx, name, None, headers, body).await
}

#[utoipa::path(post, path = "/v2/models/{name}/versions/{version}/infer", tag = "open inference protocol", params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "Model version"), ("Inference-Header-Content-Length" = Option<usize>, Header, description = "Binary tensor extension: bytes of JSON before the binary data")), request_body(content = InferRequestDoc, content_type = "application/json"), responses((status = 200, description = "Outputs", body = Object), (status = 400, description = "Malformed request, or a model without tessera.oip"), (status = 401, description = "Missing or invalid token"), (status = 404, description = "No such model"), (status = 413, description = "A tensor over the limit"), (status = 429, description = "Queue full"), (status = 504, description = "Timed out"), (status = 507, description = "Does not fit")))]
async fn infer_version(
    State(app): State<App>,
    InferCaller(tenant): InferCaller,
    Extension(ctx): Extension<RequestContext>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    run(app, tenant, &ctx, name, Some(version), headers, body).await
}

/// Decodes the request, runs the model, encodes its outputs.
async fn run(
    app: App,
    tenant: std::sync::Arc<crate::tenancy::Tenant>,
    ctx: &RequestContext,
    name: String,
    version: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    ctx.note(|l| l.model = Some(name.clone()));
    let mut served_version = String::new();
    let name_for_encode = name.clone();
    let result = async {
        crate::store::validate_name(&name)?;
        let header_len = match headers.get("inference-header-content-length") {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|s| s.trim().parse::<usize>().ok())
                    .ok_or_else(|| {
                        Error::new(
                            ErrorKind::BadRequest,
                            "Inference-Header-Content-Length must be a byte count",
                        )
                    })?,
            ),
        };
        let body = read_body(&app, body).await?;
        let limit = app.config.max_request_bytes();
        let request = oip::parse_infer(&body, header_len, limit)?;
        drop(body);
        let (outputs, timings) = app
            .infer_tensors(&tenant, &name, version.as_deref(), request.inputs)
            .await?;
        served_version = timings.version.clone();
        let bound = encoded_bound(&outputs, &request.outputs, request.binary_output);
        let max = app.config.max_response_bytes() as u64;
        if bound > max {
            return Err(Error::new(
                ErrorKind::Unprocessable,
                format!(
                    "the outputs would take up to {} MiB encoded, over the response limit of {} MiB: send smaller inputs{}",
                    bound >> 20,
                    max >> 20,
                    if request.binary_output { "" } else { " or request the outputs as binary data" }
                ),
            ));
        }
        // Encoding tens of MiB of numbers as text is CPU work: off the async runtime.
        let version = timings.version.clone();
        let encoded = crate::blocking(move || {
            oip::encode_infer(
                &name_for_encode,
                Some(&version),
                request.id.as_deref(),
                outputs,
                &request.outputs,
                request.binary_output,
            )
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, format!("encoding failed: {e}")))??;
        Ok::<_, Error>((encoded, timings))
    }
    .await;
    let response = match result {
        Ok((encoded, timings)) => {
            let mut resp = (StatusCode::OK, encoded.body).into_response();
            let h = resp.headers_mut();
            match encoded.header_len {
                Some(n) => {
                    h.insert(
                        "content-type",
                        HeaderValue::from_static("application/octet-stream"),
                    );
                    h.insert("inference-header-content-length", HeaderValue::from(n));
                }
                None => {
                    h.insert("content-type", HeaderValue::from_static("application/json"));
                }
            }
            super::add_timings(h, &timings);
            if let Ok(v) = HeaderValue::from_str(&timings.version) {
                h.insert("x-model-version", v);
            }
            ctx.note(|l| {
                l.version = Some(timings.version.clone());
                l.timings = Some(timings);
            });
            resp
        }
        Err(e) => e.into_response(),
    };
    app.record_request(
        &tenant.name,
        &name,
        &served_version,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

/// Most bytes the encoded response can take: binary outputs their data, JSON ones the longest
/// text of each element, plus the JSON around them.
fn encoded_bound(
    outputs: &[crate::runtime::HostTensor],
    requested: &[oip::RequestedOutput],
    binary_output: bool,
) -> u64 {
    use crate::runtime::DType;
    let chars = |d: DType| -> u64 {
        match d {
            DType::F64 => 25,
            DType::F32 | DType::F16 | DType::BF16 => 16,
            DType::I64 => 21,
            DType::I32 => 12,
            DType::I16 => 7,
            DType::I8 => 5,
            DType::U8 => 4,
            DType::Bool => 6,
        }
    };
    let size = |t: &crate::runtime::HostTensor, binary: bool| -> u64 {
        let numel = (t.data.len() / t.dtype.size().max(1)) as u64;
        let data = if binary {
            t.data.len() as u64
        } else {
            numel.saturating_mul(chars(t.dtype))
        };
        data.saturating_add(1024)
    };
    if requested.is_empty() {
        outputs.iter().map(|t| size(t, binary_output)).sum()
    } else {
        requested
            .iter()
            .filter_map(|r| {
                let t = outputs.iter().find(|t| t.name == r.name)?;
                Some(size(t, r.binary.unwrap_or(binary_output)))
            })
            .sum()
    }
}
