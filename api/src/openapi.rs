//! The OpenAPI 3 document of the API, generated from the handlers'
//! `#[utoipa::path]` attributes and the `ToSchema` types, and the
//! schema-only types that mirror shapes defined elsewhere (other crates'
//! types, and the JSON error body).

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::{ApiState, Limits};

/// The OpenAPI document served at `/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as served: [`openapi`] with this deployment's limits as
/// the bounds of the numbers they bound, and links in OpenAPI's spelling.
pub fn openapi_json_value(limits: &Limits) -> serde_json::Value {
    let mut doc = serde_json::to_value(openapi()).expect("the OpenAPI document serializes");
    camel_case_links(&mut doc);
    let job = "/components/schemas/SubmitJob/properties";
    for (field, max) in [
        ("num_samples", limits.max_num_samples as i64),
        ("steps", limits.max_steps),
        ("shard_size", limits.max_shard_size as i64),
    ] {
        if let Some(p) = doc.pointer_mut(&format!("{job}/{field}")) {
            p["maximum"] = max.into();
        }
    }
    if let Some(p) = doc.pointer_mut("/components/schemas/SubmitBatch/properties/jobs") {
        p["maxItems"] = limits.max_batch_entries.into();
    }
    if let Some(params) = doc
        .pointer_mut("/paths/~1v1~1jobs/get/parameters")
        .and_then(|p| p.as_array_mut())
    {
        for p in params.iter_mut().filter(|p| p["name"] == "limit") {
            p["schema"]["maximum"] = limits.max_page.into();
        }
    }
    doc
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "service",
    responses((status = 200, description = "The OpenAPI 3 document of this API", body = Object))
)]
pub(crate) async fn openapi_json(State(st): State<Arc<ApiState>>) -> impl IntoResponse {
    let doc = st
        .openapi
        .get_or_init(|| {
            serde_json::to_vec(&openapi_json_value(&st.limits))
                .expect("JSON")
                .into()
        })
        .clone();
    ([(header::CONTENT_TYPE, "application/json")], doc)
}

/// utoipa 5.5 writes a Link object's `operationId` and `operationRef` in
/// snake case (its `Link` lacks the camel-case renaming its other types
/// have): renamed here, in every response's links, as OpenAPI spells them.
fn camel_case_links(doc: &mut serde_json::Value) {
    let Some(paths) = doc.get_mut("paths").and_then(|p| p.as_object_mut()) else {
        return;
    };
    for item in paths.values_mut().filter_map(|i| i.as_object_mut()) {
        for operation in item.values_mut() {
            let Some(responses) = operation
                .get_mut("responses")
                .and_then(|r| r.as_object_mut())
            else {
                continue;
            };
            for response in responses.values_mut() {
                let Some(links) = response.get_mut("links").and_then(|l| l.as_object_mut()) else {
                    continue;
                };
                for link in links.values_mut().filter_map(|l| l.as_object_mut()) {
                    for (from, to) in [
                        ("operation_id", "operationId"),
                        ("operation_ref", "operationRef"),
                    ] {
                        if let Some(v) = link.remove(from) {
                            link.insert(to.to_string(), v);
                        }
                    }
                }
            }
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "dig-cluster API",
        description = "Sampling protein conformational ensembles with DiG: upload features, \
                       submit jobs, follow their progress and download the samples. Every \
                       `/v1` route needs `Authorization: Bearer KEY`. Errors are \
                       `{\"error\": {\"code\", \"message\"}}`."
    ),
    paths(
        crate::healthz,
        crate::ready::readyz,
        openapi_json,
        crate::upload_features,
        crate::structures::upload_structures,
        crate::models::list_models,
        crate::submit_job,
        crate::list_jobs,
        crate::batches::submit_batch,
        crate::batches::get_batch,
        crate::batches::cancel_batch,
        crate::get_job,
        crate::events::job_events,
        crate::cancel_job,
        crate::results::get_results,
        crate::results::get_results_pdb,
        crate::results::get_results_xtc,
        crate::results::get_topology_pdb,
        crate::results::get_shard,
    ),
    components(schemas(
        ErrorBody,
        ErrorDetail,
        JobStateSchema,
        PrioritySchema,
        WebhookStateSchema,
        SolverSchema,
        FilterSchema
    )),
    modifiers(&BearerAuth, &Links),
    tags(
        (name = "service", description = "Health, readiness and this document"),
        (name = "features", description = "Protein features"),
        (name = "structures", description = "Structures that partial-diffusion jobs start from"),
        (name = "models", description = "Models available to jobs"),
        (name = "jobs", description = "Sampling jobs"),
        (name = "batches", description = "Many jobs submitted, followed and cancelled together"),
        (name = "results", description = "Samples of finished shards and jobs"),
    )
)]
struct ApiDoc;

/// The `bearer` security scheme the `/v1` routes name.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("A tenant's API key"))
                    .build(),
            ),
        );
    }
}

/// OpenAPI links from a submission's answer to what a client does next
/// with the id it got: read, cancel and fetch a job; read and cancel a
/// batch. Clients can follow them, and Schemathesis's stateful phase chains
/// these calls on the ids the API really made.
struct Links;

impl Modify for Links {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::link::LinkBuilder;
        use utoipa::openapi::RefOr;
        // (link name, operation id, description) per submission route.
        type Targets = &'static [(&'static str, &'static str, &'static str)];
        let links: [(&str, Targets); 2] = [
            (
                "/v1/jobs",
                &[
                    ("GetJob", "get_job", "The submitted job"),
                    ("CancelJob", "cancel_job", "Cancel the submitted job"),
                    (
                        "GetResults",
                        "get_results",
                        "The submitted job's results manifest",
                    ),
                ],
            ),
            (
                "/v1/batches",
                &[
                    ("GetBatch", "get_batch", "The submitted batch"),
                    ("CancelBatch", "cancel_batch", "Cancel the submitted batch"),
                ],
            ),
        ];
        for (path, targets) in links {
            let Some(item) = doc.paths.paths.get_mut(path) else {
                continue;
            };
            let Some(post) = item.post.as_mut() else {
                continue;
            };
            // 202: a new job or batch; 200: the one an Idempotency-Key names.
            for status in ["202", "200"] {
                let Some(RefOr::T(response)) = post.responses.responses.get_mut(status) else {
                    continue;
                };
                for (name, operation, description) in targets {
                    response.links.insert(
                        name.to_string(),
                        RefOr::T(
                            LinkBuilder::new()
                                .operation_id(*operation)
                                .parameter("id", "$response.body#/id")
                                .description(*description)
                                .build(),
                        ),
                    );
                }
            }
        }
    }
}

/// Every error: `{"error": {"code", "message"}}`.
#[derive(Serialize, ToSchema)]
#[schema(as = Error)]
pub(crate) struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct ErrorDetail {
    /// Stable, for programs: e.g. `invalid_request`, `not_found`, `already_final`.
    pub code: String,
    /// For people: what is wrong and, where it helps, what to do.
    pub message: String,
}

/// A job's state; `succeeded`, `failed` and `cancelled` are final.
#[derive(ToSchema)]
#[schema(as = JobState)]
#[allow(dead_code)]
#[serde(rename_all = "lowercase")]
pub(crate) enum JobStateSchema {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

/// Where a job's webhook stands: `pending` (the job is not final yet, or
/// attempts are being retried), `delivered` (a 2xx answer came back),
/// `failed` (every attempt failed; no more are made).
#[derive(ToSchema)]
#[schema(as = WebhookState)]
#[allow(dead_code)]
#[serde(rename_all = "lowercase")]
pub(crate) enum WebhookStateSchema {
    Pending,
    Delivered,
    Failed,
}

/// Interactive work overtakes bulk work.
#[derive(ToSchema)]
#[schema(as = Priority)]
#[allow(dead_code)]
#[serde(rename_all = "lowercase")]
pub(crate) enum PrioritySchema {
    Interactive,
    Bulk,
}

/// How the sampler integrates: `euler` (the published update), `exp`,
/// `heun` or `ab2` (the README's fidelity table), or `flow` (the
/// probability-flow ODE, docs/density.md).
#[derive(ToSchema)]
#[schema(as = Solver)]
#[allow(dead_code)]
#[serde(rename_all = "lowercase")]
pub(crate) enum SolverSchema {
    Euler,
    Exp,
    Heun,
    Ab2,
    Flow,
}

/// Which samples a filtered job keeps: `physical` (BioEmu's validity
/// criteria).
#[derive(ToSchema)]
#[schema(as = Filter)]
#[allow(dead_code)]
#[serde(rename_all = "lowercase")]
pub(crate) enum FilterSchema {
    Physical,
}

/// The `steering` object of a job (README, "Steering"): its JSON Schema.
/// What it cannot state is checked at submission (400 naming the field):
/// `window`'s order (t_start >= t_end), that more than one particle or a
/// guidance needs a potential, the solver (euler), and what depends on the
/// protein (`reference_ca` one point per residue, `residues` within it,
/// native contacts within `cutoff`).
pub(crate) fn steering_schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    use serde_json::json;
    let common = json!({
        "weight": {"type": "number", "minimum": 0, "description": "Multiplies the term (default 1)"},
        "target": {"type": "number", "description": "Where the flat bottom is centred"},
        "flat_bottom": {"type": "number", "minimum": 0, "description": "Half-width of the flat bottom"},
        "slope": {"type": "number", "exclusiveMinimum": 0},
        "order": {"type": "number", "minimum": 1, "maximum": 8},
        "linear_from": {"type": "number", "exclusiveMinimum": 0, "description": "Linear beyond this excess"},
        "side": {"type": "string", "enum": ["both", "below", "above"]}
    });
    let ca = json!({
        "type": "array",
        "description": "The reference's CA coordinates, Å, one [x, y, z] per residue of the protein",
        "minItems": 1,
        "items": {"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3}
    });
    let term = |kind: &str, extra: serde_json::Value, required: &[&str]| {
        let mut props = common.clone();
        props["type"] = json!({"type": "string", "enum": [kind]});
        for (k, v) in extra.as_object().unwrap() {
            props[k] = v.clone();
        }
        let mut req = vec!["type".to_string()];
        req.extend(required.iter().map(|r| r.to_string()));
        json!({"type": "object", "title": kind, "additionalProperties": false,
               "properties": props, "required": req})
    };
    let potentials = json!({
        "type": "array",
        "description": "The potential terms, summed",
        "items": {"oneOf": [
            term("chain_break", json!({}), &[]),
            term("clash", json!({"min_separation": {"type": "integer", "minimum": 0, "maximum": u32::MAX}}), &[]),
            term("rg", json!({}), &["target"]),
            term("distance", json!({"residues": {
                "type": "array", "description": "The two residues, 1-based, different",
                "items": {"type": "integer", "minimum": 1}, "minItems": 2, "maxItems": 2}}),
                &["target", "residues"]),
            term("rmsd", json!({"reference_ca": ca}), &["reference_ca"]),
            term("q", json!({"reference_ca": ca, "cutoff": {"type": "number", "exclusiveMinimum": 0}}),
                &["reference_ca"]),
        ]}
    });
    let schema = json!({
        "type": ["object", "null"],
        "description": "Steered sampling by sequential Monte Carlo (README, \"Steering\"); needs solver euler",
        "additionalProperties": false,
        "properties": {
            "particles": {"type": "integer", "minimum": 1, "maximum": 64, "description": "Particles per returned sample (default 4)"},
            "ess_threshold": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "description": "Resample below this fraction of K (default 0.5)"},
            "window": {"type": "array", "description": "[t_start, t_end], 1 >= t_start >= t_end >= 0 (default [0.9, 0.1])",
                       "items": {"type": "number", "minimum": 0, "maximum": 1}, "minItems": 2, "maxItems": 2},
            "noise": {"type": "number", "exclusiveMinimum": 0, "maximum": 2, "description": "Noise factor eta (default 1)"},
            "guidance": {"type": "number", "minimum": 0, "maximum": 1000, "description": "Gradient guidance (default 0)"},
            "potentials": potentials
        }
    });
    utoipa::openapi::RefOr::T(serde_json::from_value(schema).expect("the steering schema"))
}

/// Raw bytes (an npz).
#[derive(ToSchema)]
#[schema(as = Binary, value_type = String, format = Binary)]
#[allow(dead_code)]
pub(crate) struct BinarySchema(Vec<u8>);

/// Uploaded features.
#[derive(ToSchema)]
#[schema(as = FeatureRef)]
#[allow(dead_code)]
pub(crate) struct FeatureRefSchema {
    /// SHA-256 of the file, 64 lowercase hex digits: the `features_sha256` of jobs.
    sha256: String,
    /// Number of residues L.
    length: u64,
    /// Size of the file in bytes.
    bytes: u64,
}

/// The manifest of a finished job: every shard of a succeeded job, or the
/// shards a failed or cancelled job finished.
#[derive(ToSchema)]
#[schema(as = Manifest)]
#[allow(dead_code)]
pub(crate) struct ManifestSchema {
    #[schema(format = Uuid)]
    job: String,
    /// The samples the job asked for (a partial manifest holds fewer).
    num_samples: u64,
    /// `true`: the job succeeded and `shards` is every shard. `false`: the
    /// job failed or was cancelled and `shards` is those finished, which
    /// may still grow while shards that were running at the end finish.
    complete: bool,
    /// The shards, by ascending index.
    shards: Vec<ManifestShardSchema>,
}

#[derive(ToSchema)]
#[schema(as = ManifestShard)]
#[allow(dead_code)]
pub(crate) struct ManifestShardSchema {
    index: u64,
    /// Samples `[start, end)` of the job.
    start: u64,
    end: u64,
    /// The object key.
    key: String,
    bytes: u64,
    /// SHA-256 of the object, lowercase hex.
    sha256: String,
}
