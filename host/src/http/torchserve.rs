//! TorchServe's management API, on its own port (`--management-address`, TorchServe's 8081):
//! register by `POST /models?url=...&model_name=...`, list with `limit`/`next_page_token`,
//! describe (`/models/{m}`, `/models/{m}/all`, `/models/{m}/{v}`: arrays of versions, as
//! TorchServe answers), scale workers (`PUT /models/{m}[/{v}]?min_worker=&max_worker=`, mapped
//! to the forward threads of Tessera's engine), set-default and unregister (a version or the
//! model). Its own port because its shapes collide with SageMaker's on the main one (`POST
//! /models` takes a JSON body there, `GET /models/{m}` answers an object).
//!
//! Callers authenticate as management callers of the auth mode, exactly as on the main port.
use super::{App, Caller};
use crate::error::{Error, ErrorKind};
use crate::serving::Versions;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

/// The TorchServe management router.
pub fn router(app: App) -> Router {
    Router::new()
        .route("/models", get(list).post(register))
        .route(
            "/models/{name}",
            get(describe).put(scale).delete(unregister),
        )
        .route("/models/{name}/all", get(describe_all))
        .route(
            "/models/{name}/{version}",
            get(describe_version)
                .put(scale_version)
                .delete(unregister_version),
        )
        .route("/models/{name}/{version}/set-default", put(set_default))
        .fallback(|| async { Error::new(ErrorKind::NotFound, "no such route") })
        .layer(axum::middleware::map_response(super::json_errors))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            super::request_context,
        ))
        .with_state(app)
}

/// `POST /models` query parameters, as TorchServe documents them.
#[derive(Deserialize)]
struct RegisterQuery {
    url: String,
    model_name: Option<String>,
    /// 0 (TorchServe's default): registered now, loaded at the first request; more: loaded now
    /// with the archive's maxWorkers unless this says otherwise.
    #[serde(default)]
    initial_workers: u32,
    #[serde(default = "yes")]
    synchronous: bool,
    batch_size: Option<u32>,
    max_batch_delay: Option<u64>,
    response_timeout: Option<u64>,
    handler: Option<String>,
    runtime: Option<String>,
}

fn yes() -> bool {
    true
}

/// Register a model from an archive in the store. The per-registration overrides TorchServe
/// takes (`batch_size`, ...) belong in the archive's model-config.yaml here: they are named in
/// the answer as ignored.
async fn register(
    State(app): State<App>,
    Caller(tenant): Caller,
    Query(q): Query<RegisterQuery>,
) -> Result<Response, Error> {
    let name = match q.model_name {
        Some(n) => n,
        None => q
            .url
            .rsplit('/')
            .next()
            .and_then(|f| f.strip_suffix(crate::store::ARCHIVE_SUFFIX))
            .map(str::to_string)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::BadRequest,
                    "name the model (model_name) or give a url ending in .tar.gz",
                )
            })?,
    };
    let ignored: Vec<&str> = [
        ("batch_size", q.batch_size.is_some()),
        ("max_batch_delay", q.max_batch_delay.is_some()),
        ("response_timeout", q.response_timeout.is_some()),
        ("handler", q.handler.is_some()),
        ("runtime", q.runtime.is_some()),
    ]
    .into_iter()
    .filter_map(|(k, given)| given.then_some(k))
    .collect();
    if !ignored.is_empty() {
        tracing::warn!(model = name, ?ignored,
            "register: TorchServe per-registration settings are taken from the archive's model-config.yaml; these are ignored");
    }
    let load = q.initial_workers > 0;
    if !load {
        app.register_url(&tenant, &name, &q.url, false).await?;
    } else {
        // Registered first so that the worker count applies to the load.
        app.register_url(&tenant, &name, &q.url, false).await?;
        let reg = app.registry.resolve(&tenant.name, &name, None)?;
        app.workers.set(reg.key.clone(), q.initial_workers.min(64));
        let loading = {
            let (app, tenant, reg) = (app.clone(), tenant.clone(), reg.clone());
            async move { app.resident(&reg, &tenant).await.map(|_| ()) }
        };
        if q.synchronous {
            if let Err(e) = loading.await {
                app.registry.forget_if(&tenant.name, &name, &reg);
                app.workers.clear(&reg.key);
                return Err(e);
            }
        } else {
            tokio::spawn(async move {
                if let Err(e) = loading.await {
                    tracing::warn!(error = %e, "asynchronous registration failed to load");
                }
            });
            let status = format!(
                "Model \"{name}\" registered; loading {} initial workers",
                q.initial_workers
            );
            return Ok((
                StatusCode::ACCEPTED,
                Json(json!({ "status": status, "ignored": ignored })),
            )
                .into_response());
        }
    }
    let status = format!(
        "Model \"{name}\" Version: {} registered with {} initial workers{}",
        crate::registry::UNVERSIONED,
        q.initial_workers,
        if load {
            ""
        } else {
            ". It loads at its first request, or scale workers to load it now."
        }
    );
    Ok(Json(json!({ "status": status, "ignored": ignored })).into_response())
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<usize>,
    next_page_token: Option<String>,
}

async fn list(
    State(app): State<App>,
    Caller(tenant): Caller,
    Query(q): Query<ListQuery>,
) -> Json<serde_json::Value> {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let page = app.list(&tenant, q.next_page_token.as_deref(), limit);
    let models: Vec<_> = page
        .models
        .iter()
        .map(|m| json!({ "modelName": m.model_name, "modelUrl": m.model_url }))
        .collect();
    let mut body = json!({ "models": models });
    if let Some(next) = page.next_page_token {
        body["nextPageToken"] = json!(next);
    }
    Json(body)
}

async fn describe(
    State(app): State<App>,
    Caller(tenant): Caller,
    Path(name): Path<String>,
) -> Result<Json<Vec<crate::serving::VersionInfo>>, Error> {
    Ok(Json(
        app.describe_versions(&tenant, &name, Versions::Default)
            .await?,
    ))
}

async fn describe_all(
    State(app): State<App>,
    Caller(tenant): Caller,
    Path(name): Path<String>,
) -> Result<Json<Vec<crate::serving::VersionInfo>>, Error> {
    Ok(Json(
        app.describe_versions(&tenant, &name, Versions::All).await?,
    ))
}

async fn describe_version(
    State(app): State<App>,
    Caller(tenant): Caller,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<Vec<crate::serving::VersionInfo>>, Error> {
    Ok(Json(
        app.describe_versions(&tenant, &name, Versions::One(&version))
            .await?,
    ))
}

/// `PUT /models/{m}` query parameters (TorchServe's scale workers).
#[derive(Deserialize)]
struct ScaleQuery {
    min_worker: Option<u32>,
    max_worker: Option<u32>,
    #[serde(default)]
    synchronous: bool,
}

async fn scale_inner(
    app: App,
    tenant: std::sync::Arc<crate::tenancy::Tenant>,
    name: String,
    version: Option<String>,
    q: ScaleQuery,
) -> Result<Response, Error> {
    // Tessera keeps no idle pool: a model runs max_worker forward threads (min_worker when
    // only that is given, as TorchServe then sets both).
    let workers = q
        .max_worker
        .or(q.min_worker)
        .ok_or_else(|| Error::new(ErrorKind::BadRequest, "give min_worker and/or max_worker"))?;
    if let (Some(lo), Some(hi)) = (q.min_worker, q.max_worker) {
        if lo > hi {
            return Err(Error::new(
                ErrorKind::BadRequest,
                "min_worker exceeds max_worker",
            ));
        }
    }
    let job = {
        let (app, tenant, name) = (app.clone(), tenant.clone(), name.clone());
        async move {
            app.scale_workers(&tenant, &name, version.as_deref(), workers)
                .await
        }
    };
    if q.synchronous {
        job.await?;
        let status = format!("Workers scaled to {workers} for model: {name}");
        Ok(Json(json!({ "status": status })).into_response())
    } else {
        tokio::spawn(async move {
            if let Err(e) = job.await {
                tracing::warn!(model = name, error = %e, "scaling workers failed");
            }
        });
        Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "status": "Processing worker updates..." })),
        )
            .into_response())
    }
}

async fn scale(
    State(app): State<App>,
    Caller(tenant): Caller,
    Path(name): Path<String>,
    Query(q): Query<ScaleQuery>,
) -> Result<Response, Error> {
    scale_inner(app, tenant, name, None, q).await
}

async fn scale_version(
    State(app): State<App>,
    Caller(tenant): Caller,
    Path((name, version)): Path<(String, String)>,
    Query(q): Query<ScaleQuery>,
) -> Result<Response, Error> {
    scale_inner(app, tenant, name, Some(version), q).await
}

async fn unregister(
    State(app): State<App>,
    Caller(tenant): Caller,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, Error> {
    app.unload(&tenant, &name).await?;
    Ok(Json(
        json!({ "status": format!("Model \"{name}\" unregistered") }),
    ))
}

async fn unregister_version(
    State(app): State<App>,
    Caller(tenant): Caller,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, Error> {
    app.unregister_version(&tenant, &name, &version).await?;
    Ok(Json(json!({
        "status": format!("Model \"{name}\" version: {version} unregistered")
    })))
}

async fn set_default(
    State(app): State<App>,
    Caller(tenant): Caller,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, Error> {
    app.set_default(&tenant, &name, &version)?;
    Ok(Json(json!({
        "status": format!("Default version successfully updated for model \"{name}\" to \"{version}\"")
    })))
}
