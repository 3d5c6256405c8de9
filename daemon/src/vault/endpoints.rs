//! Vault endpoints vaultrs does not offer in the form we need.
//!
//! vaultrs's database credential call returns only `data` and drops the
//! `lease_id`; reading the path through [`LeasedRead`] keeps the whole response.
//! Both calls that mint ([`LeasedRead`], [`CreateOrphanToken`]) return the
//! answer as plain JSON, read field by field by the issuer: a typed parse
//! that fails would lose the name of what Vault created, and with it the
//! means to revoke it.

use rustify::endpoint::Endpoint;
use rustify::enums::{RequestMethod, RequestType, ResponseType};
use serde_json::Value;
use vaultrs::api::EndpointResult;

/// `GET /v1/<path>` returning the full response, lease included.
pub struct LeasedRead {
    pub path: String,
}

impl Endpoint for LeasedRead {
    type Response = Value;
    const REQUEST_BODY_TYPE: RequestType = RequestType::JSON;
    const RESPONSE_BODY_TYPE: ResponseType = ResponseType::JSON;

    fn path(&self) -> String {
        self.path.clone()
    }

    fn method(&self) -> RequestMethod {
        RequestMethod::GET
    }
}

/// `POST /v1/auth/token/create-orphan` with `body` (policies, TTLs, uses,
/// metadata), returning the whole answer.
pub struct CreateOrphanToken {
    pub body: Value,
}

impl Endpoint for CreateOrphanToken {
    type Response = Value;
    const REQUEST_BODY_TYPE: RequestType = RequestType::JSON;
    const RESPONSE_BODY_TYPE: ResponseType = ResponseType::JSON;

    fn path(&self) -> String {
        "auth/token/create-orphan".into()
    }

    fn method(&self) -> RequestMethod {
        RequestMethod::POST
    }

    fn body(&self) -> Result<Option<Vec<u8>>, rustify::errors::ClientError> {
        Ok(Some(serde_json::to_vec(&self.body).unwrap_or_default()))
    }
}

/// `PUT /v1/sys/leases/revoke`.
pub struct RevokeLease {
    pub lease_id: String,
}

impl Endpoint for RevokeLease {
    type Response = ();
    const REQUEST_BODY_TYPE: RequestType = RequestType::JSON;
    const RESPONSE_BODY_TYPE: ResponseType = ResponseType::JSON;

    fn path(&self) -> String {
        "sys/leases/revoke".into()
    }

    fn method(&self) -> RequestMethod {
        RequestMethod::PUT
    }

    fn body(&self) -> Result<Option<Vec<u8>>, rustify::errors::ClientError> {
        Ok(Some(serde_json::to_vec(&serde_json::json!({ "lease_id": self.lease_id })).unwrap_or_default()))
    }
}

/// `PUT /v1/sys/leases/renew`: sets the lease's TTL to `increment` from now
/// (Vault may not extend it past the role's max TTL).
pub struct RenewLease {
    pub lease_id: String,
    pub increment_secs: u64,
}

impl Endpoint for RenewLease {
    type Response = EndpointResult<Value>;
    const REQUEST_BODY_TYPE: RequestType = RequestType::JSON;
    const RESPONSE_BODY_TYPE: ResponseType = ResponseType::JSON;

    fn path(&self) -> String {
        "sys/leases/renew".into()
    }

    fn method(&self) -> RequestMethod {
        RequestMethod::PUT
    }

    fn body(&self) -> Result<Option<Vec<u8>>, rustify::errors::ClientError> {
        let body = serde_json::json!({ "lease_id": self.lease_id, "increment": self.increment_secs });
        Ok(Some(serde_json::to_vec(&body).unwrap_or_default()))
    }
}
