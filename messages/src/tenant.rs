//! Who is asking: the tenant model.
//!
//! A tenant is a NATS account. Hearth's services run in one service account that exports the
//! client API and the data plane; each tenant's account imports them unchanged. NATS stamps every
//! request that crosses an import with the `Nats-Request-Info` header, whose `acc` is the
//! requester's account, and replaces any value a client sends itself. Hearth reads the tenant from
//! that header and nowhere else. A request without it was sent from inside the service account:
//! that is the operator, who sees everything (and a single-account deployment, where everybody is
//! the operator, works as before).

use serde::Deserialize;

use crate::error::WireError;
use crate::ids::TenantId;

/// The header NATS sets on requests that cross an account import.
pub const REQUEST_INFO_HEADER: &str = "Nats-Request-Info";

/// Who sent a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Caller {
    /// From inside the service account: sees and acts on everything.
    Operator,
    /// From a tenant's account, through an import.
    Tenant(TenantId),
}

#[derive(Deserialize)]
struct RequestInfo {
    acc: String,
}

impl Caller {
    /// The caller named by a `Nats-Request-Info` value (`None`: no header, the operator). A header
    /// that does not parse or names an account outside the id alphabet is refused (400): it can
    /// only come from a server Hearth does not understand, and guessing would fail open.
    pub fn from_request_info(value: Option<&str>) -> Result<Self, WireError> {
        let Some(value) = value else {
            return Ok(Caller::Operator);
        };
        let info: RequestInfo = serde_json::from_str(value).map_err(|e| {
            WireError::bad_request(format!("unreadable {REQUEST_INFO_HEADER} header: {e}"))
        })?;
        let tenant = TenantId::new(info.acc).map_err(|e| {
            WireError::bad_request(format!("the requesting account is not a valid tenant: {e}"))
        })?;
        Ok(Caller::Tenant(tenant))
    }

    /// The caller of a NATS request, from its headers.
    #[cfg(feature = "client")]
    pub fn from_headers(headers: Option<&async_nats::HeaderMap>) -> Result<Self, WireError> {
        let value = headers.and_then(|h| h.get(REQUEST_INFO_HEADER));
        Self::from_request_info(value.map(|v| v.as_str()))
    }

    /// The tenant, if any.
    pub fn tenant(&self) -> Option<&TenantId> {
        match self {
            Caller::Operator => None,
            Caller::Tenant(t) => Some(t),
        }
    }

    /// Whether the caller may see and act on something `owner` owns (`None`: the operator's).
    /// The operator owns everything; a tenant only its own.
    pub fn owns(&self, owner: Option<&TenantId>) -> bool {
        match self {
            Caller::Operator => true,
            Caller::Tenant(t) => owner == Some(t),
        }
    }

    /// Whether the caller may see and claim from a template owned by `owner`: the operator's
    /// templates (`None`) are shared by every tenant.
    pub fn may_use_template(&self, owner: Option<&TenantId>) -> bool {
        owner.is_none() || self.owns(owner)
    }

    /// Whether this is the operator.
    pub fn is_operator(&self) -> bool {
        matches!(self, Caller::Operator)
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Operator => f.write_str("operator"),
            Caller::Tenant(t) => write!(f, "tenant {t}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_header_is_the_operator_and_acc_names_the_tenant() {
        assert_eq!(Caller::from_request_info(None).unwrap(), Caller::Operator);
        let c = Caller::from_request_info(Some(r#"{"acc":"tenant-a","rtt":"1ms"}"#)).unwrap();
        assert_eq!(c, Caller::Tenant(TenantId::new("tenant-a").unwrap()));
        assert!(c.owns(Some(&TenantId::new("tenant-a").unwrap())));
        assert!(!c.owns(Some(&TenantId::new("tenant-b").unwrap())));
        assert!(!c.owns(None));
        assert!(c.may_use_template(None));
        assert!(Caller::Operator.owns(Some(&TenantId::new("x").unwrap())));
    }

    #[test]
    fn a_malformed_header_is_refused_not_guessed() {
        for bad in ["", "{}", "not json", r#"{"acc":"a.b"}"#, r#"{"acc":""}"#] {
            let err = Caller::from_request_info(Some(bad)).unwrap_err();
            assert_eq!(err.code, crate::ErrorCode::BadRequest, "{bad}");
        }
    }
}
