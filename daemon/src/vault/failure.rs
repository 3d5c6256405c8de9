//! What went wrong talking to Vault, sorted into what the caller can do
//! about it: retry later (unavailable), fix the request, or nothing.

use std::time::Duration;

use vaultrs::error::ClientError;

use crate::issuer::IssueError;

pub(super) enum Failure {
    Timeout(Duration),
    Vault(ClientError),
    /// The task carrying the request ended without an answer.
    Lost(String),
}

/// Sorts Vault failures into what the agent should do about them.
pub(super) fn classify(f: Failure) -> IssueError {
    match f {
        Failure::Timeout(t) => IssueError::Unavailable(format!("Vault did not answer within {t:?}")),
        Failure::Vault(ClientError::APIError { code, errors }) => {
            let msg = format!("Vault answered {code}: {}", errors.join("; "));
            match code {
                400 | 404 => IssueError::BadRequest(msg),
                429 | 500..=599 => IssueError::Unavailable(msg),
                _ => IssueError::Internal(msg),
            }
        }
        // An answer the client could not read is not an outage: retrying
        // would only repeat it (and repeat what Vault did).
        Failure::Vault(ClientError::RestClientError {
            source:
                e @ (rustify::errors::ClientError::ResponseParseError { .. }
                | rustify::errors::ClientError::ResponseConversionError { .. }
                | rustify::errors::ClientError::DataParseError { .. }),
        }) => IssueError::Internal(format!("Vault answered something the broker cannot read: {e}")),
        Failure::Vault(e @ ClientError::RestClientError { .. }) => {
            IssueError::Unavailable(format!("cannot reach Vault: {e}"))
        }
        Failure::Vault(other) => IssueError::Internal(format!("unexpected answer from Vault: {other}")),
        Failure::Lost(e) => IssueError::Internal(format!("the request to Vault was lost: {e}")),
    }
}

pub(super) fn in_context(what: &str, e: IssueError) -> IssueError {
    match e {
        IssueError::Unavailable(m) => IssueError::Unavailable(format!("{what}: {m}")),
        IssueError::BadRequest(m) => IssueError::BadRequest(format!("{what}: {m}")),
        IssueError::Internal(m) => IssueError::Internal(format!("{what}: {m}")),
    }
}
