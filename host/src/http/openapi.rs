//! The API description of the main port, generated from the route handlers' annotations
//! (utoipa) and served at `GET /openapi.json`.
use super::oip::{self, InferRequestDoc, InputDoc, OutputDoc};
use super::LoadRequest;
use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tessera",
        description = "Multi-model inference host: SageMaker multi-model container routes, TorchServe inference, Open Inference Protocol v2, tenant management, health and metrics. With tokens (see SECURITY.md), send Authorization: Bearer <token>."
    ),
    paths(
        super::ping,
        super::live,
        super::ready,
        super::metrics,
        super::list_models,
        super::load_model,
        super::describe_model,
        super::unload_model,
        super::upload_version,
        super::delete_version,
        super::set_default,
        super::predictions,
        super::predictions_version,
        super::invocations,
        oip::server_metadata,
        oip::model_metadata,
        oip::model_metadata_version,
        oip::model_ready,
        oip::model_ready_version,
        oip::infer,
        oip::infer_version,
    ),
    components(schemas(LoadRequest, InferRequestDoc, InputDoc, OutputDoc)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

/// Declares the bearer token scheme every authenticated route uses.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// `GET /openapi.json` (no token: it describes the API, nothing of anyone's models).
pub(super) async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_described() {
        let doc = ApiDoc::openapi();
        let paths: Vec<&str> = doc.paths.paths.keys().map(String::as_str).collect();
        for p in [
            "/ping",
            "/v2/health/ready",
            "/models",
            "/models/{name}/versions/{version}",
            "/predictions/{name}",
            "/invocations",
            "/v2/models/{name}/infer",
            "/metrics",
        ] {
            assert!(paths.contains(&p), "{p} missing from {paths:?}");
        }
    }
}
