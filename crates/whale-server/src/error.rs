//! Errors in OpenAI's envelope with DeepSeek's status codes.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error answered to the client.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message.
    pub message: String,
    /// OpenAI `type`.
    pub kind: &'static str,
    /// The request field at fault.
    pub param: Option<String>,
    /// OpenAI `code`.
    pub code: &'static str,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: "invalid_request_error",
        }
    }

    /// 400: the body is not what the endpoint takes.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 "Model Not Exist", as DeepSeek answers an unknown model.
    pub fn model_not_exist() -> Self {
        let mut e = Self::bad_request("Model Not Exist");
        e.param = Some("model".into());
        e
    }

    /// 401.
    pub fn auth(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "authentication_error", message)
    }

    /// 402.
    pub fn balance() -> Self {
        Self::new(
            StatusCode::PAYMENT_REQUIRED,
            "unknown_error",
            "Insufficient Balance",
        )
    }

    /// 422: a parameter is out of range or inconsistent; names it.
    pub fn param(param: &str, message: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request_error",
            message,
        );
        e.param = Some(param.into());
        e.code = "invalid_parameter";
        e
    }

    /// 429.
    pub fn rate_limit(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message);
        e.code = "rate_limit_exceeded";
        e
    }

    /// 503: the queue is full.
    pub fn overloaded(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message);
        e.code = "server_overloaded";
        e
    }

    /// 500: a bug or a broken dependency.
    pub fn internal(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message);
        e.code = "internal_error";
        e
    }

    /// 404 for routes that do not exist.
    pub fn not_found(path: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("no such route: {path}"),
        );
        e.code = "not_found";
        e
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            r.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
        }
        r
    }
}
