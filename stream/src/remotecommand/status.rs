//! The Kubernetes `metav1.Status` a remote command ends with, as the Go server writes it.

use serde::{Deserialize, Serialize};

use crate::backend::BackendError;

pub const REASON_NON_ZERO_EXIT: &str = "NonZeroExitCode";
pub const CAUSE_EXIT_CODE: &str = "ExitCode";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Status {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(rename = "apiVersion", skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub status: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<StatusDetails>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct StatusDetails {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub causes: Vec<StatusCause>,
}

/// `metav1.StatusCause`; Go names its `Type` field `reason` on the wire.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct StatusCause {
    #[serde(rename = "reason", default, skip_serializing_if = "String::is_empty")]
    pub cause_type: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl Status {
    fn new(status: &str) -> Self {
        Self {
            kind: Some("Status".into()),
            api_version: Some("v1".into()),
            status: status.into(),
            ..Self::default()
        }
    }

    pub fn success() -> Self {
        Self::new("Success")
    }

    pub fn is_success(&self) -> bool {
        self.status == "Success"
    }

    /// The status for a process that exited: Success for 0, else NonZeroExitCode with the
    /// code as the `ExitCode` cause (the client parses it as 0..=255).
    pub fn exit(code: i32) -> Self {
        if code == 0 {
            return Self::success();
        }
        if !(0..=255).contains(&code) {
            return Self::internal(&format!("exit code {code} out of range 0..=255"));
        }
        Self {
            message: format!("command terminated with non-zero exit code: exit status {code}"),
            reason: REASON_NON_ZERO_EXIT.into(),
            details: Some(StatusDetails {
                causes: vec![StatusCause {
                    cause_type: CAUSE_EXIT_CODE.into(),
                    message: code.to_string(),
                }],
            }),
            ..Self::new("Failure")
        }
    }

    pub fn internal(msg: &str) -> Self {
        Self {
            message: format!("Internal error occurred: {msg}"),
            reason: "InternalError".into(),
            details: Some(StatusDetails {
                causes: vec![StatusCause {
                    cause_type: String::new(),
                    message: msg.into(),
                }],
            }),
            code: Some(500),
            ..Self::new("Failure")
        }
    }

    /// What the backend's error becomes; `what` says which operation failed.
    pub fn from_backend(what: &str, e: &BackendError) -> Self {
        let msg = format!("{what}: {e}");
        match e {
            BackendError::NotFound(_) => Self {
                message: msg,
                reason: "NotFound".into(),
                code: Some(404),
                ..Self::new("Failure")
            },
            BackendError::InvalidArgument(_) | BackendError::FailedPrecondition(_) => Self {
                message: msg,
                reason: "BadRequest".into(),
                code: Some(400),
                ..Self::new("Failure")
            },
            BackendError::Internal(_) => Self::internal(&msg),
        }
    }

    /// v4 and later: the JSON object.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain strings and maps cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// v1–v3: nothing on success, the error text on failure (Go's `StatusError.Error()`).
    pub fn to_v1_message(&self) -> Option<Vec<u8>> {
        (!self.is_success()).then(|| self.message.clone().into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_matches_what_client_go_decodes() {
        let v: serde_json::Value =
            serde_json::from_slice(&Status::exit(3).to_json()).expect("json");
        assert_eq!(v["status"], "Failure");
        assert_eq!(v["reason"], "NonZeroExitCode");
        assert_eq!(v["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(v["details"]["causes"][0]["message"], "3");
        let ok: serde_json::Value =
            serde_json::from_slice(&Status::exit(0).to_json()).expect("json");
        assert_eq!(ok["status"], "Success");
        assert_eq!(ok["metadata"], serde_json::json!({}));
        assert_eq!(Status::success().to_v1_message(), None);
        assert!(Status::exit(300).reason == "InternalError");
    }
}
