//! API errors and the responses every handler builds: the `Status` object Kubernetes returns
//! for a failure and JSON bodies. Below `http`, `nodes`, `watches` and the other handlers, which
//! all return [`ApiError`].

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::{Response, StatusCode};
use serde_json::{json, Value};

/// An API error: HTTP status, `reason`, message.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) code: StatusCode,
    pub(crate) reason: &'static str,
    pub(crate) message: String,
}

impl ApiError {
    pub(crate) fn new(
        code: StatusCode,
        reason: &'static str,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
        }
    }

    pub(crate) fn not_found(kind: &str, name: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{kind} \"{name}\" not found"),
        )
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    pub(crate) fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message)
    }
}

/// A Kubernetes `Status` object for a failure.
pub(crate) fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

pub(crate) type ResBody = BoxBody<Bytes, Infallible>;

pub(crate) fn full(bytes: impl Into<Bytes>) -> ResBody {
    Full::new(bytes.into()).boxed()
}

pub(crate) fn json_response(code: StatusCode, value: &Value) -> Response<ResBody> {
    let mut res = Response::new(full(value.to_string()));
    *res.status_mut() = code;
    res.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    res
}

pub(crate) fn error_response(e: &ApiError) -> Response<ResBody> {
    json_response(e.code, &status_json(e.code.as_u16(), e.reason, &e.message))
}
