//! API errors: every failure is a status code and a JSON body `{ "error": kind, "message": … }`
//! that says what to fix.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::deals::DealsError;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed (bad JSON, bad id, bad filter).
    #[error("{0}")]
    BadRequest(String),
    /// No or wrong bearer token.
    #[error("a valid bearer token is required")]
    Unauthorized,
    /// This node does not do that (no client role, writes disabled).
    #[error("{0}")]
    Forbidden(String),
    /// No such deal.
    #[error("{0}")]
    NotFound(String),
    /// The deal's machine refused the command: nothing was recorded.
    #[error("{0}")]
    Rejected(String),
    /// The ledger or the database failed.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Rejected(_) => StatusCode::CONFLICT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::Rejected(_) => "rejected",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if matches!(self, ApiError::Internal(_)) {
            tracing::warn!(error = %self, "API request failed");
        }
        let body = Json(json!({ "error": self.kind(), "message": self.to_string() }));
        let mut response = (self.status(), body).into_response();
        if matches!(self, ApiError::Unauthorized) {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl From<DealsError> for ApiError {
    fn from(e: DealsError) -> Self {
        match e {
            DealsError::NotFound { .. } => ApiError::NotFound(e.to_string()),
            DealsError::Rejected(_) | DealsError::WrongStreamType { .. } => {
                ApiError::Rejected(e.to_string())
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Internal(e.to_string())
    }
}
