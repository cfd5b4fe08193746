//! Tenants: who owns what, and the quotas that keep one tenant from taking the fleet.
//!
//! A tenant is the NATS account a request came from ([`Caller`]). Sessions and the templates made
//! from them belong to their tenant; the operator (the service account) owns the configured
//! templates, which every tenant may claim from, and sees everything. Whatever a caller does not
//! own is answered exactly as if it did not exist (404), so nothing reveals another tenant's ids.
//!
//! Quotas ([`Quota`]) come from `[tenants]` in the config, overridden at run time by
//! `admin.quotas.set` (stored in the tenants KV bucket). Live sessions are counted from a per-tenant
//! list of session slots pruned on every check, so a check costs O(the tenant's quota), never
//! O(all sessions); claims in flight count too, so concurrent creates cannot overshoot.

use std::borrow::Cow;
use std::sync::Arc;

use hearth_messages::{
    Caller, Quota, QuotasStatus, SetQuotaRequest, TemplateName, TenantId, TenantUsage, WireError,
};
use tokio::time::Instant;

use super::Core;
use super::state::{SessionSlot, State};
use crate::metrics as m;

/// A tenant's create-rate token bucket.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TokenBucket {
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// Takes one token, or says how long until one is there (ms).
    fn take(&mut self, rate_per_s: u32, burst: u32, now: Instant) -> Result<(), u64> {
        let burst = f64::from(burst.max(1));
        let rate = f64::from(rate_per_s);
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        if rate <= 0.0 {
            return Err(u64::MAX);
        }
        Err((((1.0 - self.tokens) / rate) * 1000.0).ceil().max(1.0) as u64)
    }
}

impl Core {
    /// The quota in force for `tenant`: set at run time, else configured, else the default.
    pub(crate) fn quota(&self, st: &State, tenant: &TenantId) -> Quota {
        st.quota_overrides
            .get(tenant)
            .or_else(|| self.cfg.tenants.quotas.get(tenant))
            .copied()
            .unwrap_or(self.cfg.tenants.default)
    }

    /// The `tenant` label value: configured tenants by name, others `_other`, the operator
    /// `_operator` (bounded cardinality whatever accounts connect).
    pub(crate) fn tenant_label(&self, tenant: Option<&TenantId>) -> Cow<'static, str> {
        match tenant {
            None => Cow::Borrowed("_operator"),
            Some(t) if self.cfg.tenants.quotas.contains_key(t) => Cow::Owned(t.to_string()),
            Some(_) => Cow::Borrowed("_other"),
        }
    }

    /// A 429 for `quota`, counted.
    pub(crate) fn over_quota(
        &self,
        tenant: &TenantId,
        quota: &'static str,
        message: String,
        retry_after_ms: Option<u64>,
    ) -> WireError {
        metrics::counter!(m::TENANT_QUOTA_REJECTIONS_TOTAL,
            "tenant" => self.tenant_label(Some(tenant)), "quota" => quota)
        .increment(1);
        tracing::debug!(tenant = %tenant, quota, "over quota");
        WireError::quota(message, retry_after_ms)
    }

    /// Live sessions of `tenant` (prunes its list of ended ones).
    fn live_sessions(st: &mut State, tenant: &TenantId) -> usize {
        let Some(slots) = st.tenant_sessions.get_mut(tenant) else {
            return 0;
        };
        slots.retain(|s| s.data.lock().is_live());
        let n = slots.len();
        if n == 0 {
            st.tenant_sessions.remove(tenant);
        }
        n
    }

    /// Admits a new claim of `tenant` (under the state lock, before the claim is registered):
    /// its live sessions plus its claims in flight stay under `max_sessions`, and its create rate
    /// under the token bucket.
    pub(crate) fn admit_claim(&self, st: &mut State, tenant: &TenantId) -> Result<(), WireError> {
        let quota = self.quota(st, tenant);
        let pending = st
            .claims
            .values()
            .filter(|c| c.tenant.as_ref() == Some(tenant))
            .count();
        let live = Core::live_sessions(st, tenant) + pending;
        if live >= quota.max_sessions as usize {
            return Err(self.too_many_sessions(tenant, live, &quota));
        }
        let now = Instant::now();
        let bucket = st
            .create_buckets
            .entry(tenant.clone())
            .or_insert(TokenBucket {
                tokens: f64::from(quota.create_burst.max(1)),
                at: now,
            });
        if let Err(wait_ms) = bucket.take(quota.creates_per_s, quota.create_burst, now) {
            return Err(self.too_fast(tenant, wait_ms, &quota));
        }
        Ok(())
    }

    /// Admits `count` new sessions of `tenant` at once (a fork, under the state lock, before any
    /// work): its live sessions, its claims in flight and the copies stay within `max_sessions`.
    pub(crate) fn admit_fork(
        &self,
        st: &mut State,
        tenant: &TenantId,
        count: usize,
    ) -> Result<(), WireError> {
        let quota = self.quota(st, tenant);
        let pending = st
            .claims
            .values()
            .filter(|c| c.tenant.as_ref() == Some(tenant))
            .count();
        let live = Core::live_sessions(st, tenant) + pending;
        if live + count > quota.max_sessions as usize {
            return Err(self.over_quota(
                tenant,
                "sessions",
                format!(
                    "tenant {tenant} has {live} live sessions and a fork of {count} would pass its quota of {}",
                    quota.max_sessions
                ),
                None,
            ));
        }
        Ok(())
    }

    fn too_many_sessions(&self, tenant: &TenantId, live: usize, quota: &Quota) -> WireError {
        self.over_quota(
            tenant,
            "sessions",
            format!(
                "tenant {tenant} has {live} live sessions, its quota is {}; release one first",
                quota.max_sessions
            ),
            None,
        )
    }

    /// The create-rate 429; `wait_ms` until a token (`u64::MAX`: never, the rate is 0).
    fn too_fast(&self, tenant: &TenantId, wait_ms: u64, quota: &Quota) -> WireError {
        if wait_ms == u64::MAX {
            return self.over_quota(
                tenant,
                "create_rate",
                format!("tenant {tenant} may not create sessions"),
                None,
            );
        }
        self.over_quota(
            tenant,
            "create_rate",
            format!(
                "tenant {tenant} creates sessions faster than its quota ({}/s)",
                quota.creates_per_s
            ),
            Some(wait_ms),
        )
    }

    /// The 429 a create by `tenant` gets now, if any, without taking a token (a pre-check: the
    /// claim's [`Core::admit_claim`] decides for real). Only quotas that a request cannot change:
    /// live sessions at the limit with no claim of the tenant in flight, or an empty bucket.
    pub(crate) fn create_refused(&self, tenant: &TenantId) -> Option<WireError> {
        let refused = self.create_refused_now(tenant);
        if refused.is_some() {
            metrics::counter!(m::TENANT_CLAIMS_TOTAL,
                "tenant" => self.tenant_label(Some(tenant)), "result" => "quota")
            .increment(1);
        }
        refused
    }

    fn create_refused_now(&self, tenant: &TenantId) -> Option<WireError> {
        let mut st = self.state.lock();
        let quota = self.quota(&st, tenant);
        let live = Core::live_sessions(&mut st, tenant);
        if live >= quota.max_sessions as usize {
            return Some(self.too_many_sessions(tenant, live, &quota));
        }
        let bucket = st.create_buckets.get_mut(tenant)?;
        let mut probe = *bucket;
        match probe.take(quota.creates_per_s, quota.create_burst, Instant::now()) {
            Ok(()) => None,
            Err(wait_ms) => {
                // Keep the refill already computed; the token was not taken.
                *bucket = probe;
                Some(self.too_fast(tenant, wait_ms, &quota))
            }
        }
    }

    /// Remembers a live session of its tenant (for the session quota).
    pub(crate) fn track_tenant_session(st: &mut State, slot: &Arc<SessionSlot>) {
        let tenant = slot.data.lock().rec.session.tenant.clone();
        if let Some(tenant) = tenant {
            st.tenant_sessions
                .entry(tenant)
                .or_default()
                .push(slot.clone());
        }
    }

    /// What `tenant` holds now.
    pub(crate) fn usage(&self, st: &mut State, tenant: &TenantId) -> TenantUsage {
        let sessions = Core::live_sessions(st, tenant) as u32;
        let mut usage = TenantUsage {
            tenant: tenant.clone(),
            quota: self.quota(st, tenant),
            overridden: st.quota_overrides.contains_key(tenant),
            sessions,
            templates: 0,
            ready_total: 0,
            snapshot_bytes: 0,
        };
        for t in st.templates.values() {
            let t = &t.rec.template;
            if t.tenant.as_ref() == Some(tenant) {
                usage.templates += 1;
                usage.ready_total += t.max_ready.max(t.min_ready);
                usage.snapshot_bytes += t.snapshot_bytes;
            }
        }
        // Uploaded paused sessions (`pause_upload`) hold object-store bytes too.
        if let Some(slots) = st.tenant_sessions.get(tenant) {
            usage.snapshot_bytes += slots
                .iter()
                .map(|s| s.data.lock().rec.session.pause_upload_bytes)
                .sum::<u64>();
        }
        usage
    }

    /// Whether `tenant` may own one more template keeping up to `max_ready` warm VMs.
    pub(crate) fn admit_template(
        &self,
        st: &mut State,
        tenant: &TenantId,
        max_ready: u32,
    ) -> Result<(), WireError> {
        let usage = self.usage(st, tenant);
        let q = usage.quota;
        if usage.templates >= q.max_templates {
            return Err(self.over_quota(
                tenant,
                "templates",
                format!(
                    "tenant {tenant} owns {} templates, its quota is {}; delete one first",
                    usage.templates, q.max_templates
                ),
                None,
            ));
        }
        if max_ready > q.max_ready_per_template {
            return Err(self.over_quota(
                tenant,
                "ready_per_template",
                format!(
                    "a template of tenant {tenant} may keep at most {} warm vms",
                    q.max_ready_per_template
                ),
                None,
            ));
        }
        if usage.ready_total + max_ready > q.max_ready_total {
            return Err(self.over_quota(
                tenant,
                "ready_total",
                format!(
                    "tenant {tenant}'s templates keep {} warm vms, its quota is {}",
                    usage.ready_total, q.max_ready_total
                ),
                None,
            ));
        }
        if usage.snapshot_bytes >= q.max_snapshot_bytes {
            return Err(self.snapshot_bytes_exceeded(tenant, usage.snapshot_bytes, 0, &q));
        }
        Ok(())
    }

    /// The 429 for a snapshot that does not fit the tenant's snapshot bytes.
    pub(crate) fn snapshot_bytes_exceeded(
        &self,
        tenant: &TenantId,
        used: u64,
        adding: u64,
        q: &Quota,
    ) -> WireError {
        self.over_quota(
            tenant,
            "snapshot_bytes",
            format!(
                "tenant {tenant}'s snapshots hold {used} bytes{}, its quota is {} bytes; delete a template first",
                if adding > 0 {
                    format!(" and this one {adding}")
                } else {
                    String::new()
                },
                q.max_snapshot_bytes
            ),
            None,
        )
    }

    /// Whether `caller` may see and claim from `template` (not being deleted or created).
    pub(crate) fn visible_template(st: &State, caller: &Caller, template: &TemplateName) -> bool {
        st.templates.get(template).is_some_and(|t| {
            !t.reserved
                && !t.rec.template.deleting
                && caller.may_use_template(t.rec.template.tenant.as_ref())
        })
    }

    /// The most pooled VMs `tenant`'s templates may hold: its share of the fleet's slots.
    pub(crate) fn fleet_share(&self, st: &State, tenant: &TenantId) -> usize {
        let capacity: u64 = st
            .workers
            .values()
            .filter(|w| w.usable())
            .filter_map(|w| w.status.as_ref())
            .map(|s| u64::from(s.max_vms))
            .sum();
        let pct = u64::from(self.quota(st, tenant).max_fleet_share_pct.min(100));
        (capacity * pct / 100) as usize
    }

    /// Warm (ready and restoring) pooled VMs of each tenant's templates.
    pub(crate) fn tenant_pool_vms(st: &State) -> std::collections::HashMap<TenantId, usize> {
        let mut out = std::collections::HashMap::new();
        for (name, pool) in &st.pools {
            let Some(tenant) = st
                .templates
                .get(name)
                .and_then(|t| t.rec.template.tenant.clone())
            else {
                continue;
            };
            *out.entry(tenant).or_default() += pool.ready.len() + pool.restoring.len();
        }
        out
    }

    /// Sets the per-tenant gauges; `live` holds the live sessions per tenant (counted by the
    /// caller outside the state lock).
    pub(crate) fn tenant_gauges(&self, live: std::collections::HashMap<Option<TenantId>, u64>) {
        use std::collections::HashMap;
        let mut sessions: HashMap<String, u64> = HashMap::new();
        for (tenant, n) in live {
            *sessions
                .entry(self.tenant_label(tenant.as_ref()).into_owned())
                .or_default() += n;
        }
        let mut bytes: HashMap<String, u64> = HashMap::new();
        let mut vms: HashMap<String, u64> = HashMap::new();
        for label in self
            .cfg
            .tenants
            .quotas
            .keys()
            .map(|t| t.to_string())
            .chain(["_other".to_owned(), "_operator".to_owned()])
        {
            sessions.entry(label.clone()).or_default();
            bytes.insert(label.clone(), 0);
            vms.insert(label, 0);
        }
        {
            let st = self.state.lock();
            for t in st.templates.values() {
                let t = &t.rec.template;
                *bytes
                    .entry(self.tenant_label(t.tenant.as_ref()).into_owned())
                    .or_default() += t.snapshot_bytes;
            }
            for (name, pool) in &st.pools {
                let tenant = st
                    .templates
                    .get(name)
                    .and_then(|t| t.rec.template.tenant.as_ref());
                *vms.entry(self.tenant_label(tenant).into_owned())
                    .or_default() += (pool.ready.len() + pool.restoring.len()) as u64;
            }
        }
        for (label, n) in sessions {
            metrics::gauge!(m::TENANT_SESSIONS, "tenant" => label).set(n as f64);
        }
        for (label, n) in bytes {
            metrics::gauge!(m::TENANT_SNAPSHOT_BYTES, "tenant" => label).set(n as f64);
        }
        for (label, n) in vms {
            metrics::gauge!(m::TENANT_POOL_VMS, "tenant" => label).set(n as f64);
        }
    }

    /// `admin.quotas.get`: every configured, overridden or active tenant with its usage.
    pub(crate) fn quotas_status(&self, caller: &Caller) -> Result<QuotasStatus, WireError> {
        if !caller.is_operator() {
            return Err(WireError::not_found("no such endpoint"));
        }
        let mut st = self.state.lock();
        let mut names: std::collections::BTreeSet<TenantId> =
            self.cfg.tenants.quotas.keys().cloned().collect();
        names.extend(st.quota_overrides.keys().cloned());
        names.extend(st.tenant_sessions.keys().cloned());
        names.extend(
            st.templates
                .values()
                .filter_map(|t| t.rec.template.tenant.clone()),
        );
        let tenants = names.iter().map(|t| self.usage(&mut st, t)).collect();
        Ok(QuotasStatus {
            default: self.cfg.tenants.default,
            tenants,
        })
    }

    /// `admin.quotas.set`: validated, stored, then in force (the next request sees it).
    pub(crate) async fn set_quota(
        &self,
        caller: &Caller,
        req: SetQuotaRequest,
    ) -> Result<QuotasStatus, WireError> {
        if !caller.is_operator() {
            return Err(WireError::not_found("no such endpoint"));
        }
        if let Some(q) = &req.quota {
            q.validate()?;
        }
        self.check_leader().map_err(super::store_error)?;
        self.store
            .put_quota(&req.tenant, req.quota.as_ref())
            .await
            .map_err(super::store_error)?;
        {
            let mut st = self.state.lock();
            match req.quota {
                Some(q) => {
                    st.quota_overrides.insert(req.tenant.clone(), q);
                }
                None => {
                    st.quota_overrides.remove(&req.tenant);
                }
            }
            // A new rate starts from a full bucket.
            st.create_buckets.remove(&req.tenant);
        }
        tracing::info!(tenant = %req.tenant, quota = ?req.quota, "tenant quota set");
        self.quotas_status(caller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_token_bucket_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket {
            tokens: 2.0,
            at: t0,
        };
        assert!(b.take(10, 2, t0).is_ok());
        assert!(b.take(10, 2, t0).is_ok());
        let wait = b.take(10, 2, t0).unwrap_err();
        assert!((1..=100).contains(&wait), "{wait}");
        assert!(b.take(10, 2, t0 + Duration::from_millis(100)).is_ok());
        // Refill is capped at the burst.
        let later = t0 + Duration::from_secs(60);
        assert!(b.take(10, 2, later).is_ok());
        assert!(b.take(10, 2, later).is_ok());
        assert!(b.take(10, 2, later).is_err());
        // No rate: never, and no retry hint.
        let mut none = TokenBucket {
            tokens: 0.0,
            at: t0,
        };
        assert_eq!(none.take(0, 1, later), Err(u64::MAX));
    }
}
